"""Prompts for one model: chat templates rendered to token ids, and the context budget they leave."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from app.errors import invalid_request
from app.protocol import ChatCompletionRequest, CompletionRequest

# Keys a request's chat_template_kwargs may not set: we pass them ourselves.
_RESERVED_TEMPLATE_KWARGS = frozenset({"conversation", "messages", "tools", "chat_template", "tokenize",
                                       "add_generation_prompt", "return_dict"})


_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")


class Prompts:
    def __init__(self, tokenizer: Any, template: str | None, max_model_len: int) -> None:
        self._tokenizer = tokenizer
        self._template = template
        self.max_model_len = max_model_len

    def chat(self, request: ChatCompletionRequest, *, with_tools: bool) -> list[int]:
        messages = [_template_message(i, m.model_dump(exclude_none=True)) for i, m in enumerate(request.messages)]
        tools = [t.model_dump(exclude_none=True) for t in request.tools] if request.tools and with_tools else None
        kwargs = (request.model_extra or {}).get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise invalid_request("Invalid value for 'chat_template_kwargs': must be an object.",
                                  "chat_template_kwargs")
        reserved = _RESERVED_TEMPLATE_KWARGS.intersection(kwargs)
        if reserved:
            raise invalid_request(f"Invalid value for 'chat_template_kwargs': '{sorted(reserved)[0]}' cannot be "
                                  "set there.", "chat_template_kwargs")
        effort = (request.model_extra or {}).get("reasoning_effort")
        if effort is not None:
            # As vLLM's server does: templates with a notion of effort (gpt-oss, ...) read it; others ignore it.
            if effort not in _EFFORTS:
                raise invalid_request(f"Invalid value for 'reasoning_effort': expected one of {', '.join(_EFFORTS)}.",
                                      "reasoning_effort")
            kwargs = {"reasoning_effort": effort, **kwargs}
        # Rendered inline: a worker thread would have to win the GIL from a loop busy relaying streams, which
        # measured here as seconds of delay for a few milliseconds of work.
        try:
            text = self._tokenizer.apply_chat_template(
                messages, tools=tools, chat_template=self._template, add_generation_prompt=True, tokenize=False,
                **kwargs,
            )
        except Exception as exc:  # jinja2 and transformers raise assorted types for bad conversations
            raise invalid_request(f"The conversation cannot be rendered with this model's chat template: {exc}",
                                  "messages") from None
        # The template writes the special tokens (BOS) itself.
        ids = list(self._tokenizer.encode(text, add_special_tokens=False))
        self.check_length(ids, "messages")
        return ids

    def completion(self, request: CompletionRequest) -> list[list[int]]:
        prompt = request.prompt
        if isinstance(prompt, str):
            prompts = [self._tokenizer.encode(prompt)]
        elif prompt and isinstance(prompt[0], str):
            prompts = [self._tokenizer.encode(p) for p in prompt]
        elif prompt and isinstance(prompt[0], list):
            prompts = [list(p) for p in prompt]
        else:
            prompts = [list(prompt)]
        for ids in prompts:
            if not ids:
                raise invalid_request("Invalid value for 'prompt': it must not be empty.", "prompt")
            self.check_length(ids, "prompt")
        return prompts

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text))

    def check_length(self, ids: Sequence[int], param: str) -> None:
        if len(ids) >= self.max_model_len:
            raise invalid_request(
                f"This model's maximum context length is {self.max_model_len} tokens, but the prompt has "
                f"{len(ids)} tokens. Shorten the prompt.", param, "context_length_exceeded",
            )

    def check_budget(self, prompt_tokens: int, max_tokens: int | None, param: str) -> None:
        """Refuse a completion budget the context cannot hold, as OpenAI and vLLM's server do."""
        room = self.max_model_len - prompt_tokens
        if max_tokens is not None and max_tokens > room:
            raise invalid_request(
                f"'{param}' is too large: {max_tokens}. This model's maximum context length is "
                f"{self.max_model_len} tokens and your request has {prompt_tokens} input tokens "
                f"({max_tokens} > {self.max_model_len} - {prompt_tokens}).", param, "context_length_exceeded",
            )


def _template_message(index: int, message: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI message as chat templates expect it: text parts joined into one string, and tool-call
    arguments as objects rather than JSON strings (what Hugging Face templates expect, as vLLM does)."""
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if part.get("type") == "text":
                texts.append(part["text"])
            elif part.get("type") == "refusal":
                texts.append(part["refusal"])
            else:
                raise invalid_request(f"Content of type '{part.get('type')}' is not supported by this model.",
                                      f"messages[{index}].content[{j}]")
        message["content"] = "\n".join(texts)
    for call in message.get("tool_calls") or ():
        function = call["function"]
        function["arguments"] = _arguments(function.get("arguments"))
    return message


def _arguments(text: str | None) -> dict[str, Any]:
    # A malformed history entry would fail every later turn of the conversation; render it as no arguments.
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
