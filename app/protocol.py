"""The OpenAI wire format as pydantic models: the one place that defines what we accept and return.

Request models validate the raw JSON bytes (``model_validate_json``) and allow unknown fields, which are
provider extras (``top_k``, ``min_p`` ...) that must reach the provider untouched. Response models are
used by the embedded engine to build answers and by the OpenAPI document.

The published ``/openapi.json`` is generated from these same models, so it must say what they accept: they are
strict (JSON types as the schema states them: no ``"5"`` or ``5.0`` for an integer, no ``0`` for a boolean), and every
cross-field rule of a ``model_validator`` is also written into the schema (``rules`` beside it), which
tests/e2e/test_fuzz.py checks in both directions.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SerializerFunctionWrapHandler,
    Tag,
    model_serializer,
    model_validator,
)


class _Open(BaseModel):
    """A wire object that keeps fields we do not model (forward compatibility with the API)."""

    model_config = ConfigDict(extra="allow", strict=True)


def rules(*clauses: dict[str, Any]) -> dict[str, Any]:
    """A model's cross-field rules as JSON Schema, for ``json_schema_extra``: the published document then
    refuses what the model's validator refuses."""
    return {"allOf": list(clauses)}


def when(condition: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
    """``if`` the listed properties are present and match ``condition``, ``then`` must hold."""
    return {"if": {"properties": condition, "required": sorted(condition)}, "then": then}


NOT_NULL: dict[str, Any] = {"not": {"type": "null"}}


# ---- chat messages -------------------------------------------------------------------------------


class ImageURL(_Open):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class InputAudio(_Open):
    data: str
    format: str


class TextPart(_Open):
    type: Literal["text"]
    text: str


class ImagePart(_Open):
    type: Literal["image_url"]
    image_url: ImageURL


class AudioPart(_Open):
    type: Literal["input_audio"]
    input_audio: InputAudio


class FilePart(_Open):
    type: Literal["file"]
    file: dict[str, Any]


class RefusalPart(_Open):
    type: Literal["refusal"]
    refusal: str


def _part_tag(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return f"type={kind}" if isinstance(kind, str) else None


ContentPart = Annotated[
    Annotated[TextPart, Tag("type=text")]
    | Annotated[ImagePart, Tag("type=image_url")]
    | Annotated[AudioPart, Tag("type=input_audio")]
    | Annotated[FilePart, Tag("type=file")]
    | Annotated[RefusalPart, Tag("type=refusal")],
    Discriminator(_part_tag, custom_error_type="invalid_content_part",
                  custom_error_message="content part 'type' must be one of text, image_url, input_audio, "
                                       "file, refusal"),
]


class FunctionCall(_Open):
    name: str
    arguments: str


class ToolCall(_Open):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Open):
    """One message of the conversation. A ``tool`` message needs a ``tool_call_id``; ``system``, ``developer``,
    ``user`` and ``tool`` messages need ``content``; an ``assistant`` message needs ``content``, ``tool_calls``
    or ``function_call``."""

    model_config = ConfigDict(json_schema_extra=rules(
        when({"role": {"const": "tool"}},
             {"required": ["tool_call_id"], "properties": {"tool_call_id": {"type": "string", "minLength": 1}}}),
        when({"role": {"enum": ["system", "developer", "user", "tool"]}},
             {"required": ["content"], "properties": {"content": NOT_NULL}}),
        {"if": {"properties": {"role": {"const": "assistant"}, "content": {"type": "null"}}},
         "then": {"anyOf": [
             {"required": ["tool_calls"], "properties": {"tool_calls": {"type": "array", "minItems": 1}}},
             {"required": ["function_call"], "properties": {"function_call": NOT_NULL}},
         ]}},
    ))

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _role_rules(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("messages with role 'tool' must have a 'tool_call_id'")
        if self.content is None and self.role in ("system", "developer", "user", "tool"):
            raise ValueError(f"messages with role '{self.role}' must have 'content'")
        if self.role == "assistant" and self.content is None and not self.tool_calls and (
            self.model_extra or {}).get("function_call") is None:
            raise ValueError("assistant messages need 'content' or 'tool_calls'")
        return self


# ---- tools and formats ---------------------------------------------------------------------------


class FunctionDefinition(_Open):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Open):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Open):
    name: str


class NamedToolChoice(_Open):
    type: Literal["function"] = "function"
    function: NamedFunction


class JSONSchemaFormat(_Open):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Open):
    """The answer's format; type ``json_schema`` needs ``json_schema``."""

    model_config = ConfigDict(json_schema_extra=rules(
        when({"type": {"const": "json_schema"}},
             {"required": ["json_schema"], "properties": {"json_schema": NOT_NULL}}),
    ))

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_needed(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("'json_schema' is required when type is 'json_schema'")
        return self


class StreamOptions(_Open):
    include_usage: bool | None = None


# ---- requests ------------------------------------------------------------------------------------

#: OpenAI's own limits where the engine's cost grows with the count (each stop string is searched for after
#: every token, each bias is applied at every step); a provider with other limits still gets what it allows.
MAX_STOP = 16
MAX_LOGIT_BIAS = 1024
#: vLLM refuses an empty stop string; OpenAI ignores one. Refused here, naming the field, for every model.
_StopText = Annotated[str, Field(min_length=1)]
Stop = _StopText | Annotated[list[_StopText], Field(max_length=MAX_STOP)]
Temperature = Annotated[float, Field(ge=0, le=2)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
_TOKEN_ID = r"^[0-9]{1,9}$"
TokenId = Annotated[str, Field(pattern=_TOKEN_ID)]
#: A seed as OpenAI takes it (a 64-bit signed integer); vLLM's samplers take no wider one.
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
#: Beyond every context window (and below what a C integer holds): a larger count is surely a mistake.
TokenCount = Annotated[int, Field(ge=1, le=2**31 - 1)]

EXTRAS_DOC = (
    "Fields not listed here are provider extras. A remote model's provider gets them as sent, and may refuse "
    "them. An embedded model honours the vLLM extras top_k, min_p, repetition_penalty, min_tokens, ignore_eos, "
    "stop_token_ids, skip_special_tokens, include_stop_str_in_output, structured_outputs, vllm_xargs (arguments "
    "for the engine's custom logits processors) (and, for chat, "
    "chat_template_kwargs, include_reasoning and reasoning_effort), with the types and ranges vLLM takes, "
    "ignores bookkeeping fields (user, metadata, store, service_tier, parallel_tool_calls, stream_options, "
    "prompt_cache_key, safety_identifier), and refuses any other field with a 400 naming it. A model refuses "
    "with a 400 what it cannot do: an embedded model a prompt and max_tokens beyond its context window (code "
    "context_length_exceeded), token ids and logit_bias keys outside its vocabulary, more logprobs than it "
    "keeps, echo, suffix, best_of other than n, top_p 0, n above 1 at temperature 0, content parts other than "
    "text, a conversation its chat template cannot render, tools or tool_choice its parsers cannot serve; an "
    "agent n other than 1 and tools named as its own."
)


class _GenerationRequest(_Open):
    model: str = Field(min_length=1)
    temperature: Temperature | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    stop: Stop | None = None
    max_tokens: TokenCount | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: Annotated[dict[TokenId, Annotated[float, Field(ge=-100, le=100)]],
                          # pydantic documents the key rule as patternProperties, which lets other keys by
                          Field(max_length=MAX_LOGIT_BIAS, json_schema_extra={"propertyNames": {"pattern": _TOKEN_ID}})
                          ] | None = None
    seed: Seed | None = None
    user: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    @property
    def wants_usage_chunk(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_GenerationRequest):
    __doc__ = ("A chat completion request. A positive 'top_logprobs' needs 'logprobs' true. " + EXTRAS_DOC)

    model_config = ConfigDict(json_schema_extra=rules(
        when({"top_logprobs": {"type": "integer", "minimum": 1}},
             {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}),
    ))

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: TokenCount | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _cross_field(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("'top_logprobs' requires 'logprobs' to be true")
        return self


TokenIds = list[Annotated[int, Field(ge=0, le=2**31 - 1)]]


class CompletionRequest(_GenerationRequest):
    __doc__ = "A text completion request. " + EXTRAS_DOC

    prompt: str | Annotated[list[str], Field(min_length=1)] | Annotated[TokenIds, Field(min_length=1)] | Annotated[
        list[Annotated[TokenIds, Field(min_length=1)]], Field(min_length=1)]
    suffix: str | None = None
    echo: bool | None = None
    best_of: Annotated[int, Field(ge=1, le=128)] | None = None
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None


class EmbeddingRequest(_Open):
    """An embeddings request. Fields not listed here go to a remote model's provider as sent; an embedded
    model ignores them. An embedded model refuses 'dimensions' unless the model was trained for it, token ids
    outside its vocabulary and an input beyond its context window (code context_length_exceeded)."""

    model: str = Field(min_length=1)
    input: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]], Field(
        min_length=1)] | Annotated[TokenIds, Field(min_length=1)] | Annotated[
        list[Annotated[TokenIds, Field(min_length=1)]], Field(min_length=1)]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Annotated[int, Field(ge=1, le=65536)] | None = None
    user: str | None = None


# ---- responses -----------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


# Absent rather than null when empty, as OpenAI sends them.
_OPTIONAL_MESSAGE_FIELDS = ("tool_calls", "reasoning_content", "reasoning")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    #: a reasoning model's thinking, under the name most clients read and the one vLLM's server now uses
    reasoning_content: str | None = None
    reasoning: str | None = None

    @model_serializer(mode="wrap")
    def _omit_absent_optional_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for key in _OPTIONAL_MESSAGE_FIELDS:
            if data.get(key) is None:
                data.pop(key, None)
        return data


FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @model_serializer(mode="wrap")
    def _only_present(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A delta carries only what changed; OpenAI omits the other keys rather than sending null.
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None}


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "content_filter"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    #: for a LoRA adapter, the model it adapts (as vLLM's server lists adapters)
    parent: str | None = None

    @model_serializer(mode="wrap")
    def _omit_absent_parent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("parent") is None:
            data.pop("parent", None)
        return data


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail
