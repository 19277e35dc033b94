"""The `armt` command line on a real model directory."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from model.weights import DEFAULT_MODEL_DIR
from service.cli import app
from tests.conftest import build_reference, write_official


def test_info_and_generate(tmp_path):
    directory = write_official(build_reference("llama"), tmp_path / "m")
    runner = CliRunner()
    info = runner.invoke(app, ["info", str(directory)])
    assert info.exit_code == 0, info.output
    assert json.loads(info.output)["layers"] == 3
    (tmp_path / "ctx.txt").write_text(" ".join(str(i % 90) for i in range(55)))
    out = runner.invoke(app, ["generate", str(directory), "--prompt", "1 2 3", "--context", str(tmp_path / "ctx.txt"),
                              "--max-new-tokens", "4"])
    assert out.exit_code == 0, out.output
    assert len(out.stdout.split("\n")[0].split()) == 4


def test_missing_directory_is_a_clean_error(tmp_path):
    result = CliRunner().invoke(app, ["info", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_ca_training_continues_from_init(tmp_path):
    """--init on the CA task loads the model trained before (it used to be ignored for a fresh one)."""
    runner = CliRunner()
    tiny = ["--task", "ca", "--arch", "armt", "--hidden", "32", "--heads", "2", "--ffn", "64", "--num-mem-tokens", "4",
            "--d-mem", "8", "--batch-size", "2", "--max-steps", "1", "--warmup", "1", "--ca-context"]
    first = runner.invoke(app, ["train", "--out", str(tmp_path / "a"), "--layers", "2", *tiny])
    assert first.exit_code == 0, first.output
    second = runner.invoke(app, ["train", "--out", str(tmp_path / "b"), "--layers", "3", "--init",
                                 str(tmp_path / "a" / "model"), *tiny])
    assert second.exit_code == 0, second.output
    assert json.loads((tmp_path / "b" / "model" / "config.json").read_text())["num_hidden_layers"] == 2
    bad = runner.invoke(app, ["train", "--out", str(tmp_path / "c"), "--init", str(tmp_path), *tiny],
                        env={"COLUMNS": "400"})  # rich wraps (or cuts) the message at the terminal's width
    assert bad.exit_code == 2 and "not an ARMT" in bad.output, bad.output


def test_memory_streams_are_a_remember_option(tmp_path):
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path), "--task", "qa1", "--stream-max", "64"])
    assert result.exit_code == 2 and "--stream-max" in result.output and "remember" in result.output
    assert not (tmp_path / "train_log.jsonl").exists()


def test_bench_ingest_writes_ratios_exactness_and_bf16_drift(tmp_path):
    """`armt bench ingest` on the small preset: every path timed, the ratios, the fp32 exactness and the bf16 drift
    in its JSON."""
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "ingest", "--segments", "2", "--sessions", "2", "--session-segments",
                                      "1", "--repeats", "1", "--drift-segments", "2", "--out", str(out),
                                      "--plot", str(tmp_path / "bench.png")])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    row = data["lengths"][0]
    assert row["tokens"] == 128 and row["diagonal_over_sequential"] > 0 and row["diagonal_over_base"] > 0
    assert data["sessions"]["shared_over_one_by_one_sequential"] > 0
    drift = data["bf16_drift"]
    assert 0 < drift["logits_relative"] < 0.1 and 0.5 < drift["top1_agreement"] <= 1.0
    exact = data["fp32_exactness"]  # float32 figures: plumbing only (~1e-6 here; rounding is the machine's)
    assert exact["segments"] == 2 and exact["diagonal_vs_sequential_relative"] < 1e-4
    assert 0 < exact["sequential_vs_float64_relative"] < 1e-4 and 0 < exact["diagonal_vs_float64_relative"] < 1e-4
    assert exact["diagonal_vs_sequential_float64_relative"] < 1e-12


def test_exactness_script_on_a_preset_and_a_model_directory(tmp_path, capsys):
    """bench/exactness.py (README "Executors"): one line per length, float64 executors within 1e-12 (the float32
    bounds, 1e-4, only check the plumbing: ~1e-6 on these models)."""
    from bench import exactness

    directory = write_official(build_reference("llama", segment_size=10, value_std=0.05), tmp_path)
    exactness.main(["--preset", "small", "--segments", "2"])
    exactness.main(["--model", str(directory), "--segments", "1,3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["small, 2 segments", f"{directory}, 1 segment",
                                                     f"{directory}, 3 segments"]
    for line in lines:
        figures = [float(word.rstrip(";,")) for word in line.split(":", 1)[1].split() if word[0].isdigit()]
        assert len(figures) == 4 and max(figures[:3]) < 1e-4 and figures[3] <= 1e-12


def test_bench_graphs_need_cuda():
    result = CliRunner().invoke(app, ["bench", "ingest", "--graphs"])
    assert result.exit_code == 2
    assert "--graphs needs --device cuda" in result.output


def test_text_training_in_bf16_with_the_default_probe(tmp_path):
    """--bf16 casts the model; the probe (on by default) must follow it (it stayed fp32: a dtype error at step 1)."""
    tiny = ["--minutes", "1", "--max-steps", "2", "--batch-size", "2", "--aux-batch-size", "0", "--copy-batch-size",
            "0", "--layers", "2", "--hidden", "32", "--heads", "2", "--ffn", "64", "--num-mem-tokens", "4",
            "--d-mem", "8", "--segment-size", "32", "--vocab", "400", "--warmup", "2"]
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "bf16"), "--stages", "0,1", "--probe-layer",
                                      "1", "--bf16", *tiny])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "bf16" / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("args", [
    ["init-random", "{tmp}/m", "--vocab", "200", "--tokenizer"],  # a byte-level BPE has >= 258 tokens
    ["init-random", "{tmp}/m", "--hidden", "100"],
    ["init-random", "{tmp}/m", "--segment-size", "0"],
    ["generate", "{model}", "--prompt", "1", "--context", "{tmp}/nope.txt"],
    ["generate", "{model}", "--prompt", "1", "--context", "{tmp}/latin1.txt"],
    ["info", "{tmp}/truncated"],
    ["info", "{tmp}/latin1.txt"],  # a file, not a directory
    ["init-random", "{tmp}/m", "--vocab", "0"],  # wrote a model that could never generate
    ["init-random", "{tmp}/m", "--base", "gpt2", "--segment-size", "2000"],  # more positions than GPT-2 has
    ["generate", "{model}", "--prompt", "1", "--context", "{tmp}/bad_ids.txt"],  # an id outside the vocabulary
])
def test_bad_arguments_and_files_are_clean_errors(tmp_path, args):
    model = write_official(build_reference("llama"), tmp_path / "model")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    truncated = tmp_path / "truncated"  # a weights file cut short (a failed download, a full disk)
    shutil.copytree(model, truncated)
    (truncated / "pytorch_model.bin").unlink()
    save_file({"x": torch.zeros(4)}, str(truncated / "model.safetensors"))
    (truncated / "model.safetensors").write_bytes((truncated / "model.safetensors").read_bytes()[:40])
    (tmp_path / "bad_ids.txt").write_text("1 2 99999")
    result = CliRunner().invoke(app, [a.format(tmp=tmp_path, model=model) for a in args])
    assert result.exit_code == 2 and "error:" in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


TINY_TEXT = ["--minutes", "1", "--max-steps", "1", "--batch-size", "2", "--aux-batch-size", "0",
             "--copy-batch-size", "0", "--layers", "2", "--hidden", "32", "--heads", "2", "--ffn", "64",
             "--num-mem-tokens", "4", "--d-mem", "8", "--segment-size", "32", "--vocab", "400", "--warmup", "1",
             "--probe-layer", "1"]


@pytest.mark.parametrize("args,hint", [
    (["--task", "foo"], "--task"),
    (["--stages", "abc"], "--stages"),
    (["--batch-size", "0"], "--batch-size"),
    (["--probe-layer", "2"], "--probe-layer"),  # a 2-layer model has blocks 0 and 1
    (["--task", "ca", "--ca-variant", "xx"], "--ca-variant"),
    (["--task", "ca", "--ca-k", "9"], "--ca-k"),
    (["--task", "ca", "--ca-variant", "oo", "--ca-k", "2"], "--ca-k"),  # O-O scores its four states
    (["--task", "ca", "--act", "--max-hop", "0"], "--max-hop"),
    (["--act", "--ponder-tau", "-1"], "--ponder-tau"),
    (["--act", "--ponder-tau", "nan"], "--ponder-tau"),
    (["--segment-size", "0"], "--segment-size"),
    (["--warmup", "-1"], "--warmup"),
    (["--task", "remember", "--questions", "6", "--stages", "0"], "--questions"),  # 7 pairs + 6 questions > 32
    (["--task", "remember", "--stages", "0,1,2", "--stream-max", "2"], "stream_max"),  # streams carrying nothing
    (["--lr", "-1"], "--lr"),  # was blamed on --probe-layer
    (["--lr", "nan"], "--lr"),
    (["--minutes", "-1"], "--minutes"),  # trained 0 steps, saved that model, exit 0
    (["--questions", "0"], "--questions"),  # trained with 4
    (["--aux-batch-size", "-1"], "--aux-batch-size"),
    (["--num-mem-tokens", "-1"], "--num-mem-tokens"),
    (["--d-mem", "0"], "--d-mem"),
    (["--ask-past", "5"], "--ask-past"),
    (["--arch", "plain"], "--arch"),  # a CA option on a text task did nothing
    (["--ca-variant", "shift"], "--ca-variant"),
    (["--device", "bogus"], "--device"),
    (["--export", "{tmp}/file.txt"], "--export"),  # failed after the whole training
])
def test_bad_training_options_are_clean_errors(tmp_path, args, hint):
    (tmp_path / "file.txt").write_text("x")
    args = [a.format(tmp=tmp_path) for a in args]
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "run"), *TINY_TEXT, *args],
                                env={"COLUMNS": "400"})
    assert result.exit_code == 2 and hint in result.output, result.output
    assert not (tmp_path / "run" / "model").exists()  # refused before any work


@pytest.mark.parametrize("args,hint", [(["--samples", "0"], "--samples"), (["--segments", "0"], "--segments"),
                                       (["--batch-size", "0"], "--batch-size"),
                                       (["--executor", "bogus"], "--executor"), (["--split", "foo"], "--split")])
def test_bad_eval_options_are_clean_errors(tmp_path, args, hint):
    result = CliRunner().invoke(app, ["eval", "--out", str(tmp_path / "e.json"), *args])
    assert result.exit_code == 2 and hint in result.output, result.output


@pytest.mark.parametrize("args,hint", [(["--out", "{tmp}"], "is a directory"),
                                       (["--plot", "{tmp}/file.txt/x.png"], "cannot be created")])
def test_eval_output_paths_are_checked_before_the_evaluation(tmp_path, args, hint):
    """A directory as --out failed after the whole evaluation had run: its results were lost."""
    (tmp_path / "file.txt").write_text("x")
    result = CliRunner().invoke(app, ["eval", "--segments", "1", "--samples", "1",
                                      *[a.format(tmp=tmp_path) for a in args]], env={"COLUMNS": "400"})
    assert result.exit_code == 2 and hint in result.output, result.output
    assert "exact match" not in result.output  # nothing was evaluated


@pytest.mark.parametrize("args,hint", [(["--segments", "abc"], "--segments"), (["--segments", "-1"], "--segments"),
                                       (["--repeats", "0"], "--repeats"), (["--device", "bogus"], "--device")])
def test_bad_bench_options_are_clean_errors(args, hint):
    result = CliRunner().invoke(app, ["bench", "ingest", *args], env={"COLUMNS": "400"})
    assert result.exit_code == 2 and hint in result.output, result.output


def _ca_model(tmp_path, name: str, *args: str):
    tiny = ["--task", "ca", "--layers", "2", "--hidden", "32", "--heads", "2", "--ffn", "64", "--num-mem-tokens",
            "4", "--d-mem", "8", "--batch-size", "2", "--max-steps", "1", "--warmup", "1", "--minutes", "1"]
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / name), *tiny, *args])
    assert result.exit_code == 0, result.output
    return str(tmp_path / name / "model")


def test_ca_eval_options_are_clean_errors(tmp_path):
    """Each of these raised a traceback (exit 1), or evaluated the shipped text model on CA, or silently scored a
    mix of horizons under the k asked for."""
    plain, act = _ca_model(tmp_path, "plain", "--arch", "plain"), _ca_model(tmp_path, "act", "--act", "--max-hop", "2")
    runner, out = CliRunner(), ["--samples", "2", "--out", str(tmp_path / "e.json")]
    for args, hint in ((["--task", "ca", *out], "MODEL_DIR"),
                       ([act, "--task", "ca", "--ca-k", "7", *out], "--ca-k"),
                       ([act, "--task", "ca", "--ca-variant", "bogus", *out], "--ca-variant"),
                       ([plain, "--task", "ca", "--max-hop", "2", *out], "adaptive computation"),
                       ([plain, "--task", "ca", "--ca-variant", "oo", *out], "does not fit"),
                       ([plain, "--task", "ca", "--act-threshold", "0.5", *out], "adaptive computation"),
                       ([act, "--task", "ca", "--act-threshold", "2", *out], "act_threshold"),
                       (["--task", "qa1", "--max-hop", "2", *out], "--task ca only"),
                       (["--task", "qa1", "--act-fixed", *out], "--task ca only"),
                       ([act, "--task", "ca", "--segments", "2", *out], "--segments"),  # were ignored silently
                       ([act, "--task", "ca", "--no-memory", *out], "--no-memory"),
                       ([act, "--task", "ca", "--plot", str(tmp_path / "p.png"), *out], "--plot")):
        result = runner.invoke(app, ["eval", *args], env={"COLUMNS": "400"})
        assert result.exit_code == 2 and hint in result.output, (args, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit)
    shift = runner.invoke(app, ["eval", act, "--task", "ca", "--ca-variant", "shift", "--max-hop", "1,2", *out])
    assert shift.exit_code == 0, shift.output
    rows = json.loads((tmp_path / "e.json").read_text())["rows"]
    assert [(r["k"], r["max_hop"]) for r in rows] == [(k, h) for k in (1, 2, 3, 4) for h in (1, 2)]
    knobs = runner.invoke(app, ["eval", act, "--task", "ca", "--act-threshold", "0.5", "--act-fixed", *out])
    assert knobs.exit_code == 0, knobs.output
    row = json.loads((tmp_path / "e.json").read_text())["rows"][0]
    assert row["act_threshold"] == 0.5 and row["act_fixed"] is True and row["mean_hops"] == 2.0  # max_hop 2
    assert row["mean_remainder"] == 0.0
    assert torch.is_grad_enabled()  # eval ran in this process: it must not leave autograd off for what follows


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    runner, out = CliRunner(), str(tmp_path / "run")
    first = runner.invoke(app, ["train", "--out", out, "--stages", "0,1", *TINY_TEXT])
    assert first.exit_code == 0, first.output
    assert (tmp_path / "run" / "checkpoint" / "trainer.pt").is_file()
    again = runner.invoke(app, ["train", "--out", out, "--stages", "0,1", "--resume", *TINY_TEXT, "--max-steps", "2"])
    assert again.exit_code == 0, again.output  # the budgets may change
    # qa2 on the dense stage only: no 2-fact document fits the 17-token shortest stage-1 documents of 32-token segments
    for change, name in ((["--task", "qa2", "--stages", "0"], "task"), (["--hidden", "64"], "shape")):
        other = runner.invoke(app, ["train", "--out", out, "--stages", "0,1", "--resume", *TINY_TEXT, *change])
        assert other.exit_code == 2 and "another" in other.output and name in other.output, other.output


def test_serve_stops_at_once_on_a_missing_model_or_a_data_directory_in_use(tmp_path):
    """Either would leave a started server answering 503 forever."""
    from service.core.store import lock_data_directory

    runner = CliRunner()
    missing = runner.invoke(app, ["serve", "--model", str(tmp_path / "nope"), "--port", "1"])
    assert missing.exit_code == 2 and "not an ARMT model directory" in missing.output
    model = write_official(build_reference("llama"), tmp_path / "model")
    held = lock_data_directory(tmp_path)  # another server owns this data directory
    try:
        busy = runner.invoke(app, ["serve", "--model", str(model), "--port", "1"], env={"ARMT_DATA_DIR": str(tmp_path)})
        assert busy.exit_code == 2 and "another process" in busy.output, busy.output
    finally:
        held.close()


def test_serve_stops_at_once_on_a_data_directory_that_cannot_be_made(tmp_path):
    model = write_official(build_reference("llama"), tmp_path / "model")
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(app, ["serve", "--model", str(model), "--port", "1"],
                                env={"ARMT_DATA_DIR": str(tmp_path / "file")})
    assert result.exit_code == 2 and "cannot use data directory" in result.output, result.output


def test_client_command_mistakes_are_clean_errors():
    """A malformed --url and a non-finite --temperature ended in tracebacks (httpx's, and its JSON encoder's)."""
    runner = CliRunner()
    for args, hint in ((["sessions", "--url", "http://[::1"], "bad --url"),
                       (["ask", "s", "q", "--temperature", "nan"], "--temperature")):
        result = runner.invoke(app, args, env={"COLUMNS": "400"})
        assert result.exit_code == 2 and hint in result.output, result.output


def test_an_unhandled_os_or_value_error_is_one_line_from_the_entry_point(tmp_path):
    """The `armt` script's net for mistakes no command caught (init-random onto an existing file, say)."""
    import subprocess
    import sys

    (tmp_path / "file").write_text("x")
    run = subprocess.run([sys.executable, "-m", "service.cli", "init-random", str(tmp_path / "file")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1].startswith("error: "), run.stderr
    assert "Traceback" not in run.stderr


def test_client_commands_say_what_to_do_when_no_server_answers():
    from tests.service_helpers import free_port

    url = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(app, ["sessions", "--url", url])
    assert result.exit_code == 1 and url in result.output and "armt serve" in result.output, result.output


def test_ask_says_when_the_answer_stream_ends_early(monkeypatch):
    """A stream that stopped between two events (the server went away) exited 0 with half an answer."""
    from service.client import ArmtClient

    monkeypatch.setattr(ArmtClient, "ask_stream", lambda self, *a, **k: iter([{"event": "token", "text": "Mary"}]))
    result = CliRunner().invoke(app, ["ask", "s", "q"])
    assert result.exit_code == 1 and "ended before its last event" in result.output, result.output


def test_ca_eval_refuses_a_text_model(tmp_path):
    """The shipped text model scored on cellular automata: meaningless rows, exit 0."""
    from model import default_model_path

    result = CliRunner().invoke(app, ["eval", str(default_model_path()), "--task", "ca", "--samples", "2", "--out",
                                      str(tmp_path / "e.json")])
    assert result.exit_code == 2 and "not a cellular-automata model" in result.output, result.output


def test_ca_training_refuses_a_segment_size_it_would_ignore_and_a_text_model(tmp_path):
    """A new CA model's segments follow its layout (--segment-size was dropped silently); --init of a text model
    trained, then failed its validation check and `armt eval --task ca`."""
    runner, env = CliRunner(), {"COLUMNS": "400"}
    seg = runner.invoke(app, ["train", "--out", str(tmp_path / "a"), "--task", "ca", "--segment-size", "30"], env=env)
    assert seg.exit_code == 2 and "--segment-size" in seg.output and "layout" in seg.output, seg.output
    text = runner.invoke(app, ["train", "--out", str(tmp_path / "b"), "--task", "ca", "--max-steps", "1",
                               "--init", str(DEFAULT_MODEL_DIR)], env=env)
    assert text.exit_code == 2 and "--init" in text.output and "not a cellular-automata model" in text.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b" / "model").exists()


@pytest.fixture()
def plain_hf_dir(tmp_path):
    """A plain HF LLaMA directory (no armt_config.json) with its tokenizer.json, as `--init` takes it."""
    from model.training import default_tokenizer, new_model

    tokenizer = default_tokenizer(400)
    hf = new_model(tokenizer, layers=2, hidden=32, heads=2, ffn=64, num_mem_tokens=4, d_mem=8, segment_size=32)
    hf.base.hf.save_pretrained(tmp_path / "hf")
    tokenizer.save(str(tmp_path / "hf" / "tokenizer.json"))
    return tmp_path / "hf"


def test_train_refuses_options_that_would_do_nothing_and_gives_a_plain_base_act(tmp_path, plain_hf_dir):
    """--ask-past outside remember and the ACT knobs without --act were ignored; --act with --init of a plain HF
    base was dropped (the run trained a model without ACT)."""
    runner, env = CliRunner(), {"COLUMNS": "400"}
    for args, hint in ((["--ask-past", "0.5"], "--ask-past"), (["--max-hop", "6"], "--max-hop"),
                       (["--act-fixed"], "--act-fixed")):
        result = runner.invoke(app, ["train", "--out", str(tmp_path / "x"), *TINY_TEXT, *args], env=env)
        assert result.exit_code == 2 and hint in result.output, (args, result.output)
    assert not (tmp_path / "x").exists()
    kept = runner.invoke(app, ["train", "--out", str(tmp_path / "y"), "--init", str(DEFAULT_MODEL_DIR), "--act",
                               *TINY_TEXT], env=env)
    assert kept.exit_code == 2 and "keeps its own ACT setting" in kept.output, kept.output
    act = runner.invoke(app, ["train", "--out", str(tmp_path / "act"), "--init", str(plain_hf_dir), "--act",
                              "--max-hop", "3", "--stages", "0", *TINY_TEXT])
    assert act.exit_code == 0, act.output
    saved = json.loads((tmp_path / "act" / "model" / "armt_config.json").read_text())
    assert saved["act"] is True and saved["max_hop"] == 3


def test_bench_keeps_what_it_measured_when_the_drift_check_fails(tmp_path, monkeypatch, capsys):
    """The JSON is written after each part: on the one-shot GPU run the fp32 rebuild for the drift check is the
    likeliest to fail, and it used to take every measured length with it."""
    from model import bench

    def out_of_memory(*args):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(bench, "bf16_drift", out_of_memory)
    monkeypatch.setattr(bench, "fp32_exactness", out_of_memory)
    out = tmp_path / "b.json"
    bench.run("small", [1], bench.Options(sessions=2, session_segments=1, repeats=1, drift_segments=1), out=out)
    data = json.loads(out.read_text())
    assert data["lengths"][0]["segments"] == 1 and data["sessions"]["default_lanes"] == 2
    assert data["bf16_drift"] == {"error": "RuntimeError: CUDA out of memory"} and data["peak_rss_bytes"] > 0
    printed = capsys.readouterr().out
    assert "shared pipeline (2 lanes)" in printed and "bf16 drift not measured: RuntimeError" in printed
    assert data["fp32_exactness"] == data["bf16_drift"] and "fp32 exactness not measured: RuntimeError" in printed


def test_bench_rounds_rotate_which_path_runs_first():
    """Each round starts one path later, so that no path always runs right after the same one."""
    from model.bench import timed

    calls = []
    timed({name: (lambda name=name: calls.append(name)) for name in "abc"}, "cpu", repeats=3)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")  # the warm-ups, then three rounds
