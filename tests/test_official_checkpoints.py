"""Official-layout checkpoints load and match the independent formula-level reference."""
from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from model import ArmtModel
from tests.conftest import LAYERS_ATTR, VOCAB, build_reference, write_official


def _ids(T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB - 2, (1, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("segment_size,T", [(10, 57), (7, 45), (16, 100)])
def test_v1_forward_long_matches_reference(kind, tmp_path, segment_size, T):
    ref = build_reference(kind, segment_size=segment_size)
    model = ArmtModel.from_pretrained(write_official(ref, tmp_path), device="cpu", dtype=torch.float32)
    ids = _ids(T)
    assert T % segment_size != 0 and T // segment_size >= 5  # >= 6 segments, a short last one
    expected = ref.forward_long(ids)
    logits, state = model.forward_long(ids, executor="sequential")
    assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    A_ref, z_ref = ref.memory_state()
    assert_close(state.A, A_ref, atol=1e-5, rtol=1e-5)
    assert_close(state.z, z_ref, atol=1e-5, rtol=1e-5)
    assert float(state.A.abs().max()) > 1e-3  # the memory path really was exercised


def test_memory_changes_logits(kind, tmp_path):
    """Sanity of the check above: the same tokens after a different history give different logits."""
    ref = build_reference(kind)
    model = ArmtModel.from_pretrained(write_official(ref, tmp_path))
    a, b = _ids(30, seed=1), _ids(30, seed=2)
    tail = _ids(10, seed=3)
    la, _ = model.forward_long(torch.cat([a, tail], 1))
    lb, _ = model.forward_long(torch.cat([b, tail], 1))
    assert (la[:, -10:] - lb[:, -10:]).abs().max() > 1e-3


@pytest.mark.parametrize("context_len,question_len", [(53, 6), (50, 10), (3, 4), (41, 19)])
def test_v1_generate_matches_official_generate(kind, tmp_path, context_len, question_len):
    ref = build_reference(kind, segment_size=10)
    model = ArmtModel.from_pretrained(write_official(ref, tmp_path))
    context, question = _ids(context_len, 5), _ids(question_len, 6)
    expected = ref.generate(torch.cat([context, question], 1), max_new_tokens=12)
    state = model.ingest(model.new_state(), context)
    got = list(model.generate(state, question, max_new_tokens=12))
    assert got == expected


def test_v1_safetensors_layout_and_aliases(kind, tmp_path):
    ref = build_reference(kind)
    directory = write_official(ref, tmp_path, fmt="safetensors")
    model = ArmtModel.from_pretrained(directory)
    ids = _ids(35)
    assert_close(model.forward_long(ids)[0], ref.forward_long(ids), atol=1e-5, rtol=1e-5)


def test_v2_with_sink_matches_reference(kind, tmp_path):
    ref = build_reference(kind, version=2, use_sink=True)
    model = ArmtModel.from_pretrained(write_official(ref, tmp_path, version=2, fmt="safetensors"))
    ids = _ids(47)
    assert_close(model.forward_long(ids)[0], ref.forward_long(ids), atol=1e-5, rtol=1e-5)
    context, question = _ids(33, 7), _ids(5, 8)
    expected = ref.generate(torch.cat([context, question], 1), max_new_tokens=8)
    assert list(model.generate(model.ingest(model.new_state(), context), question, max_new_tokens=8)) == expected


def test_v2_without_sink(tmp_path):
    ref = build_reference("llama", version=2)
    model = ArmtModel.from_pretrained(write_official(ref, tmp_path, version=2))
    ids = _ids(44)
    assert_close(model.forward_long(ids)[0], ref.forward_long(ids), atol=1e-5, rtol=1e-5)


def test_gpt2_wrap_pos_detected_from_position_table(tmp_path):
    ref = build_reference("gpt2", wrap_pos=True)
    model = ArmtModel.from_pretrained(write_official(ref, tmp_path))
    assert model.config.wrap_pos
    ids = _ids(45)
    assert_close(model.forward_long(ids)[0], ref.forward_long(ids), atol=1e-5, rtol=1e-5)


def _loraize(state: dict, prefix: str, targets: list[str], r: int, alpha: float, conv1d: tuple[str, ...] = (),
             alphas: dict | None = None) -> dict:
    """PEFT-wrap the base (`model.` -> `model.base_model.model.`) and split chosen weights W into
    base_layer W0 + lora_A/lora_B with W = W0 + alpha / r * B @ A (transposed for the modules named in conv1d,
    GPT-2's Conv1D, which store [in, out])."""
    out = {}
    g = torch.Generator().manual_seed(3)
    for key, w in state.items():
        rest = key[len(prefix):]
        if not rest.startswith("model."):
            out[key] = w
            continue
        new_key = prefix + "model.base_model.model." + rest[len("model."):]
        module = new_key.removesuffix(".weight")
        if not (key.endswith(".weight") and module.split(".")[-1] in targets):
            out[new_key] = w
            continue
        transposed = module.split(".")[-1] in conv1d
        out_f, in_f = (w.shape[1], w.shape[0]) if transposed else tuple(w.shape)
        A = torch.randn(r, in_f, generator=g) * 0.1
        B = torch.randn(out_f, r, generator=g) * 0.1
        delta = (alphas or {}).get(module.split(".")[-1], alpha) / r * (B @ A)  # [out, in]
        out[module + ".base_layer.weight"] = w - (delta.T if transposed else delta)
        out[module + ".lora_A.default.weight"] = A
        out[module + ".lora_B.default.weight"] = B
    return out


@pytest.mark.parametrize("kind,targets,conv1d", [("llama", ["q_proj", "v_proj", "down_proj"], ()),
                                                  ("gpt2", ["c_attn", "c_fc", "lm_head"], ("c_attn", "c_fc"))])
@pytest.mark.parametrize("peft_layers_attr", [False, True])
def test_lora_weights_are_merged(tmp_path, kind, targets, conv1d, peft_layers_attr):
    """The research configs of a PEFT-wrapped base name its blocks `base_model.model.<layers>`. A GPT-2 adapter
    says fan_in_fan_out, which PEFT applies to the Conv1D modules only: lm_head is a plain Linear [out, in]."""
    ref = build_reference(kind)
    extra = {"layers_attr": f"base_model.model.{LAYERS_ATTR[kind]}"} if peft_layers_attr else {}
    directory = write_official(ref, tmp_path, **extra)
    state = torch.load(directory / "pytorch_model.bin", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("memory_cell.layers.")}
    torch.save(_loraize(state, "memory_cell.", targets, r=4, alpha=16.0, conv1d=conv1d),
               directory / "pytorch_model.bin")
    (directory / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 16.0,
                                                               "fan_in_fan_out": kind == "gpt2"}))
    model = ArmtModel.from_pretrained(directory)
    ids = _ids(33)
    assert_close(model.forward_long(ids)[0], ref.forward_long(ids), atol=1e-5, rtol=1e-5)


def test_lora_alpha_per_module_from_peft_alpha_pattern(tmp_path):
    """PEFT's alpha_pattern gives some modules their own alpha: it was ignored (the wrong scale for those)."""
    ref = build_reference("llama")
    directory = write_official(ref, tmp_path)
    state = torch.load(directory / "pytorch_model.bin", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("memory_cell.layers.")}
    torch.save(_loraize(state, "memory_cell.", ["q_proj", "v_proj"], r=4, alpha=16.0, alphas={"v_proj": 4.0}),
               directory / "pytorch_model.bin")
    (directory / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 16.0,
                                                               "alpha_pattern": {"v_proj": 4.0}}))
    ids = _ids(33)
    assert_close(ArmtModel.from_pretrained(directory).forward_long(ids)[0], ref.forward_long(ids), atol=1e-5,
                 rtol=1e-5)


def test_lora_without_alpha_is_a_clear_error(tmp_path):
    ref = build_reference("llama")
    directory = write_official(ref, tmp_path)
    state = torch.load(directory / "pytorch_model.bin", weights_only=True)
    torch.save(_loraize(state, "memory_cell.", ["q_proj"], r=4, alpha=16.0),
               directory / "pytorch_model.bin")
    with pytest.raises(ValueError, match="lora_alpha"):
        ArmtModel.from_pretrained(directory)


def test_missing_key_names_key_and_shape(tmp_path):
    directory = write_official(build_reference("llama"), tmp_path)
    state = torch.load(directory / "pytorch_model.bin", weights_only=True)
    del state["memory_cell.model.model.layers.1.layer.mlp.up_proj.weight"]
    del state["memory_cell.layers.1.layer.mlp.up_proj.weight"]  # its alias would stand in for it
    torch.save(state, directory / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\(64, 32\)"):
        ArmtModel.from_pretrained(directory)


def test_misshaped_key_names_both_shapes(tmp_path):
    directory = write_official(build_reference("gpt2"), tmp_path)
    state = torch.load(directory / "pytorch_model.bin", weights_only=True)
    state["memory_cell.model.transformer.h.0.W_mk.weight"] = torch.zeros(9, 32)
    torch.save(state, directory / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"h\.0\.W_mk\.weight'.*\(9, 32\).*\(8, 32\)"):
        ArmtModel.from_pretrained(directory)


def test_missing_memory_layer_is_named(tmp_path):
    directory = write_official(build_reference("llama"), tmp_path)
    state = torch.load(directory / "pytorch_model.bin", weights_only=True)
    del state["memory_cell.model.model.layers.2.W_mv.weight"]
    del state["memory_cell.layers.2.W_mv.weight"]
    torch.save(state, directory / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"W_mv for layers \[2\]"):
        ArmtModel.from_pretrained(directory)


@pytest.mark.parametrize("use_sink", [False, True])
def test_v2_layout_without_armt_version_loads_as_v2(tmp_path, use_sink):
    """The research repo's configs have no armt_version: the `armt.` prefix (and a sink) exist only in V2."""
    ref = build_reference("llama", version=2, use_sink=use_sink)
    directory = write_official(ref, tmp_path, version=2, fmt="safetensors")
    config = json.loads((directory / "armt_config.json").read_text())
    del config["armt_version"]
    (directory / "armt_config.json").write_text(json.dumps(config))
    model = ArmtModel.from_pretrained(directory)
    assert model.config.armt_version == 2
    ids = _ids(33)
    assert_close(model.forward_long(ids, executor="diagonal")[0], ref.forward_long(ids), atol=1e-5, rtol=1e-5)


def _hf_armt_directory(ref, directory):
    """What the HF single-file ARMTForCausalLM saves: its ARMTConfig as config.json (model_type "armt", the base's
    config nested), the `armt.memory_cell.` weights, no armt_config.json."""
    write_official(ref, directory, version=2, fmt="safetensors")
    base = json.loads((directory / "config.json").read_text())
    armt = json.loads((directory / "armt_config.json").read_text())
    (directory / "armt_config.json").unlink()
    config = {"model_type": "armt", "architectures": ["ARMTForCausalLM"], "transformers_version": "4.46.0",
              "base_model_name": None, "base_model_config": base, "layers_attr": "model.layers",
              "segment_alignment": "left", "sliding_window": False, "attend_to_previous_input": False,
              "wrap_pos": False, "n_heads": 1, "use_denom": True, "gating": False, "freeze_mem": False,
              "act_on": False, "max_hop": 4, **{k: v for k, v in armt.items() if k != "armt_version"}}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_hf_armt_directory_loads(tmp_path):
    from model.config import is_armt_directory

    ref = build_reference("llama", version=2, use_sink=True)
    directory = _hf_armt_directory(ref, tmp_path)
    assert is_armt_directory(directory)  # the trainer's loader takes it as an ARMT, not as a plain base
    model = ArmtModel.from_pretrained(directory)
    assert (model.config.armt_version, model.config.use_sink, model.base.kind) == (2, True, "llama")
    ids = _ids(47)
    for executor in ("sequential", "diagonal"):
        assert_close(model.forward_long(ids, executor=executor)[0], ref.forward_long(ids), atol=1e-5, rtol=1e-5)
    context, question = _ids(33, 7), _ids(5, 8)
    expected = ref.generate(torch.cat([context, question], 1), max_new_tokens=8)
    assert list(model.generate(model.ingest(model.new_state(), context), question, max_new_tokens=8)) == expected


def test_hf_armt_directory_without_base_config_is_a_clear_error(tmp_path):
    directory = _hf_armt_directory(build_reference("llama", version=2), tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config.update(base_model_config=None, base_model_name="meta-llama/Llama-3.2-1B")
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"base_model_name='meta-llama/Llama-3.2-1B'.*never downloaded"):
        ArmtModel.from_pretrained(directory)


def test_peft_around_the_whole_armt(tmp_path):
    ref = build_reference("gpt2")
    directory = write_official(ref, tmp_path)
    state = torch.load(directory / "pytorch_model.bin", weights_only=True)
    torch.save({f"base_model.model.{k}": v for k, v in state.items()}, directory / "pytorch_model.bin")
    ids = _ids(35)
    assert_close(ArmtModel.from_pretrained(directory).forward_long(ids)[0], ref.forward_long(ids),
                 atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("version", [1, 2])
def test_checkpoint_saved_without_shared_tensors(kind, tmp_path, version):
    """safetensors' save_model keeps one name per shared tensor, the first in sorted order: the blocks survive only
    as their `memory_cell.layers.{i}` aliases, and a tied GPT-2 keeps lm_head instead of its token embedding."""
    from safetensors import safe_open
    from safetensors.torch import save_model

    from tests.reference_armt import RefArmtV2

    ref = build_reference(kind, version=version)
    directory = write_official(ref, tmp_path, version=version, fmt="safetensors")
    save_model(RefArmtV2(ref) if version == 2 else ref, str(directory / "model.safetensors"))
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not any(".W_mq." in k and ".model." in k for k in keys)  # the memory weights only under their aliases
    if kind == "gpt2":  # tied: the token embedding only as lm_head
        assert not any(k.endswith("wte.weight") for k in keys) and any(k.endswith("lm_head.weight") for k in keys)
    ids = _ids(35)
    assert_close(ArmtModel.from_pretrained(directory).forward_long(ids)[0], ref.forward_long(ids),
                 atol=1e-5, rtol=1e-5)


def test_lora_on_the_head_of_a_tied_model_unties_it(tmp_path):
    """PEFT runs a LoRA on lm_head of a tied base (Llama-3.2-1B is tied) as head = W + BA while the embedding stays
    W: merged, the two are different matrices, and one shared tensor would change the embedding too."""
    ref = build_reference("llama", tie_word_embeddings=True)
    hf = ref.memory_cell.model
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    directory = write_official(ref, tmp_path)
    state = torch.load(directory / "pytorch_model.bin", weights_only=True)
    g = torch.Generator().manual_seed(5)
    A, B = torch.randn(4, 32, generator=g) * 0.1, torch.randn(VOCAB, 4, generator=g) * 0.1
    head = "memory_cell.model.lm_head"
    state[f"{head}.base_layer.weight"] = state.pop(f"{head}.weight")
    state[f"{head}.lora_A.default.weight"], state[f"{head}.lora_B.default.weight"] = A, B
    torch.save(state, directory / "pytorch_model.bin")
    (directory / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8.0}))
    model = ArmtModel.from_pretrained(directory)
    with torch.no_grad():  # the reference as PEFT runs it: its own head, the embedding unchanged
        hf.lm_head.weight = torch.nn.Parameter(hf.model.embed_tokens.weight + 2.0 * B @ A)
    assert not model.base.hf.config.tie_word_embeddings
    ids = _ids(33)
    assert_close(model.forward_long(ids)[0], ref.forward_long(ids), atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path / "saved")  # and it stays untied through the project format
    assert_close(ArmtModel.from_pretrained(tmp_path / "saved").forward_long(ids)[0], ref.forward_long(ids),
                 atol=1e-5, rtol=1e-5)


def test_d_mem_one_matches_the_reference(kind, tmp_path):
    """DPFP-3 of a 1-dimensional key rolls 2 features by 3 (mod 2): both executors failed on the empty window."""
    ref = build_reference(kind, d_mem=1)
    model = ArmtModel.from_pretrained(write_official(ref, tmp_path))
    ids = _ids(35)
    expected = ref.forward_long(ids)
    for executor in ("sequential", "diagonal"):
        assert_close(model.forward_long(ids, executor=executor)[0], expected, atol=1e-5, rtol=1e-5)


def test_dynamic_rope_longer_than_its_context_is_refused_by_the_diagonal_executor(tmp_path):
    """Dynamic RoPE rotates a call by its length: the diagonal executor's one table for every cell would rotate a
    short last segment like a full one (1.5e-4 off the reference); it says so instead."""
    rope = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}
    ref = build_reference("llama", max_position_embeddings=8, rope_parameters=rope)  # 10 + 4 memory > 8
    model = ArmtModel.from_pretrained(write_official(ref, tmp_path))
    ids = _ids(13)
    assert_close(model.forward_long(ids, executor="sequential")[0], ref.forward_long(ids), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="RoPE scaling"):
        model.forward_long(ids, executor="diagonal")
    longrope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 12,
                "short_factor": [1.0] * 4, "long_factor": [4.0] * 4}  # head_dim 8; 10 + 4 memory > 12: 3e-3 off
    model = ArmtModel.from_pretrained(write_official(build_reference("llama", rope_parameters=longrope),
                                                     tmp_path / "longrope"))
    with pytest.raises(ValueError, match="longrope"):
        model.forward_long(ids, executor="diagonal")
    short = build_reference("llama", max_position_embeddings=64, rope_parameters=rope)  # fits: no rescaling
    model = ArmtModel.from_pretrained(write_official(short, tmp_path / "short"))
    assert_close(model.forward_long(ids, executor="diagonal")[0], short.forward_long(ids), atol=1e-5, rtol=1e-5)
