"""Model definitions and checkpoint I/O. Models know nothing of the engine or the server."""

from .checkpoint import load_model, save_model
from .minicpm4 import MiniCPM4ForCausalLM

__all__ = ["MiniCPM4ForCausalLM", "load_model", "save_model"]
