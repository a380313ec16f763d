"""Generation engine: the user API (LLM, SamplingParams, RequestOutput), the continuous-batching engine over a
paged KV cache (LLMEngine) and its asynchronous front for servers (AsyncLLM)."""

from .async_engine import AsyncLLM
from .config import EngineConfig
from .generator import BatchGenerator, Request
from .llm import LLM
from .llm_engine import LLMEngine
from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .protocol import AsyncEngine, StreamDelta
from .sampling_params import SamplingParams

__all__ = ["LLM", "AsyncEngine", "AsyncLLM", "BatchGenerator", "CompletionOutput", "EngineConfig", "LLMEngine",
           "Request", "RequestMetrics", "RequestOutput", "SamplingParams", "StreamDelta"]
