"""Tiny random bases and official-layout checkpoints written by the tests themselves (no hub, no downloads)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from tests.reference_armt import RefArmt, RefArmtV2, RefCell  # noqa: E402

VOCAB = 101


def tiny_config(kind: str, **overrides):
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          eos_token_id=VOCAB - 1, bos_token_id=VOCAB - 2, tie_word_embeddings=False)
    else:
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=128,
                         eos_token_id=VOCAB - 1, bos_token_id=VOCAB - 1)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


LAYERS_ATTR = {"llama": "model.layers", "gpt2": "transformer.h"}


def build_reference(kind: str, M: int = 4, d_mem: int = 8, segment_size: int = 10, version: int = 1,
                    use_sink: bool = False, wrap_pos: bool = False, seed: int = 0, value_std: float = 0.3,
                    **overrides) -> RefArmt:
    """A reference ARMT with random, non-zero memory weights (W_mv included)."""
    torch.manual_seed(seed)
    cfg = tiny_config(kind, **overrides)
    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    cell = RefCell(hf, M, d_mem, LAYERS_ATTR[kind], version=version, use_sink=use_sink, wrap_pos=wrap_pos)
    with torch.no_grad():
        for layer in cell.layers:
            layer.W_mv.weight.normal_(0, value_std)  # the research init is zero: that would leave the memory unused
            layer.W_mq.weight.normal_(0, 0.3)
            layer.W_mk.weight.normal_(0, 0.3)
    return RefArmt(cell, segment_size).eval()


def write_official(ref: RefArmt, directory: Path, version: int = 1, fmt: str = "bin", **armt_extra) -> Path:
    """Write config.json + armt_config.json + the official state dict (pytorch_model.bin or model.safetensors)."""
    directory.mkdir(parents=True, exist_ok=True)
    cell = ref.memory_cell
    cell.model.config.save_pretrained(str(directory))
    layer0 = cell.layers[0]
    armt_cfg = {"num_mem_tokens": cell.M, "d_mem": layer0.W_mq.out_features, "segment_size": ref.segment_size,
                "armt_version": version, "correction": True, "use_sink": cell.use_sink, **armt_extra}
    (directory / "armt_config.json").write_text(json.dumps(armt_cfg))
    module = RefArmtV2(ref) if version == 2 else ref
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    if fmt == "bin":
        torch.save(state, directory / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    return directory


@pytest.fixture(params=["llama", "gpt2"])
def kind(request):
    return request.param


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny ARMT with a real byte-level BPE tokenizer, built once per test session (service tests)."""
    from tests.service_helpers import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One real redis-server for the run; tests take a database each through `redis_db`."""
    from tests.service_helpers import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


_next_db = iter(range(1, 64))


@pytest.fixture()
def redis_db(redis_server) -> str:
    """The URL of an empty Redis database of its own (the server has 64)."""
    return f"{redis_server.url}/{next(_next_db)}"
