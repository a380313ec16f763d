"""What generate() returns: one RequestOutput per prompt, holding its CompletionOutput(s) and timing."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One generated continuation. token_ids include a final eos / stop token id; text never shows it, and is
    cut before a matched stop string. finish_reason: "stop" (eos, stop id or stop string) or "length"."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it


@dataclass
class RequestMetrics:
    """Wall-clock seconds of the batch this request ran in (prefill covers the first token's sampling)."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    batch_size: int = 1
    decode_steps: int = 0


@dataclass
class RequestOutput:
    """prompt is None when the request was given as token ids."""

    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    metrics: RequestMetrics = field(default_factory=RequestMetrics)

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)
