"""Engine outputs as OpenAI objects: finish reasons, usage and log-probabilities."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.backends.base import CallStats
from app.errors import APIError, internal_error
from app.protocol import ChoiceLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob, Usage

# What vLLM may report that OpenAI clients know; "abort" and "error" are turned into errors instead.
_FINISH = {"stop": "stop", "length": "length", "repetition": "stop"}
# OpenAI's floor for log-probabilities; vLLM reports -inf for impossible tokens.
_LOGPROB_FLOOR = -9999.0


class Outputs:
    """Turns one model's engine outputs into wire objects (it needs the model's tokenizer for tokens)."""

    def __init__(self, model: str, tokenizer: Any, vllm_version: str) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self.fingerprint = f"helios-vllm-{vllm_version}"

    def finish(self, reason: str | None) -> str:
        if reason in _FINISH:
            return _FINISH[reason]
        if reason == "abort":
            raise APIError(503, f"The request to model '{self._model}' was aborted: the engine is stopping.",
                           type="service_unavailable_error", code="aborted")
        raise internal_error()

    @staticmethod
    def usage(stats: CallStats, prompts: list[list[int]], completions: Sequence[Any]) -> Usage:
        prompt_tokens = sum(len(ids) for ids in prompts)
        completion_tokens = sum(len(c.token_ids) for c in completions)
        stats.prompt_tokens = prompt_tokens
        stats.completion_tokens = completion_tokens
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)

    def _token(self, token_id: int, logprob: Any) -> str:
        text = getattr(logprob, "decoded_token", None)
        return text if text is not None else str(self._tokenizer.decode([token_id]))

    def chat_logprobs(self, completion: Any, top: int) -> ChoiceLogprobs | None:
        if completion.logprobs is None:
            return None
        content = []
        for token_id, position in zip(completion.token_ids, completion.logprobs, strict=False):
            sampled = position[token_id]
            token = self._token(token_id, sampled)
            ranked = sorted(position.items(), key=lambda item: item[1].rank or 0)[:top]
            content.append(TokenLogprob(
                token=token, logprob=max(sampled.logprob, _LOGPROB_FLOOR), bytes=list(token.encode()),
                top_logprobs=[
                    TopLogprob(token=(t := self._token(tid, lp)), logprob=max(lp.logprob, _LOGPROB_FLOOR),
                               bytes=list(t.encode()))
                    for tid, lp in ranked
                ],
            ))
        return ChoiceLogprobs(content=content)

    def completion_logprobs(self, completion: Any, top: int | None) -> CompletionLogprobs | None:
        if completion.logprobs is None:
            return None
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        offset = 0
        for token_id, position in zip(completion.token_ids, completion.logprobs, strict=False):
            sampled = position[token_id]
            token = self._token(token_id, sampled)
            tokens.append(token)
            token_logprobs.append(max(sampled.logprob, _LOGPROB_FLOOR))
            ranked = sorted(position.items(), key=lambda item: item[1].rank or 0)[: top or 0]
            top_logprobs.append({self._token(tid, lp): max(lp.logprob, _LOGPROB_FLOOR) for tid, lp in ranked})
            offsets.append(offset)
            offset += len(token)
        return CompletionLogprobs(tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top_logprobs,
                                  text_offset=offsets)
