"""The Responses API's request as pydantic models: what ``POST /v1/responses`` accepts.

Like the Chat models in ``app.protocol``, objects keep fields we do not model, and unknown top-level fields
are provider extras passed on. Fields of OpenAI's spec that nothing here can honour are refused by name in
:mod:`app.responses.translate`, which is the one place that knows what each field becomes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from app.protocol import FunctionDefinition


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


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


class InputAudio(_Open):
    type: Literal["input_audio"]
    input_audio: InputAudioData


class OtherPart(_Open):
    """A part type of OpenAI's API not modelled here: relayed to a native provider, refused by translation."""

    type: str


_PART_TYPES = frozenset({"input_text", "output_text", "refusal", "input_image", "input_file", "input_audio"})


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
    | Annotated[InputAudio, Tag("type=input_audio")]
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
    name: str = Field(min_length=1)
    arguments: str
    status: str | None = None


class FunctionCallOutputItem(_Open):
    type: Literal["function_call_output"]
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


class OtherItem(_Open):
    """An item type of OpenAI's API not modelled here: relayed to a native provider, refused by translation."""

    type: str


_ITEM_TYPES = frozenset({"message", "function_call", "function_call_output", "reasoning", "mcp_call"})


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


class StreamOptions(_Open):
    include_obfuscation: bool | None = None


Include = Literal[
    "reasoning.encrypted_content", "message.output_text.logprobs", "message.input_image.image_url",
    "computer_call_output.output.image_url", "file_search_call.results", "web_search_call.results",
    "web_search_call.action.sources", "code_interpreter_call.outputs",
]


class ResponsesRequest(_Open):
    model: str = Field(min_length=1)
    input: Annotated[str, Field(min_length=1)] | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = None
    #: checked one by one (a non-function type is refused by name), so kept as objects here
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    max_tool_calls: Annotated[int, Field(ge=1)] | None = None
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
    include: list[Include] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None

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
