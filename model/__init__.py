"""ARMT engine: pure torch (+ one transformers adapter, model/hf_base.py)."""
from .armt import ArmtModel
from .config import ArmtConfig
from .generation import SamplingParams
from .state import MemoryState, StateMismatchError
from .weights import default_model_path

__all__ = ["ArmtModel", "ArmtConfig", "MemoryState", "SamplingParams", "StateMismatchError", "default_model_path"]
