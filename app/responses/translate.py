"""The Responses API onto Chat Completions and back: the one place that knows what each field becomes.

Requests become a chat body (input items to messages, function tools to tools, ``text.format`` to
``response_format``); a chat answer becomes a Response object; a chat stream becomes Response events
(:mod:`app.responses.events`, built on the item and object builders here). Backends never learn about
Responses: an agent's server-side tool calls reach us as :class:`app.backends.base.ToolStep` records.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from typing import Any

from app.backends.base import ToolStep
from app.errors import invalid_request
from app.responses.protocol import ResponsesRequest
from app.responses.tools import ToolSet, custom_arguments, flat_name

# Spec fields with nothing here to honour them: refused by name rather than dropped.
_REFUSED = {
    "conversation": "the Conversations API is not served; continue with 'previous_response_id'",
    "prompt": "stored prompt templates are not served; send 'instructions' and 'input'",
    "context_management": "server-side compaction is not served",
    "max_tool_calls": "a limit on built-in tool calls applies to hosted tools, which are not served; an agent's "
                      "limit is its max_steps setting",
    # A chat extra that would make several answers, of which a Response shows one (or, streamed, a mix).
    "n": "a response has one answer; send one request per answer",
}
# Accepted and not passed on: a client's bookkeeping for OpenAI's own records (Codex CLI sends its turn ids),
# which a chat provider or an embedded model would refuse as an unknown parameter.
_BOOKKEEPING = frozenset({"client_metadata"})
# Fields this module or the service turns into something else; all others pass to the chat body as extras.
_HANDLED = frozenset(ResponsesRequest.model_fields) | frozenset(_REFUSED) | _BOOKKEEPING
_PASSED = ("user", "service_tier", "prompt_cache_key", "safety_identifier", "temperature", "top_p",
           "parallel_tool_calls")
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}
#: the ``server_label`` of an agent's built-in tools
BUILTIN_LABEL = "builtin"


def new_id(prefix: str) -> str:
    return f"{prefix}_{os.urandom(16).hex()}"


# ---- request -------------------------------------------------------------------------------------


def input_items(request: ResponsesRequest) -> list[dict[str, Any]]:
    """This request's input as stored items: every item with an id, a string input as one user message."""
    if isinstance(request.input, str):
        return [{"type": "message", "id": new_id("msg"), "role": "user", "status": "completed",
                 "content": [{"type": "input_text", "text": request.input}]}]
    items = []
    for item in request.input:
        data = item.model_dump(exclude_none=True, by_alias=True)
        if "id" not in data:
            data["id"] = new_id(_ITEM_PREFIX.get(data["type"], "item"))
        items.append(data)
    return items


_ITEM_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs",
                "custom_tool_call": "ctc", "custom_tool_call_output": "ctco"}


def chat_body(request: ResponsesRequest, tools: ToolSet, history: list[dict[str, Any]],
              items: list[dict[str, Any]], *, stream: bool) -> dict[str, Any]:
    """The Chat Completions body for a Responses request (``model`` first, for the remote byte rewrite), with
    the request's tools as ``tools`` made them."""
    for name, why in _REFUSED.items():
        if name in request.model_fields_set or name in (request.model_extra or {}):
            raise invalid_request(f"Unsupported parameter: '{name}': {why}.", name, "unsupported_parameter")
    body: dict[str, Any] = {"model": request.model}
    messages: list[dict[str, Any]] = []
    if request.instructions:
        messages.append({"role": "system", "content": request.instructions})
    _add_messages(messages, history, None)
    _add_messages(messages, items, "input")
    if not messages:
        # Else the chat body's own check would refuse 'messages', a field this client never sent.
        raise invalid_request("Invalid value for 'input': it holds nothing a chat model reads (reasoning items "
                              "only); add a message.", "input")
    body["messages"] = messages
    if tools.tools:
        body["tools"] = tools.tools
    if tools.choice is not None:
        body["tool_choice"] = tools.choice
    for name in _PASSED:
        value = getattr(request, name)
        if value is not None:
            body[name] = value
    if request.max_output_tokens is not None:
        body["max_tokens"] = request.max_output_tokens
    text = request.text
    if text is not None:
        if text.format is not None and text.format.type != "text":
            fmt = text.format
            body["response_format"] = {"type": "json_object"} if fmt.type == "json_object" else {
                "type": "json_schema", "json_schema": fmt.model_dump(
                    include={"name", "schema_", "description", "strict"}, exclude_none=True, by_alias=True)}
        if text.verbosity is not None:
            body["verbosity"] = text.verbosity
    if request.reasoning is not None and request.reasoning.effort is not None:
        body["reasoning_effort"] = request.reasoning.effort
    if request.top_logprobs or (request.include and "message.output_text.logprobs" in request.include):
        body["logprobs"] = True
        body["top_logprobs"] = request.top_logprobs or 0
    for name, value in (request.model_extra or {}).items():
        if name not in _HANDLED:
            body[name] = value
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def _add_messages(messages: list[dict[str, Any]], items: Iterable[dict[str, Any]], where: str | None) -> None:
    """Items in chat order. Consecutive calls join one assistant message (their outputs must follow it)."""
    for index, item in enumerate(items):
        kind = item.get("type")
        param = f"{where}[{index}]" if where else None
        if kind == "message":
            role = item["role"]
            content = _chat_content(item["content"], role, param)
            if role == "assistant":
                messages.append({"role": "assistant", "content": content})
            else:
                messages.append({"role": role, "content": content})
        elif kind == "function_call":
            _assistant_call(messages, item["call_id"], flat_name(item["name"], item.get("namespace")),
                            item["arguments"])
        elif kind == "custom_tool_call":
            _assistant_call(messages, item["call_id"], flat_name(item["name"], item.get("namespace")),
                            custom_arguments(item["input"]))
        elif kind in ("function_call_output", "custom_tool_call_output"):
            output = item["output"]
            text = output if isinstance(output, str) else _joined_text(output, param)
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": text})
        elif kind == "mcp_call":
            _assistant_call(messages, item["id"], item["name"], item["arguments"])
            messages.append({"role": "tool", "tool_call_id": item["id"], "content": _mcp_output(item)})
        elif kind == "reasoning":
            # Chat templates drop earlier turns' thinking, so the model would not see it either way.
            continue
        else:
            raise invalid_request(f"Invalid value for '{param}.type': input items of type '{kind}' are not "
                                  "supported by this model.", f"{param}.type", "unsupported_item")


def _assistant_call(messages: list[dict[str, Any]], call_id: str, name: str, arguments: str) -> None:
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant":
        last.setdefault("tool_calls", []).append(call)
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _mcp_output(item: dict[str, Any]) -> str:
    if item.get("output") is not None:
        return str(item["output"])
    error = item.get("error")
    return f"error: {json.dumps(error) if not isinstance(error, str) else error}"


def _chat_content(content: str | list[dict[str, Any]], role: str, param: str | None) -> Any:
    if isinstance(content, str):
        return content
    parts = [_chat_part(part, f"{param}.content[{i}]" if param else None) for i, part in enumerate(content)]
    if all(part["type"] == "text" for part in parts):
        # Plain strings suit every chat template; a list of text parts does not.
        return "\n".join(part["text"] for part in parts)
    if role != "user":
        raise invalid_request(f"Invalid value for '{param}.content': only user messages may hold images, audio "
                              "or files.", f"{param}.content")
    return parts


def _chat_part(part: dict[str, Any], param: str | None) -> dict[str, Any]:
    kind = part.get("type")
    if kind in ("input_text", "output_text"):
        return {"type": "text", "text": part["text"]}
    if kind == "refusal":
        return {"type": "text", "text": part["refusal"]}
    if kind == "input_image":
        if not part.get("image_url"):
            raise invalid_request(f"Invalid value for '{param}': images must be given by 'image_url' (a URL or a "
                                  "data URL); file ids are not served.", f"{param}.image_url")
        image = {"url": part["image_url"]}
        if part.get("detail") in ("auto", "low", "high"):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind == "input_file":
        if not part.get("file_data"):
            raise invalid_request(f"Invalid value for '{param}': files must be given inline by 'file_data'; file "
                                  "ids and URLs are not served.", f"{param}.file_data")
        file = {"file_data": part["file_data"], **({"filename": part["filename"]} if part.get("filename") else {})}
        return {"type": "file", "file": file}
    if kind == "input_audio":
        return {"type": "input_audio", "input_audio": part["input_audio"]}
    raise invalid_request(f"Invalid value for '{param}.type': content parts of type '{kind}' are not supported.",
                          f"{param}.type")


def _joined_text(parts: list[dict[str, Any]], param: str | None) -> str:
    texts = []
    for i, part in enumerate(parts):
        if part.get("type") not in ("input_text", "output_text"):
            raise invalid_request(f"Invalid value for '{param}.output[{i}]': tool output must be text.",
                                  f"{param}.output[{i}]")
        texts.append(part["text"])
    return "\n".join(texts)


# ---- the Response object -------------------------------------------------------------------------


class ResponseShape:
    """The fields of one Response that echo its request, built once; ``body`` adds what the answer says."""

    __slots__ = ("_echo", "background", "created_at", "id")

    def __init__(self, request: ResponsesRequest, served_as: str, response_id: str | None = None) -> None:
        self.id = response_id or new_id("resp")
        self.created_at = int(time.time())
        self.background = bool(request.background)
        text = request.text.model_dump(exclude_none=True, by_alias=True) if request.text else {}
        text.setdefault("format", {"type": "text"})
        reasoning = request.reasoning
        self._echo: dict[str, Any] = {
            "instructions": request.instructions,
            "max_output_tokens": request.max_output_tokens,
            "max_tool_calls": None,
            "model": served_as,
            "parallel_tool_calls": request.parallel_tool_calls is not False,
            "previous_response_id": request.previous_response_id,
            "reasoning": {"effort": reasoning.effort if reasoning else None,
                          "summary": (reasoning.summary or reasoning.generate_summary) if reasoning else None},
            "store": request.stores,
            "temperature": 1.0 if request.temperature is None else request.temperature,
            "text": text,
            "tool_choice": request.tool_choice if request.tool_choice is not None else "auto",
            "tools": [_echo_tool(tool) for tool in request.tools or ()],
            "top_logprobs": request.top_logprobs or 0,
            "top_p": 1.0 if request.top_p is None else request.top_p,
            "truncation": request.truncation or "disabled",
            "metadata": request.metadata or {},
            **({"user": request.user} if request.user is not None else {}),
            **({"service_tier": request.service_tier} if request.service_tier else {}),
            **({"prompt_cache_key": request.prompt_cache_key} if request.prompt_cache_key else {}),
            **({"safety_identifier": request.safety_identifier} if request.safety_identifier else {}),
        }

    def body(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None = None, *,
             incomplete: str | None = None, error: dict[str, str] | None = None) -> dict[str, Any]:
        body = {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "background": self.background,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": error, "incomplete_details": {"reason": incomplete} if incomplete else None,
            "output": output, **self._echo,
        }
        if usage is not None:
            body["usage"] = usage  # absent, not null, until there is some (the spec has no null usage)
        return body


def _echo_tool(tool: dict[str, Any]) -> dict[str, Any]:
    if tool.get("type") != "function":
        return tool
    return {"type": "function", "name": tool.get("name"), "description": tool.get("description"),
            "parameters": tool.get("parameters"), "strict": tool.get("strict"),
            **{k: v for k, v in tool.items() if k not in ("type", "name", "description", "parameters", "strict")}}


def response_usage(usage: dict[str, Any] | None) -> dict[str, Any]:
    usage = usage or {}
    prompt = usage.get("prompt_tokens") or 0
    completion = usage.get("completion_tokens") or 0
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": usage.get("total_tokens") or prompt + completion}


def incomplete_reason(finish_reason: str | None) -> str | None:
    return _INCOMPLETE.get(finish_reason or "")


# ---- output items --------------------------------------------------------------------------------


def message_item(item_id: str, text: str | None, refusal: str | None, logprobs: list[dict[str, Any]] | None,
                 status: str = "completed") -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if text is not None:
        content.append(text_part(text, logprobs))
    if refusal:
        content.append({"type": "refusal", "refusal": refusal})
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": content}


def text_part(text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def reasoning_item(item_id: str, text: str) -> dict[str, Any]:
    return {"id": item_id, "type": "reasoning", "summary": [{"type": "summary_text", "text": text}]}


def step_item(step: ToolStep, item_id: str) -> dict[str, Any]:
    """An agent's tool call as an ``mcp_call`` item: a call a server ran on the client's behalf, which is what it
    is. Built-in tools too (``server_label`` "builtin"): as a ``function_call`` item, a client such as the Agents
    SDK would look for the function among its own tools and fail the run."""
    done = step.output is not None
    item: dict[str, Any] = {"id": item_id, "type": "mcp_call", "server_label": step.server or BUILTIN_LABEL,
                            "name": step.name, "arguments": step.arguments, "output": None, "error": None,
                            "status": ("failed" if step.failed else "completed") if done else "in_progress"}
    if done and step.failed:
        item["error"] = {"type": "mcp_tool_execution_error", "content": [{"type": "text", "text": step.output}]}
    elif done:
        item["output"] = step.output
    return item


def response_logprobs(content: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Chat ``logprobs.content`` entries as Responses ``logprobs`` (whose ``bytes`` the spec requires)."""
    return [{"token": entry["token"], "logprob": entry["logprob"], "bytes": _token_bytes(entry),
             "top_logprobs": [{"token": top["token"], "logprob": top["logprob"], "bytes": _token_bytes(top)}
                              for top in entry.get("top_logprobs") or ()]}
            for entry in content or ()]


def _token_bytes(entry: dict[str, Any]) -> list[int]:
    """A chat logprob's ``bytes``, which chat may leave null: then the token's own UTF-8."""
    value = entry.get("bytes")
    return list(value) if value is not None else list(str(entry["token"]).encode())


def response_from_chat(shape: ResponseShape, tools: ToolSet, answer: bytes,
                       steps: list[ToolStep] | None) -> dict[str, Any]:
    """A whole chat answer as a finished Response: reasoning, the agent's steps, calls, then the message."""
    data = json.loads(answer)
    choice = data["choices"][0]
    message = choice.get("message") or {}
    output: list[dict[str, Any]] = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if reasoning:
        output.append(reasoning_item(new_id("rs"), reasoning))
    for step in steps or ():
        output.append(step_item(step, new_id("mcp")))
    incomplete = incomplete_reason(choice.get("finish_reason"))
    content, refusal = message.get("content"), message.get("refusal")
    if content is not None or refusal:
        logprobs = response_logprobs((choice.get("logprobs") or {}).get("content"))
        # A message cut by the token limit is itself incomplete, as OpenAI marks it.
        output.append(message_item(new_id("msg"), content, refusal, logprobs,
                                   "incomplete" if incomplete else "completed"))
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        name = function.get("name", "")
        output.append(tools.call_item(new_id("ctc" if tools.is_custom(name) else "fc"), call["id"], name,
                                      function.get("arguments", "")))
    return shape.body("incomplete" if incomplete else "completed", output, response_usage(data.get("usage")),
                      incomplete=incomplete)


def error_object(status: int, message: str) -> dict[str, str]:
    """A failure as the Response ``error`` field, whose ``code`` is one of the spec's few."""
    return {"code": "rate_limit_exceeded" if status == 429 else "server_error", "message": message}
