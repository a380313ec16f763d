"""LLM: the user-facing entry point (vLLM style): load a checkpoint and its tokenizer, then generate or chat.

Turns user prompts (strings, token ids, chat conversations) into requests of the continuous-batching LLMEngine
(paged KV cache, chunked prefill, CUDA graphs on GPU) and collects their outputs in order.
"""

from __future__ import annotations

import itertools
import operator
import time
from collections.abc import Sequence

import torch

from ..errors import ConfigError, RequestError
from ..models.checkpoint import load_model, resolve_model_path
from ..text import load_tokenizer
from .config import EngineConfig
from .generator import OnToken
from .llm_engine import LLMEngine
from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .sampling_params import SamplingParams


def resolve_device(device) -> torch.device:
    """None or "auto": CUDA when available, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"unknown device {device!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    return dev


class LLM:
    """llm = LLM("path/or/hub-id"); llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32)).

    model: a checkpoint folder or a Hugging Face hub id. dtype None picks the checkpoint's dtype on CUDA and
    float32 on CPU. attention: "auto" (sparse from sparse_config.dense_len on), "dense" or "sparse".
    sparse_config: "config" keeps the checkpoint's, None forces dense, a SparseConfig or dict replaces it.
    max_model_len caps prompt + max_tokens (default: max_position_embeddings). Further keywords are EngineConfig
    fields (max_num_batched_tokens, num_pages / kv_cache_tokens / gpu_memory_utilization, cuda_graphs, ...).
    """

    def __init__(self, model, device=None, dtype=None, attention: str = "auto", sparse_config="config",
                 max_model_len: int | None = None, *, tokenizer=None, max_num_seqs: int = 32, **engine_kw):
        path = resolve_model_path(model)
        self.device = resolve_device(device)
        self.model = load_model(path, self.device, dtype, sparse_config=sparse_config)
        self.config = self.model.config
        self.tokenizer = load_tokenizer(resolve_model_path(tokenizer) if tokenizer is not None else path)
        limit = self.config.max_position_embeddings
        if max_model_len is not None and not 0 < max_model_len <= limit:
            raise ConfigError(f"max_model_len must be in [1, {limit}] (max_position_embeddings), got {max_model_len}")
        cfg = EngineConfig(max_model_len=max_model_len or limit, max_num_seqs=max(1, max_num_seqs), attention=attention,
                           **engine_kw)
        self.engine = LLMEngine(self.model, self.tokenizer, cfg)

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 use_tqdm: bool = False, on_token: OnToken | None = None) -> list[RequestOutput]:
        """prompts: a string, a list of token ids (used exactly as given), or a list of either.
        Strings get BOS as the tokenizer config says. One RequestOutput per prompt, in order.
        on_token(request_index, new_text, token_id) is called for every generated token; the new_text pieces
        of one request concatenate to its final text."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and _as_ids(prompts) is not None):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise RequestError(f"prompts must be a string, a list of token ids, or a list of those; got "
                               f"{type(prompts).__name__}")
        encoded = []
        for n, p in enumerate(prompts):
            if isinstance(p, str):
                encoded.append((p, self.tokenizer.encode(p, add_special_tokens=True)))
            elif isinstance(p, (list, tuple)) and (ids := _as_ids(p)) is not None:
                encoded.append((None, ids))
            else:
                raise RequestError(f"prompt {n}: must be a string or a list of token ids, got {type(p).__name__}")
        return self._run(encoded, sampling_params, use_tqdm, on_token)

    def chat(self, messages, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             use_tqdm: bool = False, on_token: OnToken | None = None, add_generation_prompt: bool = True,
             add_bos: bool = False) -> list[RequestOutput]:
        """messages: one conversation (a list of {"role", "content"} dicts) or a list of conversations.

        The prompt is the tokenizer's chat template. add_bos=False matches HF apply_chat_template(tokenize=True)
        and vLLM's chat (the MiniCPM4 template itself has no BOS); pass True to prepend it."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        encoded = []
        for conv in convs:
            text = self.tokenizer.apply_chat_template(conv, add_generation_prompt=add_generation_prompt)
            encoded.append((text, self.tokenizer.encode(text, add_special_tokens=add_bos)))
        return self._run(encoded, sampling_params, use_tqdm, on_token)

    def _run(self, encoded, sampling_params, use_tqdm, on_token) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(encoded)
        else:
            params = list(sampling_params)
            if len(params) != len(encoded) or not all(isinstance(p, SamplingParams) for p in params):
                raise RequestError(f"sampling_params must be one SamplingParams or one per prompt "
                                   f"({len(encoded)}), got {len(params)} items")
        for n, ((_, ids), p) in enumerate(zip(encoded, params)):
            self.engine.check(ids, p, f"prompt {n}")
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(encoded), desc="generating", unit="req")
        try:
            return self._drive(encoded, params, on_token, bar)
        finally:
            if bar is not None:
                bar.close()

    def _drive(self, encoded, params, on_token, bar) -> list[RequestOutput]:
        """Submit every prompt (the scheduler admits them as sequences and pages allow) and step until done."""
        eng = self.engine
        t0 = time.perf_counter()
        rids = [f"llm-{next(_batch_ids)}-{n}" for n in range(len(encoded))]
        index = {rid: n for n, rid in enumerate(rids)}
        seqs = [eng.add_request(rid, ids, p, prompt=text) for rid, (text, ids), p in zip(rids, encoded, params)]
        try:
            while eng.has_unfinished():
                for d in eng.step():
                    if on_token is not None:
                        on_token(index[d.request_id], d.text, d.token_ids[0])
                    if d.finished and bar is not None:
                        bar.update(1)
        finally:
            for rid in rids:  # interrupted (an exception in on_token, Ctrl-C): leave the engine clean
                eng.abort(rid)
        end = time.perf_counter()
        outs = []
        for n, seq in enumerate(seqs):
            first = seq.first_token_time or end
            metrics = RequestMetrics(prefill_s=first - t0, decode_s=end - first, batch_size=len(seqs),
                                     decode_steps=max(len(seq.output_ids) - 1, 0))
            d = seq.detok
            done = CompletionOutput(0, d.text, seq.output_ids, d.finish_reason, d.stop_reason)
            outs.append(RequestOutput(request_id=n, prompt=seq.prompt, outputs=[done], metrics=metrics,
                                      prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens]))
        return outs


_batch_ids = itertools.count()


def _as_ids(p) -> list[int] | None:
    """Plain ints (numpy / torch integer scalars too) as a list, or None if p is not a sequence of integers."""
    ids = []
    for i in p:
        if isinstance(i, bool):
            return None
        try:
            ids.append(operator.index(i))
        except TypeError:
            return None
    return ids
