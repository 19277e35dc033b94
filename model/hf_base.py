"""The one transformers adapter: builds a LLaMA or GPT-2 base from a local directory and exposes its pieces.

ARMT needs to act between the base's decoder blocks (read before each, write after each), so instead of calling
the HF model's forward we drive its parts: token embedding, position handling (GPT-2's learned table, LLaMA's
rotary embedding), the causal mask HF itself would build, each block, and the final norm + lm_head. Nothing
else in model/ imports transformers.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask

from .config import hf_armt_config

# model_type -> dotted path of the decoder block list (the research repo's `layers_attr`)
DEFAULT_LAYERS_ATTR = {"llama": "model.layers", "gpt2": "transformer.h"}


def load_base_config(directory: str | Path) -> PretrainedConfig:
    """The HF config.json of a local directory, or the base config nested in an HF ARMTForCausalLM's one (model_type
    "armt", research repo V2); never touches a model hub."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: an ARMT directory needs the base model's HF config.json")
    armt = hf_armt_config(directory)
    if armt is None:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    else:
        base = armt.get("base_model_config")
        if not isinstance(base, dict) or "model_type" not in base:
            raise ValueError(
                f"{path} is an ARMTForCausalLM config that names its base only as base_model_name="
                f"{armt.get('base_model_name')!r}; models are never downloaded here: put the base's config (a JSON "
                "object with its model_type) under base_model_config"
            )
        config = AutoConfig.for_model(**base)
    if config.model_type not in DEFAULT_LAYERS_ATTR:
        raise ValueError(
            f"base model_type {config.model_type!r} is not supported; supported: {sorted(DEFAULT_LAYERS_ATTR)}"
        )
    return config


def make_config(kind: str, **kwargs) -> PretrainedConfig:
    """An HF config for a new base (tests, benchmarks, training): kind is "llama" or "gpt2"."""
    if kind not in DEFAULT_LAYERS_ATTR:
        raise ValueError(f"base kind must be one of {sorted(DEFAULT_LAYERS_ATTR)}, got {kind!r}")
    return AutoConfig.for_model(kind, **kwargs)


def build_base(config: PretrainedConfig, dtype: torch.dtype) -> nn.Module:
    """An HF causal LM with this config (weights are loaded afterwards by the checkpoint code)."""
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


@dataclass
class SegmentContext:
    """What every block of one forward call shares: causal mask, rotary tables, KV cache."""

    mask: torch.Tensor | None
    position_ids: torch.Tensor  # [1, T]
    rope: tuple[torch.Tensor, torch.Tensor] | None
    cache: DynamicCache | None


class BaseAdapter(nn.Module):
    """Uniform access to a LLaMA / GPT-2 HF model's embedding, blocks and head."""

    def __init__(self, hf_model: nn.Module, layers_attr: str | None = None):
        super().__init__()
        self.hf = hf_model
        self.config = hf_model.config
        self.kind = self.config.model_type
        self.layers_attr = layers_attr or DEFAULT_LAYERS_ATTR[self.kind]
        blocks = hf_model
        for attr in self.layers_attr.split("."):
            if not hasattr(blocks, attr):
                raise ValueError(f"layers_attr {self.layers_attr!r} does not resolve on a {self.kind} model")
            blocks = getattr(blocks, attr)
        self.blocks = blocks
        self.d_model = hf_model.get_input_embeddings().embedding_dim
        self.vocab_size = hf_model.get_input_embeddings().num_embeddings
        rotary = self._rotary()
        # plain attributes, which casts leave alone: the rotary buffers as built (fp32)
        self._rope_fp32 = {} if rotary is None else {
            name: buf.detach().float().clone() for name, buf in rotary.named_buffers(recurse=False)
            if name.endswith("inv_freq")}

    def _rotary(self) -> nn.Module | None:
        return getattr(getattr(self.hf, "model", None), "rotary_emb", None)

    def _apply(self, fn, recurse=True):
        """Casts (model.to(torch.bfloat16), .half()) keep RoPE's inverse frequencies in fp32, as HF's from_config
        and from_pretrained with a dtype do: rounded to bf16 they turn the angle at position ~1000 by up to ~1.7
        rad, so a cast model would drift from a loaded one far beyond bf16 arithmetic."""
        out = super()._apply(fn, recurse)
        rotary = self._rotary()
        for name, fp32 in self._rope_fp32.items():
            setattr(rotary, name, fp32.to(getattr(rotary, name).device))
        return out

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def rope_depends_on_length(self, n: int) -> bool:
        """Whether a call over positions 0..n-1 rotates differently from a shorter one: HF's dynamic RoPE rescales
        its frequencies for calls longer than the original context (and keeps them for the next calls), longrope
        switches to its long factors there."""
        rotary = self._rotary()
        kind = getattr(rotary, "rope_type", None)
        if kind == "dynamic":
            return n > rotary.original_max_seq_len
        if kind == "longrope":
            params = getattr(self.config, "rope_parameters", None) or {}
            return n > (params.get("original_max_position_embeddings") or self.config.max_position_embeddings)
        return False

    @property
    def max_positions(self) -> int | None:
        """Hard limit of the position table (GPT-2); None for rotary bases."""
        return self.config.n_positions if self.kind == "gpt2" else None

    def extend_positions(self, extra: int) -> None:
        """GPT-2 `wrap_pos`: append `extra` learned rows to the position table for the memory tokens."""
        if self.kind != "gpt2":
            raise ValueError("armt config: wrap_pos applies only to GPT-2 bases (learned position table)")
        wpe = self.hf.transformer.wpe
        grown = nn.Embedding(wpe.num_embeddings + extra, wpe.embedding_dim, dtype=wpe.weight.dtype)
        with torch.no_grad():
            grown.weight[: wpe.num_embeddings] = wpe.weight
        self.hf.transformer.wpe = grown

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings: [B, T] -> [B, T, d]."""
        return self.hf.get_input_embeddings()(ids)

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)

    def begin(
        self, x: torch.Tensor, position_ids: torch.Tensor, cache: DynamicCache | None = None
    ) -> tuple[torch.Tensor, SegmentContext]:
        """Input embeddings [B, T, d] -> layer-0 hidden states and the shared block context."""
        # The mask comes from HF itself; position_ids are withheld on purpose, because HF reads a jump in them as
        # packed sequences, while the memory tokens of GPT-2 `wrap_pos` jump to the end of the table and must
        # still attend causally to the whole segment.
        mask = create_causal_mask(config=self.config, inputs_embeds=x, attention_mask=None, cache=cache)
        rope = self.rope(x, position_ids)
        return self.position_input(x, position_ids), SegmentContext(mask, position_ids, rope, cache)

    def position_input(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Layer-0 input: GPT-2 adds its learned positions (and embedding dropout); LLaMA's are rotary."""
        if self.kind == "gpt2":
            return self.hf.transformer.drop(x + self.hf.transformer.wpe(position_ids))
        return x

    def rope(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(cos, sin) [1, T, head_dim] for rotary bases, None for GPT-2."""
        return None if self.kind == "gpt2" else self.hf.model.rotary_emb(x, position_ids=position_ids)

    def stacked_weights(self) -> dict:
        """Every block's weights stacked over layers as [L, in, out] (plus norms and biases) for batched matmuls.

        Names follow the block math in model/stacked.py; q/k/v are fused into one matmul (GPT-2's c_attn already is).
        """
        from .stacked import stack_gpt2, stack_llama

        return stack_gpt2(self.blocks, self.config) if self.kind == "gpt2" else stack_llama(self.blocks, self.config)

    def block(self, i: int, h: torch.Tensor, ctx: SegmentContext) -> torch.Tensor:
        """Decoder block i: [B, T, d] -> [B, T, d]."""
        use_cache = ctx.cache is not None
        if self.kind == "gpt2":
            return self.blocks[i](h, cache=ctx.cache, attention_mask=ctx.mask, use_cache=use_cache)
        return self.blocks[i](
            h,
            attention_mask=ctx.mask,
            position_ids=ctx.position_ids,
            cache=ctx.cache,
            use_cache=use_cache,
            position_embeddings=ctx.rope,
        )

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + lm_head: [B, T, d] -> [B, T, V]."""
        norm = self.hf.transformer.ln_f if self.kind == "gpt2" else self.hf.model.norm
        return self.hf.get_output_embeddings()(norm(h))
