"""ARMT configuration: the memory hyper-parameters that sit on top of a Hugging Face base config.

Kept as a plain dataclass (no transformers import) so that executors, state files and the service can all
reason about it; `armt_config.json` is its JSON form.
"""
from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

ARMT_CONFIG_NAME = "armt_config.json"
# The HF single-file ARMTForCausalLM (research repo, V2) saves no armt_config.json: its config.json is an ARMTConfig
# (model_type "armt") with the base model's config nested under base_model_config.
HF_ARMT_TYPE = "armt"
DPFP_NU = 3  # the paper's DPFP order; d_key = 2 * nu * d_mem

# Keys of the research repo's configs that change the model in ways this engine does not implement.
ACT_KEYS = ("act", "max_hop", "act_threshold", "act_fixed")
_UNSUPPORTED_TRUE = ("sliding_window", "attend_to_previous_input", "gating", "act_on")
_RESEARCH_KEYS = (*_UNSUPPORTED_TRUE, "segment_alignment", "lora_alpha")
_PEFT_PREFIX = "base_model.model."
_FLAGS = ("correction", "use_sink", "wrap_pos", "use_denom", "act", "act_fixed")


@dataclass
class ArmtConfig:
    """Memory configuration of an ARMT.

    num_mem_tokens: M memory tokens appended to the end of every segment (their outputs feed the write).
    d_mem: width of the query/key projections before DPFP (d_key = 6 * d_mem).
    segment_size: real tokens per segment (memory tokens come on top).
    armt_version: 1 = the paper (raw DPFP features), 2 = L2-normalised features (+ optional sink token).
    correction: gamma correction of the z update (delta rule on the normaliser).
    layers_attr: dotted path of the decoder block list inside the HF model (None: the base's default).
    use_sink: V2 only: a learned token prepended to every segment.
    wrap_pos: GPT-2 only: memory tokens take M extra learned positions at the end of the position table
        (the research repo's `wrap_pos=True`); otherwise positions simply continue after the real tokens.
    act: adaptive computation time in every layer (model/act.py): a halting unit per layer, the layer re-applied
        up to `max_hop` times (overridable at inference); `act_threshold` = 1 - eps; `act_fixed` always runs
        `max_hop` hops. Off by default, and then absent from armt_config.json (older files load unchanged).
    num_mem_tokens = 0 is a plain segment-recurrent transformer that writes nothing (the reasoning baselines); the
    research code would instead write every position (its `[:, -0:]` slice), a configuration no checkpoint uses.
    """

    num_mem_tokens: int
    d_mem: int
    segment_size: int
    armt_version: int = 1
    correction: bool = True
    layers_attr: str | None = None
    use_sink: bool = False
    wrap_pos: bool = False
    n_heads: int = 1
    use_denom: bool = True
    act: bool = False
    max_hop: int = 4
    act_threshold: float = 0.9
    act_fixed: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("num_mem_tokens", "d_mem", "segment_size", "armt_version", "n_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"armt config: {name} must be an integer, got {value!r}")
        for name in _FLAGS:  # "false" (a string) would otherwise count as true
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"armt config: {name} must be true or false, got {getattr(self, name)!r}")
        if self.layers_attr is not None and not isinstance(self.layers_attr, str):
            raise ValueError(f"armt config: layers_attr must be a dotted path string, got {self.layers_attr!r}")
        if self.num_mem_tokens < 0:
            raise ValueError(f"armt config: num_mem_tokens must be >= 0, got {self.num_mem_tokens}")
        if self.d_mem < 1:
            raise ValueError(f"armt config: d_mem must be >= 1, got {self.d_mem}")
        if self.segment_size < 1:
            raise ValueError(f"armt config: segment_size must be >= 1, got {self.segment_size}")
        if self.armt_version not in (1, 2):
            raise ValueError(f"armt config: armt_version must be 1 or 2, got {self.armt_version}")
        if self.use_sink and self.armt_version != 2:
            raise ValueError("armt config: use_sink exists only in armt_version 2")
        if self.n_heads != 1:
            raise ValueError(f"armt config: only n_heads=1 is supported, got {self.n_heads}")
        if not self.use_denom:
            raise ValueError("armt config: use_denom=false is not supported (the paper always normalises by z)")
        self._check_act()
        # a PEFT-wrapped base (research configs): the importer unwraps its keys, so the path is the plain HF one
        if self.layers_attr and self.layers_attr.startswith(_PEFT_PREFIX):
            self.layers_attr = self.layers_attr[len(_PEFT_PREFIX):]
        for key in _UNSUPPORTED_TRUE:
            if self.extra.get(key):
                raise ValueError(f"armt config: {key}=true is not supported by this engine")
        if self.extra.get("segment_alignment", "left") not in ("left", None):
            raise ValueError(f"armt config: only segment_alignment='left' is supported, got "
                             f"{self.extra['segment_alignment']!r}")

    def _check_act(self) -> None:
        if isinstance(self.max_hop, bool) or not isinstance(self.max_hop, int) or self.max_hop < 1:
            raise ValueError(f"armt config: max_hop must be an integer >= 1, got {self.max_hop!r}")
        if isinstance(self.act_threshold, bool) or not isinstance(self.act_threshold, int | float) \
                or not 0 < self.act_threshold <= 1:
            raise ValueError(f"armt config: act_threshold must be in (0, 1], got {self.act_threshold!r}")

    @property
    def d_key(self) -> int:
        return 2 * DPFP_NU * self.d_mem

    @property
    def normalize_phi(self) -> bool:
        return self.armt_version == 2

    @classmethod
    def from_dict(cls, data: dict) -> "ArmtConfig":
        known = {f.name for f in fields(cls)} - {"extra"}
        missing = [k for k in ("num_mem_tokens", "d_mem", "segment_size") if k not in data]
        if missing:
            raise ValueError(f"{ARMT_CONFIG_NAME} lacks required keys: {', '.join(missing)}")
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        for key in extra:  # other keys ride along (research configs carry many), but a misspelt flag is an error
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
            if close:
                raise ValueError(f"{ARMT_CONFIG_NAME}: unknown key {key!r}; did you mean {close[0]!r}?")
        return cls(**kwargs, extra=extra)

    @classmethod
    def load(cls, directory: str | Path) -> "ArmtConfig":
        return cls.from_dict(cls.read_dict(directory))

    @staticmethod
    def read_dict(directory: str | Path) -> dict:
        """The memory settings of a model directory, unvalidated (the loader may still infer armt_version from
        the weights): armt_config.json, or the ARMTConfig that an HF ARMTForCausalLM keeps in config.json."""
        directory = Path(directory)
        if (directory / ARMT_CONFIG_NAME).is_file():
            return read_json_object(directory / ARMT_CONFIG_NAME)
        hf = hf_armt_config(directory)
        if hf is None:
            raise FileNotFoundError(f"{directory / ARMT_CONFIG_NAME} not found: an ARMT directory needs "
                                    f"{ARMT_CONFIG_NAME} (or an HF ARMTForCausalLM config.json)")
        known = {f.name for f in fields(ArmtConfig)} - {"extra"}
        return {"armt_version": 2, **{k: v for k, v in hf.items() if k in known or k in _RESEARCH_KEYS}}

    def to_dict(self) -> dict:
        data = asdict(self)
        extra = data.pop("extra")
        if not self.act:  # models without ACT keep the exact JSON (and fingerprint) they had before ACT existed
            for key in ACT_KEYS:
                data.pop(key)
        return {**extra, **data}

    def save(self, directory: str | Path) -> None:
        (Path(directory) / ARMT_CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def read_json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def hf_armt_config(directory: str | Path) -> dict | None:
    """The config.json of an HF ARMTForCausalLM directory (model_type "armt"), or None for any other directory."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    data = read_json_object(path)
    return data if data.get("model_type") == HF_ARMT_TYPE else None


def is_armt_directory(directory: str | Path) -> bool:
    """An ARMT model directory (project format or official layouts) rather than a plain HF base."""
    return (Path(directory) / ARMT_CONFIG_NAME).is_file() or hf_armt_config(directory) is not None


# The base config keys the fingerprint named before 2026-12-02 (states written then carry that name).
_BASE_KEYS_V1 = ("model_type", "hidden_size", "n_embd", "num_hidden_layers", "n_layer", "vocab_size")
# Everything else of a LLaMA / GPT-2 config that changes what the same weights compute.
_BASE_KEYS = (*_BASE_KEYS_V1, "num_attention_heads", "n_head", "num_key_value_heads", "intermediate_size", "n_inner",
              "hidden_act", "activation_function", "rms_norm_eps", "layer_norm_epsilon", "attention_bias",
              "mlp_bias", "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
              "tie_word_embeddings")


def fingerprint(base_config: dict, armt: ArmtConfig, weights_digest: str, legacy: bool = False) -> str:
    """A short digest naming the exact model: base config, memory config and weights.

    A MemoryState is only meaningful under the model that wrote it, so states carry this and loading checks it.
    The base config enters by what it computes (heads, activation, norm epsilon, RoPE), not by how a transformers
    version spells it: RoPE as one dict merged from rope_theta / rope_scaling / rope_parameters.
    `legacy`: the name versions before 2026-12-02 gave (six base keys only), which their states carry.
    """
    base = {k: base_config.get(k) for k in (_BASE_KEYS_V1 if legacy else _BASE_KEYS)}
    if not legacy:
        heads = base_config.get("num_attention_heads") or base_config.get("n_head")
        width = base_config.get("hidden_size") or base_config.get("n_embd")
        base["head_dim"] = base_config.get("head_dim") or (width // heads if width and heads else None)
        base["rope"] = _rope(base_config)
    payload = json.dumps({"base": base, "armt": armt.to_dict(), "weights": weights_digest}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _rope(base_config: dict) -> dict:
    """The RoPE settings as one dict, whichever keys the config used (None for learned positions)."""
    rope = {**(base_config.get("rope_scaling") or {}), **(base_config.get("rope_parameters") or {})}
    if "type" in rope:  # the older spelling of rope_type
        rope.setdefault("rope_type", rope.pop("type"))
    if base_config.get("rope_theta") is not None:
        rope.setdefault("rope_theta", base_config["rope_theta"])
    if rope:
        rope.setdefault("rope_type", "default")
    return rope or None
