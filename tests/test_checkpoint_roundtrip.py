"""The project's own format: save_pretrained -> from_pretrained is lossless; tied embeddings stay tied."""
from __future__ import annotations

import json
import subprocess
import sys

import torch
from torch.testing import assert_close

from model import ArmtConfig, ArmtModel
from tests.conftest import VOCAB, build_reference, tiny_config, write_official


def test_official_to_project_format_round_trip(kind, tmp_path):
    official = ArmtModel.from_pretrained(write_official(build_reference(kind), tmp_path / "official"))
    official.save_pretrained(tmp_path / "ours")
    ours = ArmtModel.from_pretrained(tmp_path / "ours")
    assert ours.fingerprint == official.fingerprint
    ids = torch.randint(0, VOCAB, (1, 44), generator=torch.Generator().manual_seed(0))
    assert_close(ours.forward_long(ids)[0], official.forward_long(ids)[0], atol=0, rtol=0)
    saved = json.loads((tmp_path / "ours" / "armt_config.json").read_text())
    assert saved["segment_size"] == 10 and saved["num_mem_tokens"] == 4


def test_tied_embeddings_are_tied(tmp_path):
    cfg = tiny_config("llama", tie_word_embeddings=True)
    model = ArmtModel.from_config(cfg, ArmtConfig(num_mem_tokens=2, d_mem=4, segment_size=8))
    model.save_pretrained(tmp_path)
    loaded = ArmtModel.from_pretrained(tmp_path)
    hf = loaded.base.hf
    assert hf.lm_head.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()


def test_the_fingerprint_tracks_what_the_base_config_computes(tmp_path):
    """The same weights under other heads, activation, norm epsilon or RoPE compute something else: a state of
    one must not be accepted by the other (the fingerprint named six base keys before 2026-12-02)."""
    armt = ArmtConfig(num_mem_tokens=2, d_mem=4, segment_size=8)
    ArmtModel.from_config(tiny_config("llama"), armt).save_pretrained(tmp_path / "a")
    names = {ArmtModel.from_pretrained(tmp_path / "a").fingerprint}
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    changes = [{"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}, {"hidden_act": "gelu"},
               {"rms_norm_eps": 1e-3}, {"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}]
    for i, change in enumerate(changes):
        directory = tmp_path / f"b{i}"
        ArmtModel.from_pretrained(tmp_path / "a").save_pretrained(directory)
        (directory / "config.json").write_text(json.dumps({**config, **change}))
        names.add(ArmtModel.from_pretrained(directory).fingerprint)
    assert len(names) == 1 + len(changes)


def test_fingerprint_tracks_weights(tmp_path):
    cfg = tiny_config("gpt2")
    a = ArmtModel.from_config(cfg, ArmtConfig(num_mem_tokens=2, d_mem=4, segment_size=8), seed=0)
    b = ArmtModel.from_config(cfg, ArmtConfig(num_mem_tokens=2, d_mem=4, segment_size=8), seed=1)
    assert a.fingerprint != b.fingerprint


def test_loads_offline_in_a_fresh_process(tmp_path):
    """HF_HUB_OFFLINE=1 and no network: everything comes from the directory."""
    write_official(build_reference("llama"), tmp_path)
    code = ("import torch; from model import ArmtModel; m = ArmtModel.from_pretrained(%r); "
            "print(m.forward_long([1, 2, 3])[0].shape)" % str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert "torch.Size([1, 3, 101])" in out.stdout


def test_unsupported_base_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    (tmp_path / "armt_config.json").write_text(json.dumps({"num_mem_tokens": 1, "d_mem": 2, "segment_size": 4}))
    import pytest

    with pytest.raises(ValueError, match="not supported"):
        ArmtModel.from_pretrained(tmp_path)


def test_armt_config_errors_name_the_numbers(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="armt_version must be 1 or 2, got 3"):
        ArmtConfig(num_mem_tokens=1, d_mem=2, segment_size=4, armt_version=3)
    with pytest.raises(ValueError, match="lacks required keys: d_mem"):
        ArmtConfig.from_dict({"num_mem_tokens": 1, "segment_size": 4})
    with pytest.raises(ValueError, match="segment_alignment='left'.*'right'"):
        ArmtConfig.from_dict({"num_mem_tokens": 1, "d_mem": 2, "segment_size": 4, "segment_alignment": "right"})
    with pytest.raises(ValueError, match="sliding_window=true is not supported"):
        ArmtConfig.from_dict({"num_mem_tokens": 1, "d_mem": 2, "segment_size": 4, "sliding_window": True})
    cfg = tiny_config("gpt2")
    with pytest.raises(ValueError, match="needs 132 positions.*n_positions=128"):
        ArmtModel.from_config(cfg, ArmtConfig(num_mem_tokens=4, d_mem=2, segment_size=128))


def test_the_fingerprint_does_not_depend_on_the_load_dtype(tmp_path):
    """A service restarted with another ARMT_DTYPE keeps its sessions: the same weights name the same model."""
    from model import ArmtModel, default_model_path

    fp32 = ArmtModel.from_pretrained(default_model_path())
    bf16 = ArmtModel.from_pretrained(default_model_path(), dtype=torch.bfloat16)
    assert fp32.fingerprint == bf16.fingerprint


def test_a_model_changed_in_place_and_saved_keeps_the_fingerprint_of_its_files(tmp_path):
    """Training changes weights in place; the saved copy and the model in memory must name the same model, so
    that states written by one are accepted by the other."""
    from model import ArmtModel, default_model_path

    model = ArmtModel.from_pretrained(default_model_path())
    with torch.no_grad():
        model.W_mv.add_(0.01)
    model.save_pretrained(tmp_path / "tuned")
    state = model.ingest(model.new_state(), list(range(100)))
    reloaded = ArmtModel.from_pretrained(tmp_path / "tuned")
    assert reloaded.fingerprint == model.fingerprint
    reloaded.ingest(state, [1, 2])  # accepted


def test_states_of_the_fingerprint_earlier_versions_gave_a_model_stay_usable(tmp_path):
    """The digest changed (values at bf16 precision): sessions stored under the old name must not become 409s."""
    from model import ArmtModel, MemoryState, default_model_path
    from model.checkpoint import weights_digest
    from model.config import fingerprint

    model = ArmtModel.from_pretrained(default_model_path())
    base = model.base.config.to_dict()
    old = fingerprint(base, model.config, weights_digest(model, legacy=True), legacy=True)
    before = fingerprint(base, model.config, weights_digest(model), legacy=True)  # 2026-12-01: six base keys
    assert model.fingerprints == (model.fingerprint, before, old) and len(set(model.fingerprints)) == 3
    state = model.ingest(model.new_state(), list(range(70)))
    state.fingerprint = old  # as an earlier version wrote it
    state.save(tmp_path / "old.safetensors")
    loaded = MemoryState.load(tmp_path / "old.safetensors", fingerprint=model.fingerprints)
    assert model.ingest(loaded, [1, 2]).fingerprint == model.fingerprint  # accepted, and written under the new name


def test_a_damaged_weights_file_is_an_error_naming_it(tmp_path):
    """A truncated download must not end in a traceback from the reader (the CLI and the service print ValueError)."""
    import pytest

    from model.checkpoint import read_weights

    model = ArmtModel.from_config(tiny_config("llama"), ArmtConfig(num_mem_tokens=2, d_mem=4, segment_size=8))
    model.save_pretrained(tmp_path / "st")
    path = tmp_path / "st" / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors: damaged or truncated"):
        ArmtModel.from_pretrained(tmp_path / "st")
    directory = write_official(build_reference("gpt2"), tmp_path / "bin")
    path = directory / "pytorch_model.bin"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: damaged or truncated"):
        read_weights(directory)


def test_a_malformed_tokenizer_is_an_error_naming_it(tmp_path):
    import pytest

    model = ArmtModel.from_config(tiny_config("llama"), ArmtConfig(num_mem_tokens=2, d_mem=4, segment_size=8))
    model.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a valid tokenizers file"):
        ArmtModel.from_pretrained(tmp_path)


def test_armt_config_values_of_the_wrong_type_or_misspelt_keys_are_errors():
    """JSON written by hand: "false" (a string) is true in Python, and a misspelt flag was silently ignored."""
    import pytest

    base = {"num_mem_tokens": 2, "d_mem": 4, "segment_size": 8}
    for key, value, message in [("correction", "false", "correction must be true or false, got 'false'"),
                                ("use_sink", 1, "use_sink must be true or false, got 1"),
                                ("act_threshold", "0.9", "act_threshold must be in"),
                                ("layers_attr", 3, "layers_attr must be a dotted path string, got 3"),
                                ("corection", False, "unknown key 'corection'; did you mean 'correction'")]:
        with pytest.raises(ValueError, match=message):
            ArmtConfig.from_dict({**base, key: value})
    assert ArmtConfig.from_dict({**base, "max_n_segments": 8}).extra == {"max_n_segments": 8}  # research keys ride


def test_wrap_pos_on_a_llama_base_is_a_clear_error():
    import pytest

    with pytest.raises(ValueError, match="wrap_pos applies only to GPT-2"):
        ArmtModel.from_config(tiny_config("llama"), ArmtConfig(num_mem_tokens=2, d_mem=4, segment_size=8,
                                                               wrap_pos=True))


def test_a_v1_config_on_a_layout_that_exists_only_in_v2_is_refused(tmp_path):
    """The `armt.` prefix belongs to V2's HF ARMTForCausalLM: read as V1 it loaded without the L2 normalisation
    (logits 0.4 off)."""
    import pytest

    directory = write_official(build_reference("llama", version=2), tmp_path, version=2, fmt="safetensors")
    config = json.loads((directory / "armt_config.json").read_text())
    (directory / "armt_config.json").write_text(json.dumps({**config, "armt_version": 1}))
    with pytest.raises(ValueError, match="armt_version 1 but the weights are in a layout that exists only in "
                                         "version 2"):
        ArmtModel.from_pretrained(directory)


def test_a_plain_base_in_the_hubs_layouts_starts_a_training(tmp_path):
    """The hub's GPT-2 stores the bare model (`h.0...`, `wte.weight`: no `transformer.`, the head tied) with old
    `attn.bias` buffers; from_base (armt train --init) refused it for missing keys, though transformers loads it."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from model.checkpoint import from_base

    hf = AutoModelForCausalLM.from_config(tiny_config("gpt2"))
    hf.save_pretrained(tmp_path / "native")
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "config.json").write_text((tmp_path / "native" / "config.json").read_text())
    bare = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items()
            if k.startswith("transformer.")}
    bare["h.0.attn.bias"] = torch.ones(1, 1, 8, 8)
    save_file(bare, str(tmp_path / "hub" / "model.safetensors"))
    armt = ArmtConfig(num_mem_tokens=2, d_mem=4, segment_size=8)
    native, hub = from_base(tmp_path / "native", armt), from_base(tmp_path / "hub", armt)
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))
    assert_close(hub.forward_long(ids)[0], native.forward_long(ids)[0], atol=0, rtol=0)


def test_saving_a_model_without_a_tokenizer_leaves_no_earlier_one_behind(tmp_path):
    """A tokenizer.json of an earlier model in the directory loaded as this model's."""
    model = ArmtModel.from_config(tiny_config("llama"), ArmtConfig(num_mem_tokens=2, d_mem=4, segment_size=8))
    (tmp_path / "tokenizer.json").write_text("{}")
    model.save_pretrained(tmp_path)
    assert ArmtModel.from_pretrained(tmp_path).tokenizer is None
