"""Importer for the research repo's checkpoint layouts (RodkinIvan/associative-recurrent-memory-transformer).

V1 (the paper's code): keys under `memory_cell.`:
    memory_cell.memory                                   [M, d]
    memory_cell.model.<base key>                         with each block wrapped: <layers>.{i}.layer.<orig>
    memory_cell.model.<layers>.{i}.W_mq.weight           [d_mem, d]   (W_mk likewise; W_mv [d, d];
                                                          W_mb.weight [1, d], W_mb.bias [1])
    memory_cell.layers.{i}.*                             aliases of the wrapped blocks (same tensors; read
                                                          where a writer that drops shared tensors kept only them)
V2 (HF single-file ARMTForCausalLM): the same under `armt.memory_cell.`, plus an optional `sink` [1, d].
PEFT LoRA (either version): the base under `base_model.model.` (or the whole ARMT, `base_model.model.memory_cell.`),
adapted modules as
    <module>.base_layer.weight, <module>.lora_A.<adapter>.weight [r, in], <module>.lora_B.<adapter>.weight [out, r]
and merged here into plain base weights: W += (alpha / r) * B @ A.
"""
from __future__ import annotations

import re

import torch

PREFIXES = ("armt.memory_cell.", "memory_cell.")
MEMORY_PARAMS = {"W_mq.weight": "W_mq", "W_mk.weight": "W_mk", "W_mv.weight": "W_mv", "W_mb.weight": "W_mb",
                 "W_mb.bias": "b_mb"}
# Buffers that old transformers versions saved and current ones recompute.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
_LORA = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)\.[^.]+(\.weight)?$")


def is_official(state_dict: dict) -> bool:
    return any(k.startswith(PREFIXES) for k in state_dict)


def unwrap_peft(state_dict: dict) -> dict:
    """Keys of PEFT applied around the whole ARMT (`base_model.model.memory_cell...`) without that wrapper."""
    wrapper = "base_model.model."
    if state_dict and all(k.startswith(wrapper) for k in state_dict):
        unwrapped = {k[len(wrapper):]: v for k, v in state_dict.items()}
        if is_official(unwrapped):
            return unwrapped
    return state_dict


def layout_version(state_dict: dict) -> int | None:
    """2 when the keys exist only in V2 (the HF ARMTForCausalLM's `armt.` prefix, or a sink token), else None:
    `memory_cell.` keys alone may be either version, so the config has to say."""
    if any(k.startswith(PREFIXES[0]) or k.endswith("memory_cell.sink") for k in state_dict):
        return 2
    return None


def split_official(
    state_dict: dict, layers_attr: str, n_layers: int, d_model: int, d_mem: int
) -> tuple[dict, dict, dict]:
    """Official keys -> (base state dict under HF names, memory tensors stacked [L, ...], LoRA pieces)."""
    prefix = next(p for p in PREFIXES if any(k.startswith(p) for k in state_dict))
    block = re.compile(rf"^{re.escape(layers_attr)}\.(\d+)\.(.*)$")
    base, per_layer, lora, memory = {}, {}, {}, {}
    for key, tensor in state_dict.items():
        if not key.startswith(prefix):
            raise ValueError(f"checkpoint key {key!r} is outside the ARMT prefix {prefix!r}")
        rest = key[len(prefix):]
        if rest in ("memory", "sink"):
            memory[rest] = tensor
            continue
        if rest.endswith(IGNORED_SUFFIXES):
            continue  # recomputed buffers
        if rest.startswith("layers."):  # an alias of a wrapped block: used only where the block's key is missing
            rest = _alias_target(state_dict, prefix, layers_attr, rest[len("layers."):])
            if rest is None:
                continue
        if not rest.startswith("model."):
            raise ValueError(f"unexpected checkpoint key {key!r}")
        rest = rest[len("model."):]
        rest = rest.removeprefix("base_model.model.")  # PEFT wrapper
        match = block.match(rest)
        if match:
            i, inner = int(match.group(1)), match.group(2)
            if inner in MEMORY_PARAMS:
                per_layer.setdefault(MEMORY_PARAMS[inner], {})[i] = tensor
                continue
            if not inner.startswith("layer."):
                raise ValueError(f"unexpected key {key!r}: a wrapped block holds only `layer.` and W_m* weights")
            rest = f"{layers_attr}.{i}.{inner[len('layer.'):]}"
        lora_match = _LORA.match(rest)
        if lora_match:
            lora.setdefault(lora_match.group("module"), {})[lora_match.group("kind")] = tensor
            continue
        rest = rest.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        if ".original_module." in rest:
            continue  # PEFT keeps the untrained copy next to modules_to_save
        base[rest] = tensor
    shapes = {"W_mq": (d_mem, d_model), "W_mk": (d_mem, d_model), "W_mv": (d_model, d_model),
              "W_mb": (1, d_model), "b_mb": (1,)}
    memory.update(_stack_layers(per_layer, n_layers, shapes, f"{prefix}model.{layers_attr}"))
    return base, memory, lora


def _alias_target(state_dict: dict, prefix: str, layers_attr: str, inner: str) -> str | None:
    """`layers.{i}.X` -> `model.<layers_attr>.{i}.X`, or None when the checkpoint holds that key itself.

    The aliases are the same tensors as the wrapped blocks, and a writer that drops shared tensors (safetensors'
    save_model keeps the first name in sorted order) may keep only them.
    """
    for target in (f"model.{layers_attr}.{inner}", f"model.base_model.model.{layers_attr}.{inner}"):
        if prefix + target in state_dict:
            return None
    return f"model.{layers_attr}.{inner}"


def _stack_layers(per_layer: dict, n_layers: int, shapes: dict, where: str) -> dict:
    """Per-layer tensors -> one [L, ...] tensor per name, each layer's shape checked."""
    stacked = {}
    keys = {v: k for k, v in MEMORY_PARAMS.items()}
    for name, shape in shapes.items():
        layers = per_layer.get(name, {})
        missing = [i for i in range(n_layers) if i not in layers]
        if missing:
            raise ValueError(f"checkpoint lacks {name} for layers {missing} (the base has {n_layers} layers)")
        extra = sorted(set(layers) - set(range(n_layers)))
        if extra:
            raise ValueError(f"checkpoint has {name} for layers {extra} but the base has only {n_layers} layers")
        for i in range(n_layers):
            if tuple(layers[i].shape) != shape:
                raise ValueError(f"checkpoint key '{where}.{i}.{keys[name]}' has shape {tuple(layers[i].shape)} "
                                 f"but the model expects {shape}")
        stacked[name] = torch.stack([layers[i] for i in range(n_layers)])  # [L, ...]
    return stacked


# GPT-2's Conv1D modules store their weight [in, out]; PEFT runs LoRA on them with fan_in_fan_out whatever the
# adapter config says (and without it on a plain Linear such as lm_head, whatever it says).
CONV1D_MODULES = ("c_attn", "c_proj", "c_fc", "q_attn")


def merge_lora(base: dict, lora: dict, alpha: float | None, rslora: bool = False,
               alpha_pattern: dict | None = None) -> None:
    """Fold LoRA pairs into the base weights in place: W += scale * (B @ A), transposed where the weight is stored
    [in, out] (GPT-2's Conv1D) or is an embedding ([vocab, d]). scale = alpha / r, r from A's shape (so PEFT's
    rank_pattern needs nothing), alpha from PEFT's alpha_pattern where one of its keys matches the module."""
    if not lora:
        return
    if alpha is None:
        raise ValueError(
            "checkpoint holds LoRA weights but no lora_alpha is known: put an adapter_config.json (PEFT) "
            "or `lora_alpha` in armt_config.json next to it"
        )
    for module, parts in lora.items():
        a = parts.get("lora_A", parts.get("lora_embedding_A"))
        b = parts.get("lora_B", parts.get("lora_embedding_B"))
        if a is None or b is None:
            raise ValueError(f"LoRA module {module!r} has only {sorted(parts)}; it needs both A and B")
        key = f"{module}.weight"
        if key not in base:
            raise ValueError(f"LoRA module {module!r} has no base weight {key!r} in the checkpoint")
        r = a.shape[0]
        scale = _module_alpha(module, alpha, alpha_pattern or {}) / (r ** 0.5 if rslora else r)
        delta = b.float() @ a.float()  # [out, in] (embeddings: [d, vocab])
        if "lora_embedding_A" in parts or module.rsplit(".", 1)[-1] in CONV1D_MODULES:
            delta = delta.T
        weight = base[key]
        if tuple(delta.shape) != tuple(weight.shape):
            raise ValueError(
                f"LoRA update for {key!r} has shape {tuple(delta.shape)} but the weight has {tuple(weight.shape)}"
            )
        base[key] = (weight.float() + scale * delta).to(weight.dtype)


def _module_alpha(module: str, alpha: float, alpha_pattern: dict) -> float:
    """PEFT's rule: the first alpha_pattern key that matches the end of the module's name (a suffix or a regex),
    else lora_alpha."""
    for pattern, value in alpha_pattern.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return alpha
