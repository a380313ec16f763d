from .modeling import DecoderLayer, MiniCPM4ForCausalLM, MiniCPM4Model

__all__ = ["DecoderLayer", "MiniCPM4ForCausalLM", "MiniCPM4Model"]
