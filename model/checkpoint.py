"""Checkpoint I/O: the project's own format, the official layouts, and fresh random models.

Project format (a directory; official layouts: model/official.py, and the HF ARMTForCausalLM's config.json):
    config.json          the base model's HF config
    armt_config.json     ArmtConfig
    model.safetensors    base weights under `base.<HF name>`, memory parameters under `assoc.<name>`
                         (stacked over layers), header metadata {"format": "armt-serve/1"}
    tokenizer.json       optional, a `tokenizers` tokenizer
"""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .armt import ArmtModel
from .config import ArmtConfig, fingerprint, read_json_object
from .hf_base import BaseAdapter, build_base, load_base_config
from .official import IGNORED_SUFFIXES, is_official, layout_version, merge_lora, split_official, unwrap_peft

FORMAT = "armt-serve/1"
WEIGHTS = "model.safetensors"
ASSOC_NAMES = ("memory", "W_mq", "W_mk", "W_mv", "W_mb", "b_mb", "sink", "act_w", "act_b")


# ---------------------------------------------------------------------------------------------- reading files
def _read_safetensors(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})


def read_weights(directory: Path) -> tuple[dict, dict]:
    """All tensors of a directory (single file or sharded index) and the safetensors metadata."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return _read_one(directory / name)
        index = directory / f"{name}.index.json"
        if index.is_file():
            weight_map = read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no weight_map object")
            shards = sorted(set(weight_map.values()))
            tensors, meta = {}, {}
            for shard in shards:
                part, meta = _read_one(directory / shard)
                tensors.update(part)
            return tensors, meta
    raise FileNotFoundError(f"no weights in {directory}: expected model.safetensors or pytorch_model.bin")


def _read_one(path: Path) -> tuple[dict, dict]:
    """One weights file; a damaged or truncated one is a ValueError naming it (not a traceback from the reader)."""
    try:
        if path.suffix == ".safetensors":
            return _read_safetensors(path)
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path}: damaged or truncated weights file ({e})") from None
    if not isinstance(tensors, dict):
        raise ValueError(f"{path}: holds a {type(tensors).__name__}, not a state dict of tensors")
    return tensors, {}


def _lora_settings(directory: Path, armt: ArmtConfig) -> tuple[float | None, bool, dict]:
    """(lora_alpha, use_rslora, alpha_pattern) from a PEFT adapter_config.json, else lora_alpha from
    armt_config.json."""
    adapter = directory / "adapter_config.json"
    cfg = read_json_object(adapter) if adapter.is_file() else {}
    alpha = cfg.get("lora_alpha", armt.extra.get("lora_alpha"))
    return alpha, bool(cfg.get("use_rslora", False)), cfg.get("alpha_pattern") or {}


def split_weights(directory: Path, tensors: dict, meta: dict, armt: ArmtConfig, adapter: BaseAdapter
                  ) -> tuple[dict, dict]:
    """Any supported layout -> (base state dict under HF names, memory tensors by ASSOC_NAMES)."""
    if meta.get("format") == FORMAT or any(k.startswith("assoc.") for k in tensors):
        base = {k[len("base."):]: v for k, v in tensors.items() if k.startswith("base.")}
        assoc = {k[len("assoc."):]: v for k, v in tensors.items() if k.startswith("assoc.")}
        stray = [k for k in tensors if not k.startswith(("base.", "assoc."))]
        if stray:
            raise ValueError(f"unexpected keys in {WEIGHTS}: {stray[:5]}")
        return base, assoc
    if not is_official(tensors):
        raise ValueError(f"weights in {directory} are neither the project format nor an official ARMT layout")
    base, assoc, lora = split_official(tensors, adapter.layers_attr, adapter.n_layers, adapter.d_model, armt.d_mem)
    merge_lora(base, lora, *_lora_settings(directory, armt))
    return base, assoc


# ---------------------------------------------------------------------------------------------- assembling
def _copy_checked(target: dict, source: dict, what: str, optional: tuple[str, ...] = ()) -> None:
    missing = [k for k in target if k not in source and k not in optional]
    if missing:
        raise ValueError(f"{what}: missing key {missing[0]!r} (expected shape {tuple(target[missing[0]].shape)})"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    unexpected = [k for k in source if k not in target]
    if unexpected:
        raise ValueError(f"{what}: unexpected key {unexpected[0]!r} with shape {tuple(source[unexpected[0]].shape)}")
    with torch.no_grad():
        for key, tensor in target.items():
            if key not in source:
                continue
            if tuple(source[key].shape) != tuple(tensor.shape):
                raise ValueError(f"{what}: key {key!r} has shape {tuple(source[key].shape)} in the checkpoint "
                                 f"but the model expects {tuple(tensor.shape)}")
            tensor.copy_(source[key])


def load_into(model: ArmtModel, base_sd: dict, assoc: dict) -> None:
    hf = model.base.hf
    tied = bool(getattr(hf.config, "tie_word_embeddings", False))
    optional = ("lm_head.weight",) if tied else ()
    if tied:  # a writer that drops shared tensors may have kept the tied pair under the head's name only
        embedding = next(n for n, p in hf.named_parameters() if p is hf.get_input_embeddings().weight)
        if embedding not in base_sd and "lm_head.weight" in base_sd:
            base_sd = {**base_sd, embedding: base_sd["lm_head.weight"]}
        head = base_sd.get("lm_head.weight")
        if head is not None and embedding in base_sd and not torch.equal(head, base_sd[embedding]):
            _untie(hf)  # a LoRA merged into the head (or the embedding) alone: PEFT ran them as two matrices
            tied, optional = False, ()
    _copy_checked(dict(hf.state_dict(keep_vars=True)), base_sd, "base weights", optional)
    if tied:
        hf.tie_weights()
    params = {n: p for n in ASSOC_NAMES if (p := getattr(model, n)) is not None}
    _copy_checked(params, assoc, "memory weights")


def _untie(hf) -> None:
    """Give the output head a weight of its own (the config says so too, so that saving keeps both)."""
    hf.config.tie_word_embeddings = False
    head = hf.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone())


def weights_digest(model: ArmtModel, legacy: bool = False) -> str:
    """Cheap digest of the weights: names, shapes and a strided sample of values (not a full hash).

    The values are taken at bfloat16 precision, so that the same checkpoint loaded in fp32 or bf16 (or cast after
    loading) names the same model: states stay usable across ARMT_DTYPE (the memory itself is fp32, float64 only for a
    float64 model).
    `legacy`: the values as loaded, as versions before 2026-12-01 took them (their states' fingerprints).
    """
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)]
        sample = (sample.float() if legacy else sample.to(torch.bfloat16).float()).cpu()
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def _detect_wrap_pos(armt: ArmtConfig, base_config, base_sd: dict) -> None:
    wpe = base_sd.get("transformer.wpe.weight")
    if base_config.model_type == "gpt2" and wpe is not None:
        if wpe.shape[0] == base_config.n_positions + armt.num_mem_tokens and armt.num_mem_tokens:
            armt.wrap_pos = True  # the research code grew the position table by M rows for the memory tokens


def _armt_config(directory: Path, tensors: dict) -> ArmtConfig:
    """The directory's ArmtConfig; the research repo's configs carry no armt_version, so where it is absent an
    official layout that exists only in V2 (`armt.` prefix, sink token) makes it 2 (else the default, 1)."""
    data = ArmtConfig.read_dict(directory)
    version = layout_version(tensors) if is_official(tensors) else None
    if "armt_version" not in data and version is not None:
        data = {**data, "armt_version": version}
    if version == 2 and data.get("armt_version") == 1:
        raise ValueError(f"{directory}: armt_config says armt_version 1 but the weights are in a layout that exists "
                         "only in version 2 (armt. prefix or a sink token); set armt_version to 2")
    return ArmtConfig.from_dict(data)


def from_pretrained(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> ArmtModel:
    directory = Path(path)
    if not directory.is_dir():
        what = "is a file, not a model directory" if directory.exists() else "does not exist"
        raise FileNotFoundError(f"model directory {directory} {what}")
    base_config = load_base_config(directory)
    tensors, meta = read_weights(directory)
    tensors = unwrap_peft(tensors)
    armt = _armt_config(directory, tensors)
    hf = build_base(base_config, dtype)
    adapter = BaseAdapter(hf, armt.layers_attr)
    base_sd, assoc = split_weights(directory, tensors, meta, armt, adapter)
    _detect_wrap_pos(armt, base_config, base_sd)
    if armt.wrap_pos:
        adapter.extend_positions(armt.num_mem_tokens)
    model = ArmtModel(adapter, armt)
    load_into(model, base_sd, assoc)
    return finish(model, base_config.to_dict(), directory, device)


def from_base(directory: str | Path, armt: ArmtConfig, seed: int = 0, dtype: torch.dtype = torch.float32
              ) -> ArmtModel:
    """A plain local HF LLaMA / GPT-2 directory (no armt_config.json) with fresh memory parameters, as a starting
    point for training; its tokenizer.json is kept when there is one."""
    directory = Path(directory)
    base_config = load_base_config(directory)
    model = create(base_config, armt, dtype=dtype, seed=seed)
    tensors = _causal_lm_keys(read_weights(directory)[0], model.base.hf.base_model_prefix)
    fresh = {n: p.detach().clone() for n in ASSOC_NAMES if (p := getattr(model, n)) is not None}
    load_into(model, tensors, fresh)
    return finish(model, base_config.to_dict(), directory, "cpu")


def _causal_lm_keys(tensors: dict, prefix: str) -> dict:
    """A plain base's weights under the *ForCausalLM names: checkpoints of the bare model (the hub's GPT-2 stores
    `h.0...`, `wte.weight` without `transformer.`) get the base prefix, and buffers old transformers versions
    saved (`attn.bias`, `rotary_emb.inv_freq`) are dropped, as transformers' own loader does."""
    tensors = {k: v for k, v in tensors.items() if not k.endswith(IGNORED_SUFFIXES)}
    if any(k.startswith(f"{prefix}.") for k in tensors):
        return tensors
    return {k if k.startswith("lm_head.") else f"{prefix}.{k}": v for k, v in tensors.items()}


def name_model(model: ArmtModel, base_config: dict) -> None:
    """The model's fingerprint, and the ones earlier versions gave the same model (their states stay usable): the
    weight values as loaded (before 2026-12-01), six base config keys (before 2026-12-02)."""
    digest = weights_digest(model)
    model.fingerprint = fingerprint(base_config, model.config, digest)
    earlier = (fingerprint(base_config, model.config, digest, legacy=True),
               fingerprint(base_config, model.config, weights_digest(model, legacy=True), legacy=True))
    model.fingerprints = tuple(dict.fromkeys((model.fingerprint, *earlier)))


def finish(model: ArmtModel, base_config: dict, directory: Path | None, device) -> ArmtModel:
    name_model(model, base_config)
    model.tokenizer = None
    if directory is not None and (directory / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        try:
            model.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises a bare Exception for a malformed file
            raise ValueError(f"{directory / 'tokenizer.json'}: not a valid tokenizers file ({e})") from None
    return model.to(device).eval()


def create(base_config, armt: ArmtConfig, dtype: torch.dtype = torch.float32, seed: int = 0) -> ArmtModel:
    """A fresh model with random weights (training, tests); `base_config` is an HF PretrainedConfig."""
    torch.manual_seed(seed)
    adapter = BaseAdapter(build_base(base_config, dtype), armt.layers_attr)
    if armt.wrap_pos:
        adapter.extend_positions(armt.num_mem_tokens)
    model = ArmtModel(adapter, armt)
    model.reset_memory_parameters(torch.Generator().manual_seed(seed))
    return finish(model, base_config.to_dict(), None, "cpu")


def save_pretrained(model: ArmtModel, path: str | Path) -> None:
    """Write the project format; loading it back gives the same model (and the same fingerprint: the weights may
    have changed in place since the model was built, by training, so the fingerprint is taken again here)."""
    name_model(model, model.base.config.to_dict())
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    model.base.config.save_pretrained(str(directory))
    model.config.save(directory)
    tensors = {}
    tied = bool(getattr(model.base.config, "tie_word_embeddings", False))
    for key, tensor in model.base.hf.state_dict().items():
        if not (tied and key == "lm_head.weight"):  # shared storage; re-tied at load
            tensors[f"base.{key}"] = tensor.detach().cpu().contiguous()
    for name in ASSOC_NAMES:
        param = getattr(model, name)
        if param is not None:
            tensors[f"assoc.{name}"] = param.detach().cpu().contiguous()
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": FORMAT})
    if getattr(model, "tokenizer", None) is not None:
        model.tokenizer.save(str(directory / "tokenizer.json"))
    else:  # a tokenizer left by an earlier model in this directory would load as this one's
        (directory / "tokenizer.json").unlink(missing_ok=True)
