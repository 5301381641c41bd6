"""The Responses API's request as pydantic models: what ``POST /v1/responses`` accepts.

Like the Chat models in ``app.protocol``, objects keep fields we do not model, and unknown top-level fields
are provider extras passed on. Fields of OpenAI's spec that nothing here can honour are refused by name in
:mod:`app.responses.translate`, which is the one place that knows what each field becomes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from app.protocol import NOT_NULL, FunctionDefinition, TokenCount, rules, when


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


# The document names each model's schema by its class name, across both protocols: names here must not be
# those of app.protocol's models (an InputAudio here once replaced the chat one in /openapi.json).


def _none_of(names: frozenset[str]) -> dict[str, Any]:
    """The schema of an "other" type: the tag routes the listed names to their own models, never here."""
    return {"not": {"enum": sorted(names)}}


# ---- content parts -------------------------------------------------------------------------------


class InputText(_Open):
    type: Literal["input_text"]
    text: str


class OutputText(_Open):
    type: Literal["output_text"]
    text: str


class RefusalContent(_Open):
    type: Literal["refusal"]
    refusal: str


class InputImage(_Open):
    type: Literal["input_image"]
    image_url: str | None = None
    file_id: str | None = None
    detail: Literal["auto", "low", "high", "original"] | None = None


class InputFile(_Open):
    type: Literal["input_file"]
    file_data: str | None = None
    file_id: str | None = None
    file_url: str | None = None
    filename: str | None = None


class InputAudioData(_Open):
    data: str
    format: str


class InputAudioPart(_Open):
    type: Literal["input_audio"]
    input_audio: InputAudioData


_PART_TYPES = frozenset({"input_text", "output_text", "refusal", "input_image", "input_file", "input_audio"})


class OtherPart(_Open):
    """A part type of OpenAI's API not modelled here: relayed to a native provider, refused by translation."""

    type: str = Field(json_schema_extra=_none_of(_PART_TYPES))


def _type_tag(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    if not isinstance(kind, str):
        return None
    return f"type={kind}" if kind in _PART_TYPES else "type=other"


ContentPart = Annotated[
    Annotated[InputText, Tag("type=input_text")]
    | Annotated[OutputText, Tag("type=output_text")]
    | Annotated[RefusalContent, Tag("type=refusal")]
    | Annotated[InputImage, Tag("type=input_image")]
    | Annotated[InputFile, Tag("type=input_file")]
    | Annotated[InputAudioPart, Tag("type=input_audio")]
    | Annotated[OtherPart, Tag("type=other")],
    Discriminator(_type_tag, custom_error_type="invalid_content_part",
                  custom_error_message="content parts need a string 'type'"),
]

# ---- input items ---------------------------------------------------------------------------------


class MessageItem(_Open):
    type: Literal["message"] = "message"
    id: str | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]
    status: str | None = None


class FunctionCallItem(_Open):
    type: Literal["function_call"]
    id: str | None = None
    call_id: str = Field(min_length=1)
    #: the namespace tool the function belongs to, when it does
    namespace: str | None = None
    name: str = Field(min_length=1)
    arguments: str
    status: str | None = None


class FunctionCallOutputItem(_Open):
    type: Literal["function_call_output"]
    id: str | None = None
    call_id: str = Field(min_length=1)
    output: str | list[ContentPart]
    status: str | None = None


class CustomToolCallItem(_Open):
    type: Literal["custom_tool_call"]
    id: str | None = None
    call_id: str = Field(min_length=1)
    namespace: str | None = None
    name: str = Field(min_length=1)
    input: str
    status: str | None = None


class CustomToolCallOutputItem(_Open):
    type: Literal["custom_tool_call_output"]
    id: str | None = None
    call_id: str = Field(min_length=1)
    output: str | list[ContentPart]
    status: str | None = None


class ReasoningItem(_Open):
    type: Literal["reasoning"]
    id: str | None = None
    summary: list[dict[str, Any]] = Field(default_factory=list)
    content: list[dict[str, Any]] | None = None
    encrypted_content: str | None = None


class McpCallItem(_Open):
    """An agent's MCP tool call, as its earlier output showed it (passed back in a conversation)."""

    type: Literal["mcp_call"]
    id: str = Field(min_length=1)
    server_label: str
    name: str
    arguments: str
    output: str | None = None
    error: Any = None


_ITEM_TYPES = frozenset({"message", "function_call", "function_call_output", "custom_tool_call",
                         "custom_tool_call_output", "reasoning", "mcp_call"})


class OtherItem(_Open):
    """An item type of OpenAI's API not modelled here: relayed to a native provider, refused by translation."""

    type: str = Field(json_schema_extra=_none_of(_ITEM_TYPES))


def _item_tag(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    if kind is None and isinstance(value, dict) and "role" in value:
        return "type=message"  # EasyInputMessage: {"role": ..., "content": ...} without a type
    if not isinstance(kind, str):
        return None
    return f"type={kind}" if kind in _ITEM_TYPES else "type=other"


InputItem = Annotated[
    Annotated[MessageItem, Tag("type=message")]
    | Annotated[FunctionCallItem, Tag("type=function_call")]
    | Annotated[FunctionCallOutputItem, Tag("type=function_call_output")]
    | Annotated[CustomToolCallItem, Tag("type=custom_tool_call")]
    | Annotated[CustomToolCallOutputItem, Tag("type=custom_tool_call_output")]
    | Annotated[ReasoningItem, Tag("type=reasoning")]
    | Annotated[McpCallItem, Tag("type=mcp_call")]
    | Annotated[OtherItem, Tag("type=other")],
    Discriminator(_item_tag, custom_error_type="invalid_input_item",
                  custom_error_message="input items need a string 'type' (or a 'role', for a message)"),
]

# ---- tools, formats, options ---------------------------------------------------------------------


class FunctionTool(FunctionDefinition):
    """A Responses function tool: the Chat ``function`` object's fields, flattened beside ``type``."""

    type: Literal["function"]


class NamedFunctionChoice(_Open):
    type: Literal["function"]
    name: str = Field(min_length=1)


class TextFormat(_Open):
    """The answer's format; type ``json_schema`` needs ``name`` and ``schema``."""

    model_config = ConfigDict(json_schema_extra=rules(
        when({"type": {"const": "json_schema"}},
             {"required": ["name", "schema"], "properties": {"name": NOT_NULL, "schema": NOT_NULL}}),
    ))

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_needed(self) -> TextFormat:
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise ValueError("'name' and 'schema' are required when type is 'json_schema'")
        return self


class TextConfig(_Open):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(_Open):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class ResponseStreamOptions(_Open):
    include_obfuscation: bool | None = None


Include = Literal[
    "reasoning.encrypted_content", "message.output_text.logprobs", "message.input_image.image_url",
    "computer_call_output.output.image_url", "file_search_call.results", "web_search_call.results",
    "web_search_call.action.sources", "code_interpreter_call.outputs",
]


#: What the document says a tool is: a function tool as FunctionTool has it, or another type of OpenAI's.
_TOOL_SCHEMA = {"anyOf": [
    FunctionTool.model_json_schema(),
    {"type": "object", "required": ["type"], "additionalProperties": True,
     "properties": {"type": {"type": "string", "not": {"const": "function"}}}},
]}


class ResponsesRequest(_Open):
    """A Responses API request. A model whose provider speaks the Responses API gets it as sent; every other
    model answers it through Chat Completions, which refuses with a 400 naming the field what it cannot carry:
    the fields conversation, prompt, context_management, max_tool_calls and n (code unsupported_parameter);
    input items and content parts of types not listed here; images, audio and files outside user messages;
    images without image_url and files without file_data. Function, custom and namespace tools become
    chat functions; hosted tools (web_search, file_search, mcp, ...) are left out and named in the
    X-Helios-Dropped-Tools header, or refused (code unsupported_tool_type) where the operator set
    responses.unsupported_tools = 'reject'; a tool_choice forcing a hosted tool is refused. 'background'
    needs 'store' not false; an unknown previous_response_id is a 404. text.verbosity becomes the chat extra
    'verbosity', which an embedded model refuses (param 'verbosity'). Fields not listed here are passed on as
    chat extras (see the chat completion request)."""

    model: str = Field(min_length=1)
    input: Annotated[str, Field(min_length=1)] | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = None
    #: checked one by one where they are translated (a non-function type is refused by name), so kept as
    #: objects here; the document shows what the check takes
    tools: Annotated[list[Annotated[dict[str, Any], Field(json_schema_extra=_TOOL_SCHEMA)]], Field()] | None = None
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: TokenCount | None = None
    max_tool_calls: TokenCount | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    metadata: Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    background: bool | None = None

    model_config = ConfigDict(json_schema_extra=rules(
        when({"background": {"const": True}},
             {"not": {"required": ["store"], "properties": {"store": {"const": False}}}}),
    ))
    include: list[Include] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    stream: bool | None = None
    stream_options: ResponseStreamOptions | None = None

    @property
    def stores(self) -> bool:
        return self.store is not False


class ResponseList(BaseModel):
    """``GET /v1/responses/{id}/input_items``: one page."""

    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool
