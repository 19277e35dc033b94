"""`armt eval`: exact-match accuracy against document length for the text tasks, and the cellular-automata task
(model/training/evaluate.py, model/training/reasoning.py).

Registered on the `armt` app by service/cli.py.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from service.cli_options import CHOICES, TASKS, check_ca_k, check_output_file, int_list, refuse_given


def evaluate(
    model_dir: Path = typer.Argument(None, help="model directory (default: the shipped default model)"),
    task: str = typer.Option("qa1", help="qa1 | qa2 | remember | ca (a cellular-automata model: see --ca-k)"),
    segments: str = typer.Option("1,2,4,8,16,32,64", help="document lengths in segments"),
    samples: int = typer.Option(256, help="documents per length"),
    long_samples: int = typer.Option(64, help="documents per length above 256 segments (time)"),
    split: str = typer.Option("eval", help="prose source: eval (held out) or train"),
    seed: int = 1234,
    batch_size: int = 16,
    out: Path = typer.Option(None, help="JSON results (default runs/eval-TASK.json)"),
    plot: Path = typer.Option(None, help="PNG of accuracy vs length (needs matplotlib)"),
    executor: str = "diagonal",
    memory: bool = typer.Option(True, help="--no-memory: baseline that sees only the last segment"),
    ca_k: int = typer.Option(None, help="task ca: the horizon k, 1..4 (os: default 1; shift: default each of 1..4 "
                                        "in turn; oo scores its four states)"),
    ca_variant: str = typer.Option("os", help="task ca: os | oo | shift"),
    max_hop: str = typer.Option("", help="task ca, ACT models: comma-separated max_hop values to compare"),
    act_threshold: float = typer.Option(None, help="task ca, ACT models: halting threshold 1 - epsilon, in (0, 1] "
                                                   "(default: the model's)"),
    act_fixed: bool = typer.Option(None, "--act-fixed/--act-adaptive", help="task ca, ACT models: always run "
                                   "max_hop hops, or halt adaptively (default: as the model was trained)"),
) -> None:
    """Exact-match accuracy against document length, with 95% Wilson intervals; JSON and an optional PNG.

    Task ca: exact match and cell accuracy on test-split rules (never seen in training), per max_hop for ACT models.
    """
    import torch

    from model import default_model_path
    from model.tasks import Codec

    from service.cli import _fail, _load

    lengths = _check_eval_options(task, segments, samples, long_samples, split, executor, batch_size)
    for hint, path in (("--out", out), ("--plot", plot)):  # before the evaluation, whose results they would lose
        check_output_file(path, hint)
    if task == "ca":
        # the CA evaluation has its own test rules and no document lengths
        refuse_given(evaluate, "applies to the text tasks, not --task ca", segments=segments,
                     long_samples=long_samples, split=split, batch_size=batch_size, plot=plot, executor=executor,
                     memory=memory)
        _eval_ca(model_dir, _ca_ks(model_dir, ca_k, ca_variant), ca_variant, samples, seed, out,
                 max_hop=max_hop, act_threshold=act_threshold, act_fixed=act_fixed)
        return
    refuse_given(evaluate, "applies to --task ca only", max_hop=max_hop, act_threshold=act_threshold,
                 act_fixed=act_fixed)
    m = _load(model_dir or default_model_path())
    if m.tokenizer is None:
        _fail("the model has no tokenizer.json")
    codec, label = Codec(m.tokenizer), task if memory else f"{task} (no memory)"
    with torch.no_grad():  # not set_grad_enabled: the command also runs in-process (tests, notebooks)
        rows = [_qa_row(m, codec, task, n, samples if n <= 256 else long_samples, label, split=split,
                        seed=seed + n, batch_size=batch_size, executor=executor, memory=memory) for n in lengths]
    out = out or Path(f"runs/eval-{task}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": str(model_dir or default_model_path()), "split": split, "rows": rows},
                              indent=2))
    if plot is not None:
        _plot_eval(rows, task, plot)


def _qa_row(m, codec, task: str, n: int, k: int, label: str, **options) -> dict:
    """Exact match on k documents of n segments (model/training accuracy), printed as it comes."""
    from model.training import accuracy

    start = time.perf_counter()
    row = accuracy(m, codec, task, n, k, **options)
    row["seconds"] = round(time.perf_counter() - start, 1)
    typer.echo(f"{label} {n:5d} seg {row['tokens']:8d} tok  exact match {row['accuracy']:.3f} "
               f"[{row['ci95'][0]:.3f}, {row['ci95'][1]:.3f}]  n={row['samples']}  {row['seconds']}s")
    return row


def _check_eval_options(task: str, segments: str, samples: int, long_samples: int, split: str,
                        executor: str, batch_size: int) -> tuple[int, ...]:
    """The document lengths; BadParameter for option values that would fail late or print nonsense rows."""
    if task not in TASKS:
        raise typer.BadParameter(f"unknown task {task!r}; one of {', '.join(TASKS)}", param_hint="--task")
    if samples < 1 or long_samples < 1:
        raise typer.BadParameter("must be >= 1", param_hint="--samples / --long-samples")
    if batch_size < 1:
        raise typer.BadParameter(f"must be >= 1, got {batch_size}", param_hint="--batch-size")
    if split not in ("eval", "train"):
        raise typer.BadParameter(f"{split!r} is not eval or train", param_hint="--split")
    if executor not in ("sequential", "diagonal"):
        raise typer.BadParameter(f"{executor!r} is not sequential or diagonal", param_hint="--executor")
    return int_list(segments, "--segments", low=1)


def _ca_ks(model_dir: Path | None, k: int | None, variant: str) -> list[int | None]:
    """The horizons to score: --ca-k, or the variant's own (shift: each of 1..4 in turn)."""
    if model_dir is None:
        raise typer.BadParameter("task ca needs the directory of a model trained on it (armt train --task ca)",
                                 param_hint="MODEL_DIR")
    if variant not in CHOICES["ca_variant"]:
        raise typer.BadParameter(f"{variant!r} is not one of {', '.join(CHOICES['ca_variant'])}",
                                 param_hint="--ca-variant")
    if variant == "shift" and k is None:
        return [1, 2, 3, 4]
    return [check_ca_k(k, variant)]


def _eval_ca(model_dir: Path, ks: list[int | None], variant: str, samples: int, seed: int, out: Path | None,
             max_hop: str, **act) -> None:
    """Rows per horizon and max_hop; act: act_threshold / act_fixed overrides (None: the model's)."""
    from model.act import ActRun
    from model.training.reasoning import ca_accuracy, check_fits

    from service.cli import _fail, _load

    hops = list(int_list(max_hop, "--max-hop", low=1)) if max_hop.strip() else [None]
    m = _load(model_dir)
    try:  # the engine's own checks (ACT knobs on a model without ACT, out-of-range values), before any work
        check_fits(m, variant)
        for hop in hops:
            ActRun.for_model(m.config, hop, threshold=act["act_threshold"], fixed=act["act_fixed"])
    except ValueError as e:
        _fail(str(e))
    rows = []
    for k in ks:
        for hop in hops:
            start = time.perf_counter()
            row = ca_accuracy(m, k, variant, samples, split="test", seed=seed, max_hop=hop, **act)
            row["seconds"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            extra = f" mean hops {row['mean_hops']}" if "mean_hops" in row else ""
            typer.echo(f"ca {variant} k={k} max_hop={hop}: exact {row['accuracy']:.3f} [{row['ci95'][0]:.3f}, "
                       f"{row['ci95'][1]:.3f}] cells {row['cell_accuracy']:.3f} n={row['samples']}{extra}")
    out = out or Path(f"runs/eval-ca-{variant}" + (f"-k{ks[0]}" if len(ks) == 1 and ks[0] else "") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": str(model_dir), "rows": rows}, indent=2))


def _plot_eval(rows: list[dict], task: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["segments"] for r in rows]
    ys = [r["accuracy"] for r in rows]
    err = [[y - r["ci95"][0] for y, r in zip(ys, rows)], [r["ci95"][1] - y for y, r in zip(ys, rows)]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3)
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("document length (segments)")
    ax.set_ylabel("exact match")
    ax.set_title(task)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
