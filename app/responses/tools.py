"""The Responses API's tools as a chat model sees them, and the model's calls back as Responses items.

Chat Completions has one kind of tool, the function. So for a translated model:

- a function tool passes as it is;
- a namespace (OpenAI's ``NamespaceToolParam``) is flattened: each of its tools becomes a function named
  ``<namespace>__<name>``, and a call of one comes back with ``namespace`` and the inner ``name``, as OpenAI
  returns it;
- a custom tool (free-form input) becomes a function taking one string, ``input``, and its calls come back as
  ``custom_tool_call`` items. Its grammar is stated in the description; a ``regex`` grammar is also the string's
  ``pattern``, which an engine enforces wherever it constrains the call to the schema (a forced call);
- a hosted tool (``web_search``, ``file_search``, ``mcp``, ``local_shell``, ...), which only OpenAI's own
  servers run, is dropped from what the model sees (the route names it in ``X-Helios-Dropped-Tools``), or
  refused where ``[responses] unsupported_tools = "reject"``; a ``tool_choice`` forcing one is always refused.

The flat name of a namespaced or custom tool is a function of its names alone, so a conversation's earlier
calls translate the same way whatever tools the request carries now.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from app.errors import from_validation_error, invalid_request
from app.responses.protocol import FunctionTool

log = logging.getLogger(__name__)

UnsupportedTools = Literal["drop", "reject"]

#: between a namespace and its tool's name in the flat name the model sees
SEPARATOR = "__"
#: the longest function name OpenAI-compatible providers accept
_MAX_NAME = 64
#: the one parameter of a custom tool as a function
INPUT = "input"
#: what a hosted tool's type looks like (web_search, web_search_preview_2025_03_11, ...); only such names are
#: dropped and echoed in the response header, anything else is no tool type at all and refused
_HOSTED_TYPE = re.compile(r"[a-z][a-z0-9_]{0,63}")


def flat_name(name: str, namespace: str | None) -> str:
    return f"{namespace}{SEPARATOR}{name}" if namespace else name


def custom_arguments(text: str) -> str:
    """A custom tool call's input as the function arguments the model wrote (or would have written)."""
    return json.dumps({INPUT: text}, ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class _Known:
    """A tool the model may call, as the client named it."""

    name: str
    namespace: str | None
    custom: bool


class ToolSet:
    """One request's tools: the chat ``tools`` and ``tool_choice``, what was dropped, and how to name calls."""

    __slots__ = ("_known", "choice", "dropped", "tools")

    def __init__(self, tools: list[dict[str, Any]] | None, choice: str | dict[str, Any] | None,
                 unsupported: UnsupportedTools) -> None:
        self.tools: list[dict[str, Any]] = []
        #: the types of the hosted tools left out, in request order
        self.dropped: list[str] = []
        self._known: dict[str, _Known] = {}
        for index, tool in enumerate(tools or ()):
            kind = tool.get("type")
            param = f"tools[{index}]"
            if kind == "function":
                self._add(_function(tool, param), tool["name"], None, False, param)
            elif kind == "custom":
                self._add(_custom(tool, param, None), tool["name"], None, True, param)
            elif kind == "namespace":
                self._namespace(tool, param)
            elif unsupported == "reject" or not isinstance(kind, str) or not _HOSTED_TYPE.fullmatch(kind):
                raise invalid_request(f"Invalid value for '{param}.type': tools of type '{kind}' are not supported "
                                      "here; only 'function', 'custom' and 'namespace' tools are.", f"{param}.type",
                                      "unsupported_tool_type")
            else:
                self.dropped.append(kind)
        self.choice = self._choice(choice)
        if self.dropped and not self.tools and self.choice is not None:
            if self.choice == "required":
                raise invalid_request("Invalid value for 'tool_choice': 'required' needs a tool this model can "
                                      f"run, and every tool given is hosted ({', '.join(self.dropped)}).",
                                      "tool_choice")
            self.choice = None  # nothing the model can run is left to choose from

    def _add(self, function: dict[str, Any], name: str, namespace: str | None, custom: bool, param: str) -> None:
        flat = function["function"]["name"]
        if len(flat) > _MAX_NAME:
            raise invalid_request(f"Invalid value for '{param}.name': '{flat}' (the namespace and the name joined "
                                  f"by '{SEPARATOR}') is longer than {_MAX_NAME} characters.", f"{param}.name")
        if flat in self._known:
            raise invalid_request(f"Invalid value for '{param}.name': a tool named '{flat}' is given twice.",
                                  f"{param}.name")
        self._known[flat] = _Known(name, namespace, custom)
        self.tools.append(function)

    def _namespace(self, tool: dict[str, Any], param: str) -> None:
        namespace = tool.get("name")
        if not isinstance(namespace, str) or not namespace:
            raise invalid_request(f"Invalid value for '{param}.name': a namespace needs a non-empty name.",
                                  f"{param}.name")
        inner = tool.get("tools")
        if not isinstance(inner, list) or not inner:
            raise invalid_request(f"Invalid value for '{param}.tools': a namespace needs a list of function or "
                                  "custom tools.", f"{param}.tools")
        about = tool.get("description")
        for index, member in enumerate(inner):
            where = f"{param}.tools[{index}]"
            kind = member.get("type") if isinstance(member, dict) else None
            if kind == "function":
                function = _function(member, where, namespace)
                custom = False
            elif kind == "custom":
                function = _custom(member, where, namespace)
                custom = True
            else:
                raise invalid_request(f"Invalid value for '{where}.type': a namespace holds only 'function' and "
                                      "'custom' tools.", f"{where}.type")
            if isinstance(about, str) and about:
                own = function["function"].get("description")
                function["function"]["description"] = f"{about}\n{own}" if own else about
            self._add(function, member["name"], namespace, custom, where)

    def _choice(self, choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if choice is None or isinstance(choice, str):
            return choice
        kind = choice.get("type")
        if kind in ("function", "custom"):
            name = choice.get("name")
            if not isinstance(name, str) or not name:
                raise invalid_request("Invalid value for 'tool_choice': expected the 'name' of a tool.",
                                      "tool_choice")
            namespace = choice.get("namespace")
            flat = flat_name(name, namespace if isinstance(namespace, str) else None)
            known = self._known.get(flat)
            if known is None or known.custom != (kind == "custom"):
                raise invalid_request(f"Invalid value for 'tool_choice': no {kind} tool named '{flat}' is in "
                                      "'tools'.", "tool_choice")
            return {"type": "function", "function": {"name": flat}}
        if kind == "allowed_tools":
            return self._allowed(choice)
        if isinstance(kind, str):
            raise invalid_request(f"Invalid value for 'tool_choice': it forces a tool of type '{kind}', which this "
                                  "model cannot run (only OpenAI's own servers run hosted tools).", "tool_choice",
                                  "unsupported_tool_type")
        raise invalid_request("Invalid value for 'tool_choice': expected 'auto', 'none', 'required' or a tool "
                              "choice object with a 'type'.", "tool_choice")

    def _allowed(self, choice: dict[str, Any]) -> str:
        """``allowed_tools``: the model sees only those tools, with the choice's mode."""
        mode = choice.get("mode")
        listed = choice.get("tools")
        if mode not in ("auto", "required") or not isinstance(listed, list):
            raise invalid_request("Invalid value for 'tool_choice': allowed_tools needs 'mode' ('auto' or "
                                  "'required') and a list of 'tools'.", "tool_choice")
        keep: set[str] = set()
        for index, entry in enumerate(listed):
            kind = entry.get("type") if isinstance(entry, dict) else None
            name = entry.get("name") if isinstance(entry, dict) else None
            if kind in ("function", "custom") and isinstance(name, str):
                namespace = entry.get("namespace")
                keep.add(flat_name(name, namespace if isinstance(namespace, str) else None))
            elif kind == "namespace" and isinstance(name, str):
                keep.update(flat for flat, known in self._known.items() if known.namespace == name)
            else:
                raise invalid_request(f"Invalid value for 'tool_choice.tools[{index}]': a tool of type '{kind}' "
                                      "cannot be allowed here.", f"tool_choice.tools[{index}]",
                                      "unsupported_tool_type")
        self.tools = [tool for tool in self.tools if tool["function"]["name"] in keep]
        return str(mode)

    def log_dropped(self, model: str) -> None:
        if self.dropped:
            log.info("hosted tools left out for %s, which cannot run them: %s", model, ", ".join(self.dropped),
                     extra={"dropped_tools": self.dropped})

    # ---- the model's calls -------------------------------------------------------------------------

    def is_custom(self, flat: str) -> bool:
        known = self._known.get(flat)
        return known is not None and known.custom

    def call_item(self, item_id: str, call_id: str, flat: str, arguments: str,
                  status: str = "completed") -> dict[str, Any]:
        """A chat tool call as the item the client knows: a ``function_call`` (with its ``namespace`` when it
        has one) or a ``custom_tool_call``."""
        known = self._known.get(flat)
        name, namespace = (known.name, known.namespace) if known is not None else (flat, None)
        if known is not None and known.custom:
            item = {"id": item_id, "type": "custom_tool_call", "call_id": call_id, "name": name,
                    "input": custom_input(arguments), "status": status}
        else:
            item = {"id": item_id, "type": "function_call", "call_id": call_id, "name": name,
                    "arguments": arguments, "status": status}
        if namespace is not None:
            item["namespace"] = namespace
        return item


def custom_input(arguments: str) -> str:
    """The free-form input of a custom tool call from the function arguments the model wrote; arguments that
    are not the one-string object (a model that ignored the schema) are the input as they are."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    if isinstance(value, dict) and isinstance(value.get(INPUT), str):
        return str(value[INPUT])
    return arguments


def _function(tool: dict[str, Any], param: str, namespace: str | None = None) -> dict[str, Any]:
    try:
        function = FunctionTool.model_validate(tool)
    except ValidationError as exc:
        error = from_validation_error(exc)
        where = f"{param}.{error.param}" if error.param else param
        raise invalid_request(error.message.replace(f"'{error.param}'", f"'{where}'"), where) from None
    body = function.model_dump(exclude_none=True, exclude={"type"})
    body["name"] = flat_name(function.name, namespace)
    return {"type": "function", "function": body}


def _custom(tool: dict[str, Any], param: str, namespace: str | None) -> dict[str, Any]:
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise invalid_request(f"Invalid value for '{param}.name': a custom tool needs a non-empty name.",
                              f"{param}.name")
    description = tool.get("description")
    text = description if isinstance(description, str) else ""
    field: dict[str, Any] = {"type": "string", "description": "The tool's whole input, as free-form text."}
    fmt = tool.get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "grammar":
        syntax, definition = fmt.get("syntax"), fmt.get("definition")
        if syntax not in ("lark", "regex") or not isinstance(definition, str) or not definition:
            raise invalid_request(f"Invalid value for '{param}.format': a grammar needs 'syntax' ('lark' or "
                                  "'regex') and a 'definition'.", f"{param}.format")
        if syntax == "regex":
            field["pattern"] = definition
            rule = f"The input must match this regular expression: {definition}"
        else:
            rule = f"The input must follow this Lark grammar:\n{definition}"
        text = f"{text}\n\n{rule}" if text else rule
    elif fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise invalid_request(f"Invalid value for '{param}.format': expected {{\"type\": \"text\"}} or a grammar.",
                              f"{param}.format")
    function: dict[str, Any] = {
        "name": flat_name(name, namespace),
        "parameters": {"type": "object", "properties": {INPUT: field}, "required": [INPUT],
                       "additionalProperties": False},
    }
    if text:
        function["description"] = text
    return {"type": "function", "function": function}
