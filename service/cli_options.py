"""Option checks the `armt` commands share (train, eval, bench): BadParameter naming the option, before any work."""
from __future__ import annotations

import inspect
from pathlib import Path

import typer

TASKS = ("qa1", "qa2", "remember", "ca")
CHOICES = {"arch": ("armt", "plain"), "ca_variant": ("os", "oo", "shift")}


def refuse_given(command, message: str, **values) -> None:
    """BadParameter(message) for the first of `values` (option name -> value) that is not the command's declared
    default: an option that would do nothing in this run is refused rather than ignored. The defaults are read
    from the command's signature (a typer.Option's, or the plain value), never repeated here."""
    for name, value in values.items():
        declared = inspect.signature(command).parameters[name].default
        default = getattr(declared, "default", declared)
        if value != default:
            flag = name.replace("_", "-")
            raise typer.BadParameter(message, param_hint=f"--no-{flag}" if default is True else f"--{flag}")


def check_device(device: str) -> None:
    """A device torch can name and this machine has."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        raise typer.BadParameter(str(e).split("\n")[0], param_hint="--device") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("this torch build or machine has no CUDA device", param_hint="--device")
    if kind not in ("cpu", "cuda"):
        raise typer.BadParameter(f"{device!r}: cpu or cuda[:N]", param_hint="--device")


def check_ca_k(k: int | None, variant: str) -> int | None:
    """--ca-k as the variant takes it (model/tasks/cellular_automata.py check_k: O-S defaults to 1)."""
    from model.tasks.cellular_automata import check_k

    try:
        return check_k(k, variant)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--ca-k") from None


def int_list(text: str, hint: str, low: int) -> tuple[int, ...]:
    """A comma-separated list of integers >= low (BadParameter otherwise)."""
    try:
        values = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint=hint) from None
    if not values or min(values) < low:
        raise typer.BadParameter(f"expected integers >= {low}, got {text!r}", param_hint=hint)
    return values


def check_output_file(path: Path | None, hint: str) -> None:
    """A file that can be written: not a directory, and no file where its directories would go."""
    if path is None:
        return
    if path.is_dir():
        raise typer.BadParameter(f"{path} is a directory; a file name is needed", param_hint=hint)
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise typer.BadParameter(f"{parent} is a file, so {path} cannot be created", param_hint=hint)
