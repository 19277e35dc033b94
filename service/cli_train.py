"""`armt train`: the curriculum trainer (model/training); `armt eval` is in service/cli_eval.py.

Registered on the `armt` app by service/cli.py.
"""
from __future__ import annotations

import math
import shutil
from contextlib import contextmanager
from pathlib import Path

import typer

from service.cli_options import CHOICES, TASKS, check_ca_k, check_device, int_list, refuse_given


def train(
    out: Path = typer.Option(Path("runs/train"), help="run directory: log, checkpoint, final model in OUT/model"),
    task: str = typer.Option("qa1", help="qa1 | qa2 | remember | ca (cellular automata; see --arch, --ca-k)"),
    init: Path = typer.Option(None, help="start from this local ARMT or plain HF LLaMA/GPT-2 directory (a plain one "
                                         "gets fresh memory shaped by --num-mem-tokens/--d-mem/--segment-size; "
                                         "task ca: a CA model trained before, whose shape wins over --arch etc.)"),
    minutes: float = typer.Option(45.0, help="training time budget (evaluation checks included)"),
    max_steps: int = 100_000,
    stages: str = typer.Option("0,1,2,4,8,16", help="curriculum in segments (0 = dense single segment)"),
    batch_size: int = 32,
    aux_batch_size: int = typer.Option(16, help="key-gap-value samples per step (0: off)"),
    copy_batch_size: int = typer.Option(8, help="prose-repeat (copy) samples per step (0: off)"),
    probe_layer: int = typer.Option(2, help="0-based block whose output the name-binding probe reads"),
    probe_weight: float = typer.Option(0.2, help="name-binding probe weight (0: off)"),
    lr: float = 1e-3,
    warmup: int = typer.Option(200, help="linear warm-up steps"),
    questions: int = typer.Option(None, help="questions per training document; default 4, and 1 for remember "
                                             "(each question takes the room of two key-value pairs)"),
    advance_at: float = typer.Option(0.9, help="curriculum: move to the next stage when the running and held-out "
                                               "accuracy reach this"),
    stage_minutes: float = typer.Option(0.0, help="curriculum: also advance after this many minutes in a stage "
                                                  "(0: only on accuracy)"),
    ask_past: float = typer.Option(0.0, help="remember: share of training questions about any pair but the last"),
    grad_segments: int = typer.Option(0, help="back-propagate through only the last N segments of a document (the "
                                              "earlier ones run without autograd); 0: all"),
    stream_max: int = typer.Option(0, min=0, help="remember, last stage: each batch row is a stream that carries "
                                                  "its memory to the next step, up to N segments long (0: off)"),
    layers: int = 4, hidden: int = 128, heads: int = 4, ffn: int = 512,
    num_mem_tokens: int = 16, d_mem: int = 32,
    segment_size: int = typer.Option(None, help="tokens per segment of a new memory: 64 for the text tasks (default); "
                                                "task ca with --init of a plain HF base (default 21, one state)"),
    vocab: int = 3000,
    seed: int = 0,
    resume: bool = typer.Option(False, help="continue OUT/checkpoint exactly"),
    device: str = "cpu",
    bf16: bool = typer.Option(False, help="bfloat16 weights (memory state stays fp32)"),
    export: Path = typer.Option(None, help="also copy the final model directory here (e.g. model/weights/default)"),
    arch: str = typer.Option("armt", help="task ca: armt (21-token segments + memory) or plain (one segment)"),
    ca_k: int = typer.Option(None, help="task ca: predict the state k steps ahead, 1..4 (os: default 1; shift: "
                                        "default a random k per sample; oo predicts the next four states)"),
    ca_variant: str = typer.Option("os", help="task ca: os | oo | shift"),
    ca_context: bool = typer.Option(False, help="task ca: also train on the given states s1..s9 (the logged "
                                                "accuracy stays the target's)"),
    act: bool = typer.Option(False, help="adaptive computation time in every layer (a new model, or new memory "
                                        "on a plain HF base given to --init)"),
    max_hop: int = typer.Option(4, help="ACT: most hops per layer"),
    act_fixed: bool = typer.Option(False, help="ACT: always run max_hop hops (fixed computation)"),
    ponder_tau: float = typer.Option(1e-3, help="ACT: weight of the ponder cost"),
) -> None:
    """Curriculum training with back-propagation through the memory (sequential order); see model/training."""
    options = dict(locals())  # the trainer's settings are the options named like TrainConfig's fields
    from model.training import write_log

    model, trainer, cfg = _trainer(options)
    params = sum(p.numel() for p in model.parameters())
    typer.echo(f"training {params:,} parameters on {task}, stages {cfg.stages}, {minutes} min budget -> {out}")
    with _progress_bar(trainer, minutes) as progress:
        trainer.run(write_log(out / "train_log.jsonl", trainer.state.step if resume else None), progress)
    _save(model, trainer, out, export)


def _trainer(o: dict):
    """The model (fresh, or --init) on its device and dtype, and its Trainer (resumed with --resume)."""
    import torch

    from model.tasks import Codec
    from model.training import Trainer

    cfg = _train_config(o)  # option errors before any work
    torch.manual_seed(o["seed"])
    model = _training_model(o)
    model = model.to(device=o["device"], dtype=torch.bfloat16 if o["bf16"] else torch.float32)
    try:
        trainer = Trainer(model, Codec(model.tokenizer) if model.tokenizer is not None else None, cfg, o["out"])
    except ValueError as e:  # e.g. a probe layer the model does not have
        raise typer.BadParameter(str(e), param_hint="--probe-layer") from e
    try:
        trainer.check_batches()
    except ValueError as e:  # e.g. remember with more questions than a segment holds
        raise typer.BadParameter(str(e), param_hint="--questions / --stages / --segment-size") from e
    try:
        resumed = o["resume"] and trainer.load_checkpoint()
    except ValueError as e:  # the checkpoint is of another run: other options or another model shape
        raise typer.BadParameter(str(e), param_hint="--resume") from e
    if o["resume"] and not resumed:
        typer.echo(f"error: no checkpoint in {o['out'] / 'checkpoint'}", err=True)
        raise typer.Exit(2)
    return model, trainer, cfg


def _train_config(options: dict):
    """The trainer's config from train()'s options of the same names, with the task's own rules: CA trains one
    fixed-length stage without auxiliary batches or the name-binding probe; remember asks one question per document
    (each takes the room of two pairs)."""
    from dataclasses import fields

    from model.training import TrainConfig

    _check_train_options(options)
    cfg = {f.name: options[f.name] for f in fields(TrainConfig) if f.name in options}
    if cfg["task"] == "ca":
        cfg.update(stages="1", aux_batch_size=0, copy_batch_size=0, probe_weight=0.0,
                   ca_k=check_ca_k(options["ca_k"], options["ca_variant"]))
    cfg["stages"] = int_list(cfg["stages"], "--stages", low=0)
    if cfg["questions"] is None:
        cfg["questions"] = 1 if cfg["task"] == "remember" else 4
    try:
        return TrainConfig(**cfg)
    except ValueError as e:  # the config's own checks (memory streams need task remember)
        raise typer.BadParameter(str(e), param_hint="--stream-max") from e


def _check_train_options(o: dict) -> None:
    """Clear errors for option values that would otherwise fail deep inside (or after minutes of setup)."""
    if o["task"] not in TASKS:
        raise typer.BadParameter(f"unknown task {o['task']!r}; one of {', '.join(TASKS)}", param_hint="--task")
    for name, choices in CHOICES.items():
        if o[name] not in choices:
            raise typer.BadParameter(f"{o[name]!r} is not one of {', '.join(choices)}",
                                     param_hint=f"--{name.replace('_', '-')}")
    if o["task"] == "ca":
        check_ca_k(o["ca_k"], o["ca_variant"])
    if o["warmup"] < 0:
        raise typer.BadParameter(f"must be >= 0, got {o['warmup']}", param_hint="--warmup")
    for name in ("batch_size", "layers", "hidden", "heads", "max_steps", "max_hop"):
        if o[name] < 1:
            raise typer.BadParameter(f"must be >= 1, got {o[name]}", param_hint=f"--{name.replace('_', '-')}")
    for name, low in (("segment_size", 1), ("questions", 1)):  # None: the task's default
        if o[name] is not None and o[name] < low:
            raise typer.BadParameter(f"must be >= {low}, got {o[name]}", param_hint=f"--{name.replace('_', '-')}")
    for name in ("aux_batch_size", "copy_batch_size", "grad_segments", "num_mem_tokens"):
        if o[name] < 0:
            raise typer.BadParameter(f"must be >= 0, got {o[name]}", param_hint=f"--{name.replace('_', '-')}")
    for name in ("d_mem", "ffn", "vocab"):
        if o[name] < 1:
            raise typer.BadParameter(f"must be >= 1, got {o[name]}", param_hint=f"--{name.replace('_', '-')}")
    _check_numbers(o)
    _check_ca_only(o)
    if o["task"] != "remember":
        refuse_given(train, "applies to --task remember only", ask_past=o["ask_past"])
    if not o["act"]:
        refuse_given(train, "applies to a model made with --act", max_hop=o["max_hop"], act_fixed=o["act_fixed"])
    check_device(o["device"])
    for name in ("out", "export"):
        if o[name] is not None and o[name].exists() and not o[name].is_dir():
            raise typer.BadParameter(f"{o[name]} is a file; a directory is needed", param_hint=f"--{name}")


def _check_numbers(o: dict) -> None:
    """The float options: finite, in their ranges (a negative --minutes trained 0 steps and saved that model)."""
    ranges = {"lr": (0, math.inf, False), "minutes": (0, math.inf, False), "ponder_tau": (0, math.inf, True),
              "probe_weight": (0, math.inf, True), "stage_minutes": (0, math.inf, True),
              "ask_past": (0, 1, True), "advance_at": (0, 1, False)}
    for name, (low, high, low_ok) in ranges.items():
        value = o[name]
        if not (math.isfinite(value) and (value >= low if low_ok else value > low) and value <= high):
            bound = f">= {low}" if low_ok else f"> {low}"
            raise typer.BadParameter(f"must be a finite number {bound}" + (f" and <= {high}" if high < math.inf
                                                                           else "") + f", got {value}",
                                     param_hint=f"--{name.replace('_', '-')}")


def _check_ca_only(o: dict) -> None:
    """Options of the CA task given to a text task did nothing: refused, as `armt eval` refuses them; so is a
    --segment-size for a new CA model, whose segments follow the sample layout."""
    if o["task"] == "ca":
        if o["init"] is None and o["segment_size"] is not None:
            raise typer.BadParameter("a new CA model's segments follow its layout (armt: one 21-token state; plain: "
                                     "the whole sample); it applies with --init of a plain HF base",
                                     param_hint="--segment-size")
        return
    refuse_given(train, "applies to --task ca only", arch=o["arch"], ca_variant=o["ca_variant"], ca_k=o["ca_k"],
                 ca_context=o["ca_context"])


def _training_model(o: dict):
    """A fresh CA model, an existing directory (--init), or a fresh QA model with the default tokenizer."""
    from model import ArmtConfig
    from model.config import is_armt_directory
    from model.training import default_tokenizer, load_for_training, new_model
    from model.training.reasoning import check_fits, new_ca_model

    shape = {k: o[k] for k in ("layers", "hidden", "heads", "ffn", "num_mem_tokens", "d_mem", "act", "max_hop",
                               "act_fixed")}
    init, task = o["init"], o["task"]
    if init is not None and o["act"] and is_armt_directory(init):  # its armt_config.json decides, as for the shape
        raise typer.BadParameter(f"{init} is an ARMT model: it keeps its own ACT setting", param_hint="--act")
    if init is not None:  # an ARMT trained before (CA ones have no tokenizer), or a plain HF base + fresh memory
        armt = ArmtConfig(num_mem_tokens=0 if task == "ca" and o["arch"] == "plain" else o["num_mem_tokens"],
                          d_mem=o["d_mem"], segment_size=_segment_size(o), armt_version=2, act=o["act"],
                          max_hop=o["max_hop"], act_fixed=o["act_fixed"])  # a plain HF base takes these
        try:
            model = load_for_training(init, armt, needs_tokenizer=task != "ca")
            if task == "ca":  # a text model would train, then fail its checks and `armt eval --task ca`
                check_fits(model, o["ca_variant"])
            return model
        except (FileNotFoundError, ValueError) as e:
            raise typer.BadParameter(str(e), param_hint="--init") from e
    if task == "ca":
        return new_ca_model(o["arch"], variant=o["ca_variant"], seed=o["seed"], **shape)
    return new_model(default_tokenizer(o["vocab"]), segment_size=_segment_size(o), seed=o["seed"], **shape)


def _segment_size(o: dict) -> int:
    """--segment-size, or the task's own: 64 tokens of text; a CA state (21) with memory, a whole CA sample without."""
    from model.tasks.cellular_automata import GROUP, sequence_length

    if o["segment_size"] is not None:
        return o["segment_size"]
    if o["task"] != "ca":
        return 64
    return sequence_length(o["ca_variant"]) if o["arch"] == "plain" else GROUP


@contextmanager
def _progress_bar(trainer, minutes: float):
    """tqdm over the time budget, showing step, stage, loss, running accuracy and throughput."""
    from tqdm import tqdm

    bar = tqdm(total=int(minutes * 60), unit="s", mininterval=5, bar_format="{l_bar}{bar}| {n:.0f}/{total}s {postfix}")

    def progress(row: dict) -> None:
        bar.n = int(row["seconds"])
        bar.set_postfix_str(f"step {row['step']} stage {trainer.stage} loss {row['loss']:.3f} "
                            f"acc {row['running_acc']:.3f} {row['tokens_per_s']} tok/s", refresh=True)

    try:
        yield progress
    finally:
        bar.close()


def _save(model, trainer, out: Path, export: Path | None) -> None:
    """The final model in the project format under OUT/model (and a copy in `export`)."""
    model.eval()
    model.save_pretrained(out / "model")
    typer.echo(f"wrote {out / 'model'} after {trainer.state.step} steps, {trainer.state.seconds:.0f}s, "
               f"stage {trainer.stage}")
    if export is not None:
        export.mkdir(parents=True, exist_ok=True)
        for f in (out / "model").iterdir():
            shutil.copy2(f, export / f.name)
        typer.echo(f"exported to {export}")
