"""With the memory path disabled, ARMT is exactly its Hugging Face base model."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from model import ArmtConfig, ArmtModel
from tests.conftest import VOCAB, tiny_config


def _armt_and_hf(kind: str, M: int, segment_size: int):
    cfg = tiny_config(kind)
    model = ArmtModel.from_config(cfg, ArmtConfig(num_mem_tokens=M, d_mem=8, segment_size=segment_size), seed=3)
    hf = AutoModelForCausalLM.from_config(cfg).eval()  # HF's default attention implementation
    hf.load_state_dict(model.base.hf.state_dict())
    return model, hf


@pytest.mark.parametrize("M", [0, 4])
def test_one_segment_equals_hf_base(kind, M):
    """On a session's first segment nothing is read, and memory tokens sit after the real tokens (causal)."""
    model, hf = _armt_and_hf(kind, M, segment_size=40)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    logits, states = model.forward_long(ids)
    assert_close(logits, hf(ids).logits, atol=1e-5, rtol=1e-5)
    assert len(states) == 2


def test_zero_value_projection_makes_every_segment_the_base(kind):
    """W_mv = 0 (the research init) writes nothing into A, so every segment reads zero: each segment's logits
    are the base model's logits on that segment alone, positions restarting at 0."""
    model, hf = _armt_and_hf(kind, M=4, segment_size=12)
    assert float(model.W_mv.detach().abs().max()) == 0.0
    ids = torch.randint(0, VOCAB, (1, 50), generator=torch.Generator().manual_seed(1))
    logits, state = model.forward_long(ids)
    expected = torch.cat([hf(ids[:, s : s + 12]).logits for s in range(0, 50, 12)], dim=1)
    assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert float(state.A.abs().max()) == 0.0 and float(state.z.abs().max()) > 0
