"""Where the shipped default model lives (trained by `armt train`, see README "Default model")."""
from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "weights" / "default"


def default_model_path() -> Path:
    """The directory of the embedded default model (project format: safetensors, configs, tokenizer.json)."""
    if not (DEFAULT_MODEL_DIR / "armt_config.json").is_file():
        raise FileNotFoundError(f"the default model is missing from {DEFAULT_MODEL_DIR}")
    return DEFAULT_MODEL_DIR
