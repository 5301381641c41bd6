"""OpenAI request fields to vLLM sampling parameters.

Every field a client can send is either honoured or refused with a 400 naming it: silently ignoring a
parameter would make the answer differ from what the client asked for without telling it.
"""

from __future__ import annotations

from typing import Any

from app.errors import invalid_request
from app.protocol import ChatCompletionRequest, CompletionRequest

# vLLM extras users rely on, with the Python types vLLM accepts.
_EXTRAS: dict[str, type | tuple[type, ...]] = {
    "top_k": int,
    "min_p": (int, float),
    "repetition_penalty": (int, float),
    "min_tokens": int,
    "ignore_eos": bool,
    "stop_token_ids": list,
    "skip_special_tokens": bool,
    "include_stop_str_in_output": bool,
}
# Accepted and meaningless here (bookkeeping for the caller), so ignoring them changes no answer.
# Prefix caching is automatic here, so a cache key changes nothing either.
_HARMLESS = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "stream_options",
                       "prompt_cache_key", "safety_identifier"})
# vLLM extras read elsewhere: by the prompt renderer, the output parsers and structured_output() below.
_CHAT_HANDLED = frozenset({"chat_template_kwargs", "include_reasoning", "structured_outputs", "reasoning_effort"})
_COMPLETION_HANDLED = frozenset({"structured_outputs"})


def sampling_kwargs(request: ChatCompletionRequest | CompletionRequest, max_logprobs: int) -> dict[str, Any]:
    """Keyword arguments for ``vllm.SamplingParams`` (output kind and structured outputs excluded)."""
    kwargs: dict[str, Any] = {
        "n": request.n or 1,
        "temperature": 1.0 if request.temperature is None else request.temperature,
        "top_p": 1.0 if request.top_p is None else request.top_p,
        "presence_penalty": request.presence_penalty or 0.0,
        "frequency_penalty": request.frequency_penalty or 0.0,
        "seed": request.seed,
        "stop": request.stop,
        "max_tokens": request.max_tokens,
    }
    if request.top_p == 0:
        raise invalid_request("Invalid value for 'top_p': must be greater than 0 for this model.", "top_p")
    if request.logit_bias:
        try:
            kwargs["logit_bias"] = {int(token): bias for token, bias in request.logit_bias.items()}
        except ValueError:
            raise invalid_request("Invalid value for 'logit_bias': keys must be token ids.", "logit_bias") from None
    if isinstance(request, ChatCompletionRequest):
        if request.max_completion_tokens is not None:
            kwargs["max_tokens"] = request.max_completion_tokens
        if request.logprobs:
            kwargs["logprobs"] = request.top_logprobs or 0
    else:
        if request.logprobs is not None:
            kwargs["logprobs"] = request.logprobs
        if request.echo:
            raise invalid_request("Unsupported parameter: 'echo' is not supported by embedded models.", "echo")
        if request.suffix is not None:
            raise invalid_request("Unsupported parameter: 'suffix' is not supported by embedded models.", "suffix")
        if request.best_of is not None and request.best_of != (request.n or 1):
            raise invalid_request("Unsupported parameter: 'best_of' other than 'n' is not supported.", "best_of")
    if kwargs.get("logprobs", 0) > max_logprobs:
        param = "top_logprobs" if isinstance(request, ChatCompletionRequest) else "logprobs"
        raise invalid_request(f"Invalid value for '{param}': at most {max_logprobs} is supported.", param)
    handled = _CHAT_HANDLED if isinstance(request, ChatCompletionRequest) else _COMPLETION_HANDLED
    for key, value in (request.model_extra or {}).items():
        if key in _HARMLESS or key in handled or value is None:
            continue
        if key == "vllm_xargs":
            kwargs["extra_args"] = _extension_args(value)
            continue
        expected = _EXTRAS.get(key)
        if expected is None:
            raise invalid_request(f"Unsupported parameter: '{key}' is not supported by this model.", key)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise invalid_request(f"Invalid value for '{key}': wrong type.", key)
        kwargs[key] = value
    return kwargs


def _extension_args(value: object) -> dict[str, Any]:
    """vLLM's ``vllm_xargs``: request arguments for the engine's custom logits processors (``engine_args``'
    ``logits_processors``), which validate their own; the shape is vLLM's."""
    if isinstance(value, dict) and all(_is_extension_value(v) for v in value.values()):
        return value
    raise invalid_request("Invalid value for 'vllm_xargs': must map names to strings, numbers or lists of them.",
                          "vllm_xargs")


def _is_extension_value(value: object) -> bool:
    scalar = (str, int, float)
    if isinstance(value, list):
        return all(isinstance(item, scalar) and not isinstance(item, bool) for item in value)
    return isinstance(value, scalar) and not isinstance(value, bool)


def structured_output(request: ChatCompletionRequest | CompletionRequest) -> dict[str, Any] | None:
    """Keyword arguments for ``StructuredOutputsParams``, from ``response_format`` or vLLM's
    ``structured_outputs`` extra (``json``, ``regex``, ``choice``, ``grammar``, ...), or None."""
    fmt = request.response_format if isinstance(request, ChatCompletionRequest) else None
    extra = (request.model_extra or {}).get("structured_outputs")
    if extra is not None:
        if not isinstance(extra, dict):
            raise invalid_request("Invalid value for 'structured_outputs': must be an object.", "structured_outputs")
        if fmt is not None and fmt.type != "text":
            raise invalid_request("Only one kind of constraint can be used: 'response_format' or "
                                  "'structured_outputs'.", "structured_outputs")
        return extra
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"json_object": True}
    assert fmt.json_schema is not None  # enforced by the protocol model
    return {"json": fmt.json_schema.schema_ or {}}
