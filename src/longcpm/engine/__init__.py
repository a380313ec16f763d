"""Generation engine: the user API (LLM, SamplingParams, RequestOutput) over the batched generation loop."""

from .generator import BatchGenerator, Request
from .llm import LLM
from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .sampling_params import SamplingParams

__all__ = ["LLM", "BatchGenerator", "CompletionOutput", "Request", "RequestMetrics", "RequestOutput",
           "SamplingParams"]
