"""Tool calls and reasoning in generated text, found by vLLM's own parsers.

A model's parsers are composed once at start-up, as ``vllm serve`` composes them from
``--tool-call-parser`` and ``--reasoning-parser``. ``tool_choice: "required"`` and a named function work on
every model: without a tool-call parser, vLLM's base ``ToolParser`` constrains generation to a JSON schema
built from the tools' parameters and vLLM's parser turns that JSON back into calls. A parser with a call
grammar of its own (hermes) uses that grammar instead, pinning arguments to the schemas only for strict tools
or ``tool_strict_level = "parameter"``, as vLLM's server does. Only ``auto`` needs a parser.

vLLM's parsers read their request type (tools, tool_choice, ...), so a request that needs parsing gets one
small vLLM request carrying only the fields they read, not a second validation of the whole body.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from app.backends.vllm.generation import client_error
from app.backends.vllm.names import VLLMNames
from app.errors import invalid_request
from app.protocol import ChatCompletionRequest, ChunkDelta, FunctionCall, NamedToolChoice, ToolCall
from app.settings import VLLMModelSettings


def check_parser_names(settings: VLLMModelSettings, vllm: VLLMNames) -> None:
    """Refuse parser names vLLM does not know, listing the ones it does (before the engine loads)."""
    for setting, name, manager in (
        ("tool_call_parser", settings.tool_call_parser, vllm.ToolParserManager),
        ("reasoning_parser", settings.reasoning_parser, vllm.ReasoningParserManager),
    ):
        known = sorted(manager.list_registered())
        if name is not None and name not in known:
            raise ValueError(f"{setting} {name!r} is not one of vLLM {vllm.__version__}'s parsers: "
                             f"{', '.join(known)}")


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(slots=True)
class Parsed:
    """One finished choice, split by the parsers."""

    reasoning: str | None
    content: str | None
    tool_calls: list[ToolCall] | None


class ModelParsing:
    """The parsers of one model, and what each request needs of them."""

    def __init__(self, settings: VLLMModelSettings, tokenizer: Any, vllm: VLLMNames) -> None:
        self._vllm = vllm
        self._tokenizer = tokenizer
        self._model = settings.name
        self._auto = settings.enable_auto_tool_choice
        self._has_reasoning = settings.reasoning_parser is not None
        cls = vllm.ParserManager.get_parser(
            tool_parser_name=settings.tool_call_parser, reasoning_parser_name=settings.reasoning_parser,
            enable_auto_tools=settings.tool_call_parser is not None, model_name=settings.model,
            tool_strict_level=settings.tool_strict_level, tokenizer=tokenizer,
        ) or vllm.DelegatingParser
        if cls.tool_parser_cls is None:
            # vLLM's base parser knows no call format of its own, only the JSON of required/named choices.
            cls = type("JSONToolCalls", (cls,), {"tool_parser_cls": vllm.ToolParser})
        self._parser_cls: Any = cls

    def plan(self, request: ChatCompletionRequest) -> RequestParsing | None:
        """How ``request``'s output is parsed, or None when it is plain text (no tools asked for, and no
        reasoning parser)."""
        choice = request.tool_choice
        if request.tools and choice is None:
            choice = "auto"  # OpenAI's default when tools are given
        if choice is not None and choice != "none" and not request.tools:
            raise invalid_request("Invalid value for 'tool_choice': 'tools' must be set when 'tool_choice' is.",
                                  "tool_choice")
        tools_in_play = bool(request.tools) and choice != "none"
        if not tools_in_play and not self._has_reasoning:
            return None
        if choice == "auto" and not self._auto:
            raise invalid_request(
                f"Unsupported value for 'tool_choice': 'auto' needs a tool-call parser for model "
                f"'{self._model}'; set its tool_call_parser and enable_auto_tool_choice = true, or send "
                "tool_choice 'required' or a named function.", "tool_choice")
        if isinstance(choice, NamedToolChoice):
            names = {tool.function.name for tool in request.tools or ()}
            if choice.function.name not in names:
                raise invalid_request(f"Invalid value for 'tool_choice.function.name': no tool named "
                                      f"'{choice.function.name}' is in 'tools'.", "tool_choice.function.name")
        return RequestParsing(self, request, choice if tools_in_play and choice is not None else "none")

    def _vllm_request(self, request: ChatCompletionRequest, choice: str | NamedToolChoice) -> Any:
        extra = request.model_extra or {}
        data: dict[str, Any] = {
            "model": self._model,
            # The parsers never read the conversation; rendering it is ours.
            "messages": [{"role": "user", "content": ""}],
            "tool_choice": choice.model_dump() if isinstance(choice, NamedToolChoice) else choice,
            "include_reasoning": extra.get("include_reasoning", True),
            "skip_special_tokens": extra.get("skip_special_tokens", True),
        }
        if request.tools and choice != "none":
            data["tools"] = [tool.model_dump(exclude_none=True) for tool in request.tools]
        if request.parallel_tool_calls is not None:
            data["parallel_tool_calls"] = request.parallel_tool_calls
        try:
            return self._vllm.ChatCompletionRequest.model_validate(data)
        except Exception as exc:  # pydantic's and vLLM's validation errors
            raise client_error(exc) from None


class RequestParsing:
    """One request's parsing: the generation constraints the parsers ask for, then the parsing itself."""

    def __init__(self, model: ModelParsing, request: ChatCompletionRequest, choice: str | NamedToolChoice) -> None:
        self._model = model
        self._single_call = request.parallel_tool_calls is False
        self.tools_in_play = choice != "none"
        self._request = model._vllm_request(request, choice)
        # One parser for the set-up questions (adjust, reasoning_ended); each choice parses with its own.
        self._setup = self._new_parser()

    def adjust(self, structured: Any) -> tuple[Any, bool]:
        """The structured-outputs constraint and ``skip_special_tokens`` the parsers ask for, given the
        request's own constraint (a forced tool choice replaces it, as in vLLM's server)."""
        vreq = self._request
        vreq.structured_outputs = structured
        try:
            vreq = self._request = self._setup.adjust_request(vreq)
        except Exception as exc:
            raise client_error(exc) from None
        return vreq.structured_outputs, bool(vreq.skip_special_tokens)

    def reasoning_ended(self, prompt_ids: list[int]) -> bool | None:
        """For the engine's structured outputs: does reasoning end in the prompt already (None: let the
        engine tell)."""
        if not self._model._has_reasoning:
            return None
        return self._request.resolve_reasoning_ended(self._setup, prompt_ids)  # type: ignore[no-any-return]

    def _new_parser(self) -> Any:
        return self._model._parser_cls(self._model._tokenizer, self._request.tools)

    def parse(self, text: str, token_ids: list[int]) -> Parsed:
        try:
            reasoning, content, calls = self._new_parser().parse(
                text, self._request, enable_auto_tools=self._model._auto, model_output_token_ids=token_ids)
        except Exception as exc:
            raise client_error(exc) from None
        tool_calls = [ToolCall(id=new_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments))
                      for c in calls or ()]
        if self._single_call:
            tool_calls = tool_calls[:1]
        if tool_calls and content is not None and not content.strip():
            content = None
        # vLLM's streaming parser drops it itself; the whole-text one leaves that to the caller.
        if not self._request.include_reasoning:
            reasoning = None
        return Parsed(reasoning, content, tool_calls or None)

    def stream(self, prompt_ids: list[int]) -> StreamParsing:
        return StreamParsing(self, prompt_ids)


class StreamParsing:
    """Streamed deltas of one choice through its own parser (vLLM's streaming parsers keep state)."""

    def __init__(self, plan: RequestParsing, prompt_ids: list[int]) -> None:
        self._plan = plan
        self._parser = plan._new_parser()
        self._prompt_ids = prompt_ids
        self._ids: dict[int, str] = {}  # tool-call index -> our id
        self.called = False

    def delta(self, text: str, token_ids: list[int], finished: bool) -> ChunkDelta | None:
        try:
            message = self._parser.parse_delta(text, list(token_ids), self._plan._request, self._prompt_ids,
                                               finished=finished)
        except Exception as exc:
            raise client_error(exc) from None
        if message is None:
            return None
        calls = [self._call(call) for call in message.tool_calls
                 if not (self._plan._single_call and call.index > 0)]
        if not (message.content or message.reasoning or calls):
            return None
        self.called = self.called or bool(calls)
        return ChunkDelta(content=message.content or None, reasoning_content=message.reasoning,
                          reasoning=message.reasoning, tool_calls=calls or None)

    def _call(self, call: Any) -> dict[str, Any]:
        # OpenAI's shape: the first delta of a call carries index, id, type and name; the rest only append to
        # the arguments. vLLM's ids are replaced by ours (call_...).
        out: dict[str, Any] = {"index": call.index}
        function: dict[str, str] = {}
        if call.function is not None:
            if call.function.name is not None:
                function["name"] = call.function.name
            if call.function.arguments is not None:
                function["arguments"] = call.function.arguments
        if call.id is not None and call.index not in self._ids:
            out["id"] = self._ids[call.index] = new_call_id()
            out["type"] = "function"
            function.setdefault("arguments", "")
        out["function"] = function
        return out
