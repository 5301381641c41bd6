"""The appliance's configuration: one pydantic-settings model fed by env, secrets files and TOML.

Sources, highest priority first: constructor arguments, environment (``HELIOS_`` prefix, ``__`` for
nesting), files in the secrets directory (``HELIOS_SECRETS_DIR``, default ``/run/secrets``), the TOML
file (``HELIOS_CONFIG``, default ``config/config.toml``), then the defaults below.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NestedSecretsSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from app.errors import param_path

ENV_PREFIX = "HELIOS_"
CONFIG_ENV = "HELIOS_CONFIG"
SECRETS_DIR_ENV = "HELIOS_SECRETS_DIR"
DEFAULT_CONFIG_PATH = "config/config.toml"
DEFAULT_SECRETS_DIR = "/run/secrets"
HTTP_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")
BACKENDS = ("openai", "vllm")


_OPENAI_HOST = re.compile(r"^https://api\.openai\.com(?::443)?(?:/|$)")
_NAMED_MESSAGE = re.compile(r"^(?P<setting>[a-z_]+(?:\[\d+\])?(?:\.[a-z_]+)*): (?P<message>.*)$", re.S)


class ConfigError(Exception):
    """A configuration mistake, described in one line that names the setting and its source."""


class _Section(BaseModel):
    # Unknown keys are mistakes (a typo would otherwise silently fall back to a default).
    model_config = ConfigDict(extra="forbid")


class ServerSettings(_Section):
    host: str = Field("127.0.0.1", description="Address to bind; 0.0.0.0 inside containers.")
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(1, ge=1, le=64, description="Hypercorn worker processes.")
    keep_alive_timeout: float = Field(
        5.0, gt=0, description="Seconds an idle connection (kept alive, or new and silent) stays open."
    )
    keep_alive_max_requests: int = Field(
        100_000, ge=1,
        description="Requests one keep-alive connection may carry before it is closed (Hypercorn's own "
                    "default of 1,000 makes a busy load balancer reconnect every 1,000 requests).",
    )
    header_read_timeout: float = Field(
        60.0, gt=0,
        description="Seconds a request's headers may take to arrive in full, from their first byte (as nginx's "
                    "client_header_timeout); then the connection is closed. A whole deadline: a client sending "
                    "a byte a second does not reset it.",
    )
    body_read_timeout: float = Field(
        60.0, gt=0,
        description="Seconds a request body may take to arrive in full once its headers are in; then HTTP 408.",
    )
    backlog: int = Field(
        2048, ge=1,
        description="Connections the kernel queues before they are accepted (capped by net.core.somaxconn); "
                    "Hypercorn's 100 drops a burst of clients, who then wait for a SYN retry.",
    )
    graceful_timeout: float = Field(
        30.0, ge=0, description="Seconds in-flight requests get to finish after SIGTERM."
    )
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="Largest accepted request body.")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = "json"
    cors_allow_origins: list[str] = Field(
        default_factory=list, description="Origins allowed by CORS; empty turns CORS off; '*' allows any."
    )


class MetricsSettings(_Section):
    enabled: bool = Field(True, description="Serve Prometheus metrics.")
    path: str = Field("/metrics", pattern=r"^/[A-Za-z0-9._/-]*$")
    port: int | None = Field(
        None, ge=1, le=65535, description="Serve metrics on this separate port instead of the API port."
    )
    bearer_token: SecretStr | None = Field(None, description="When set, scrapes must send it as a Bearer token.")
    multiprocess_dir: Path = Field(
        Path("/tmp/helios-metrics"), description="Scratch directory aggregating metrics of several workers."
    )


class AuthSettings(_Section):
    api_keys: list[SecretStr] = Field(
        default_factory=list, description="Keys accepted as 'Authorization: Bearer <key>' on /v1/*."
    )


class ResponsesSettings(_Section):
    """Where /v1/responses keeps stored responses (``store: true``) for previous_response_id, GET and DELETE."""

    store: Literal["memory", "redis"] = Field(
        "memory", description="'memory': in this process, bounded; 'redis': shared by every replica."
    )
    redis_url: SecretStr | None = Field(
        None, description="redis:// or rediss:// URL (may hold a password) when store = 'redis'."
    )
    redis_prefix: str = Field("helios:responses:", description="Prefix of every Redis key written.")
    redis_timeout: float = Field(
        2.0, gt=0, description="Seconds a Redis command may take before the call answers 503."
    )
    ttl: float = Field(30 * 86400, gt=0, description="Seconds a stored response is kept (OpenAI keeps 30 days).")
    max_responses: int = Field(10_000, ge=1, description="memory: responses kept; the least recently used go first.")
    max_bytes: int = Field(
        256 * 1024 * 1024, ge=1024 * 1024, description="memory: bytes of stored responses kept, the same way."
    )
    unsupported_tools: Literal["drop", "reject"] = Field(
        "drop", description="Hosted tools (web_search, ...) sent to a translated model: 'drop' leaves them out "
                            "(named in X-Helios-Dropped-Tools), 'reject' answers 400."
    )

    @model_validator(mode="after")
    def _redis_needs_url(self) -> ResponsesSettings:
        if self.store == "redis" and self.redis_url is None:
            raise ValueError("store = 'redis' needs redis_url")
        if self.redis_url is not None and not self.redis_url.get_secret_value().startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ValueError("redis_url must start with redis://, rediss:// or unix://")
        return self


class RoutingSettings(_Section):
    """How pools and names with fallbacks retry, fail over and cool members down."""

    max_attempts: int = Field(4, ge=1, le=20, description="Upstream attempts per request, fallbacks included.")
    allowed_fails: int = Field(3, ge=1, description="Failures within failure_window before a member cools down.")
    failure_window: float = Field(60.0, gt=0, description="Seconds over which a member's failures are counted.")
    cooldown: float = Field(30.0, gt=0, description="Seconds a failing member is skipped before one probe.")
    backoff_base: float = Field(0.2, ge=0, description="Seconds of the first back-off before a retry round.")
    backoff_max: float = Field(5.0, ge=0, description="Largest back-off (full jitter below it).")
    max_retry_wait: float = Field(
        10.0, ge=0, description="Longest provider Retry-After honoured by waiting; a longer one moves on instead."
    )
    first_chunk_timeout: float | None = Field(
        None, gt=0, description="Seconds a stream may take to its first chunk before it is tried elsewhere.",
    )


class PoolSettings(_Section):
    """A served name answered by several configured models (its members), with routing between them."""

    name: str = Field(min_length=1, description="The model name clients send for the pool.")
    aliases: list[str] = Field(default_factory=list)
    members: list[str] = Field(min_length=1, description="Configured model names, in priority order.")
    strategy: Literal["priority", "weighted", "least_busy"] = "priority"
    weights: list[float] | None = Field(None, description="weighted: one positive weight per member.")
    fallbacks: list[str] = Field(default_factory=list, description="Names tried when every member failed.")
    context_window_fallbacks: list[str] = Field(
        default_factory=list, description="Names tried when the prompt fits no member."
    )

    @property
    def served_names(self) -> list[str]:
        return [self.name, *self.aliases]

    @model_validator(mode="after")
    def _shape(self) -> PoolSettings:
        if len(set(self.members)) != len(self.members):
            raise ValueError("a member is listed twice")
        if self.strategy == "weighted":
            if self.weights is None or len(self.weights) != len(self.members):
                raise ValueError("strategy 'weighted' needs one weight per member")
            if any(w <= 0 for w in self.weights):
                raise ValueError("weights must be positive")
        elif self.weights is not None:
            raise ValueError("weights apply to strategy 'weighted' only")
        return self


class _ModelBase(_Section):
    name: str = Field(min_length=1, description="The model name clients send.")
    aliases: list[str] = Field(default_factory=list, description="Other names clients may send.")
    internal: bool = Field(False, description="Only for pools, fallbacks and agents: not served by name.")
    fallbacks: list[str] = Field(default_factory=list, description="Names tried when this model fails.")
    context_window_fallbacks: list[str] = Field(
        default_factory=list, description="Names tried when the prompt does not fit this model."
    )

    @property
    def served_names(self) -> list[str]:
        return [self.name, *self.aliases]


class OpenAIModelSettings(_ModelBase):
    """A model served by an OpenAI-compatible provider through the official ``openai`` client."""

    backend: Literal["openai"]
    base_url: str = "https://api.openai.com/v1"
    base_url_env: str | None = Field(
        None, description="Name of an env var holding the base URL; overrides base_url when set."
    )
    api_key: SecretStr | None = None
    api_key_env: str | None = Field(None, description="Name of an env var holding the API key.")
    api_key_file: Path | None = Field(None, description="File holding the API key (e.g. a mounted secret).")
    upstream_model: str | None = Field(None, description="The provider's name for the model; default: name.")
    timeout: float = Field(600.0, gt=0, description="Seconds for a whole upstream call.")
    connect_timeout: float = Field(10.0, gt=0)
    max_retries: int = Field(2, ge=0, le=10)
    extra_headers: dict[str, str] = Field(default_factory=dict)
    organization: str | None = Field(None, description="OpenAI-Organization header (OpenAI only).")
    project: str | None = Field(None, description="OpenAI-Project header (OpenAI only).")
    responses_api: Literal["native", "chat"] | None = Field(
        None, description="How /v1/responses reaches the provider: 'native' relays it to the provider's own "
                          "Responses API, 'chat' translates it onto Chat Completions. Default: native for "
                          "api.openai.com, chat elsewhere.",
    )

    # Resolved at load time from api_key / api_key_env / api_key_file and base_url_env.
    _resolved_key: SecretStr | None = PrivateAttr(None)
    _resolved_base_url: str = PrivateAttr("")

    @model_validator(mode="after")
    def _resolve(self) -> OpenAIModelSettings:
        given = [k for k in ("api_key", "api_key_env", "api_key_file") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"set only one of api_key, api_key_env, api_key_file (got {', '.join(given)})")
        if self.api_key_file is not None:
            try:
                text = self.api_key_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(
                    f"cannot read api_key_file {str(self.api_key_file)!r}: {exc.strerror}"
                ) from None
            self._resolved_key = SecretStr(text)
        elif self.api_key_env is not None:
            value = os.environ.get(self.api_key_env, "").strip()
            self._resolved_key = SecretStr(value) if value else None
        else:
            self._resolved_key = self.api_key
        base = os.environ.get(self.base_url_env, "").strip() if self.base_url_env else ""
        self._resolved_base_url = base or self.base_url
        return self

    @property
    def resolved_api_key(self) -> SecretStr | None:
        return self._resolved_key

    @property
    def resolved_base_url(self) -> str:
        return self._resolved_base_url

    @property
    def upstream_name(self) -> str:
        return self.upstream_model or self.name

    @property
    def speaks_responses(self) -> bool:
        """Whether /v1/responses is relayed to the provider as it is."""
        if self.responses_api is not None:
            return self.responses_api == "native"
        return _OPENAI_HOST.match(self.resolved_base_url) is not None

    def missing_key_reason(self) -> str | None:
        """Why the model cannot serve for lack of a key, or None when it has one (or needs none)."""
        if self.api_key_env is not None and self._resolved_key is None:
            return f"no API key: environment variable {self.api_key_env} is not set"
        return None


class StructuredOutputsSettings(_Section):
    """How the engine constrains generation for response_format, structured_outputs and forced tool calls."""

    backend: Literal["auto", "xgrammar", "guidance", "outlines", "lm-format-enforcer"] = "auto"
    disable_any_whitespace: bool = Field(
        False, description="Compact JSON only: no whitespace between tokens (needs backend xgrammar or guidance). "
                           "Keeps a weak model from filling max_tokens with whitespace.",
    )
    enable_in_reasoning: bool = Field(
        False, description="Constrain the reasoning too, not only the answer after it (with a reasoning_parser).",
    )

    @model_validator(mode="after")
    def _whitespace_backend(self) -> StructuredOutputsSettings:
        if self.disable_any_whitespace and self.backend not in ("xgrammar", "guidance"):
            raise ValueError("disable_any_whitespace needs backend 'xgrammar' or 'guidance'")
        return self


class LoRAAdapterSettings(_Section):
    """A LoRA adapter of an embedded model, served under its own model name."""

    name: str = Field(min_length=1, description="The model name clients send for the adapter.")
    path: Path = Field(description="Directory saved by peft's save_pretrained (adapter_config.json + weights).")

    @model_validator(mode="after")
    def _adapter_exists(self) -> LoRAAdapterSettings:
        if not (self.path / "adapter_config.json").is_file():
            raise ValueError(f"LoRA adapter {self.name!r}: {str(self.path)!r} is not a PEFT adapter directory "
                             "(no adapter_config.json)")
        return self


class VLLMModelSettings(_ModelBase):
    """A model served in-process by an embedded vLLM engine."""

    backend: Literal["vllm"]
    model: str = Field(min_length=1, description="Local model directory or Hugging Face model id.")
    tokenizer: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = Field(None, ge=16)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    tensor_parallel_size: int = Field(1, ge=1)
    kv_cache_memory_bytes: int | None = Field(None, ge=1024 * 1024, description="KV-cache size; overrides "
                                              "gpu_memory_utilization.")
    max_num_seqs: int | None = Field(None, ge=1, description="Sequences the engine runs at once.")
    enforce_eager: bool = False
    quantization: str | None = None
    trust_remote_code: bool = False
    download_dir: str | None = None
    chat_template: str | None = Field(
        None, description="Chat template override: a path to a Jinja file, or the template itself."
    )
    max_queue_depth: int = Field(
        64, ge=0, description="Requests allowed to wait for an engine slot before new ones get 429."
    )
    retry_after: int = Field(1, ge=1, description="Seconds suggested in Retry-After when the queue is full.")
    spill_at_waiting: int | None = Field(
        None, ge=0, description="In a pool: skip this model while this many requests wait for an engine slot.",
    )
    tool_call_parser: str | None = Field(
        None, description="vLLM tool-call parser for tool_choice 'auto' (hermes, llama3_json, mistral, ...)."
    )
    enable_auto_tool_choice: bool = Field(False, description="Answer tool_choice 'auto' with tool_call_parser.")
    tool_strict_level: Literal["auto", "function", "parameter"] = Field(
        "auto", description="vLLM's --tool-strict-level: how far parsers with a call grammar constrain calls "
                            "('parameter' pins arguments to the tools' schemas, as if every tool were strict).",
    )
    reasoning_parser: str | None = Field(None, description="vLLM reasoning parser (deepseek_r1, qwen3, ...).")
    structured_outputs: StructuredOutputsSettings = Field(default_factory=StructuredOutputsSettings)
    runner: Literal["generate", "pooling"] = Field(
        "generate", description="'pooling' serves /v1/embeddings instead of generating text."
    )
    convert: Literal["auto", "none", "embed", "classify"] | None = Field(
        None, description="Adapt the model to the runner; 'embed' lets a decoder serve embeddings."
    )
    lora_adapters: list[LoRAAdapterSettings] = Field(default_factory=list)
    max_loras: int = Field(1, ge=1, description="LoRA adapters the engine holds in one batch.")
    max_lora_rank: int = Field(16, ge=1, description="Largest adapter rank the engine accepts.")
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="Further vLLM AsyncEngineArgs fields, passed through unchanged."
    )

    @property
    def upstream_name(self) -> str:
        return self.model

    @model_validator(mode="after")
    def _parsers_fit(self) -> VLLMModelSettings:
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("enable_auto_tool_choice needs tool_call_parser to be set")
        if self.runner == "pooling" and (self.tool_call_parser or self.reasoning_parser):
            raise ValueError("a pooling model (runner = 'pooling') generates no text to parse: unset "
                             "tool_call_parser and reasoning_parser")
        return self

    @model_validator(mode="after")
    def _template_exists(self) -> VLLMModelSettings:
        template = self.chat_template
        if template is not None and not _is_inline_template(template) and not Path(template).is_file():
            raise ValueError(f"chat_template file {template!r} does not exist")
        return self

    def chat_template_text(self) -> str | None:
        """The chat template override itself: given inline, or read from its file."""
        template = self.chat_template
        if template is None or _is_inline_template(template):
            return template
        return Path(template).read_text(encoding="utf-8")


def _is_inline_template(value: str) -> bool:
    return "{{" in value or "{%" in value


ModelSettings = Annotated[OpenAIModelSettings | VLLMModelSettings, Field(discriminator="backend")]


BUILTIN_TOOLS = ("calculator", "current_time", "http_fetch")


class McpServerSettings(_Section):
    """A Model Context Protocol server whose tools an agent may call: over stdio or streamable HTTP."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_-]+$", description="Names the server in /ready and logs.")
    command: str | None = Field(None, description="stdio: the program to start.")
    args: list[str] = Field(default_factory=list, description="stdio: its arguments.")
    env: dict[str, str] = Field(
        default_factory=dict, description="stdio: its whole environment (the appliance's own is never passed on)."
    )
    cwd: Path | None = Field(None, description="stdio: its working directory.")
    url: str | None = Field(None, pattern=r"^https?://", description="streamable HTTP: the server's MCP endpoint.")
    headers: dict[str, str] = Field(default_factory=dict, description="HTTP: headers sent as given (no secrets).")
    header_env: dict[str, str] = Field(
        default_factory=dict, description="HTTP: header name -> env var holding its value (for keys)."
    )
    header_files: dict[str, Path] = Field(
        default_factory=dict, description="HTTP: header name -> file holding its value (a mounted secret)."
    )
    allow_tools: list[str] | None = Field(None, description="Only these of the server's tools (default: all).")
    deny_tools: list[str] = Field(default_factory=list, description="Never these.")
    prefix: str = Field("", pattern=r"^[A-Za-z0-9_-]*$", description="Put before every tool name of this server.")

    @model_validator(mode="after")
    def _one_transport(self) -> McpServerSettings:
        if (self.command is None) == (self.url is None):
            raise ValueError(f"MCP server {self.name!r}: set exactly one of command (stdio) or url (HTTP)")
        return self


class AgentSettings(_Section):
    """A model name behind which the appliance runs a tool-calling loop against one of its models."""

    name: str = Field(min_length=1, description="The model name clients send for the agent.")
    aliases: list[str] = Field(default_factory=list)
    model: str = Field(min_length=1, description="The served model (name or alias) the loop calls.")
    system_prompt: str | None = None
    system_prompt_file: Path | None = None
    max_steps: int = Field(10, ge=1, le=100, description="Rounds of tool calls before a final answer is forced.")
    parallel_tool_calls: bool = Field(True, description="Run the tool calls of one step concurrently.")
    tool_timeout: float = Field(30.0, gt=0, description="Seconds one tool call may take.")
    max_tool_output_bytes: int = Field(16384, ge=256, description="Longer tool output is cut (and the model told).")
    temperature: float | None = Field(None, ge=0, le=2, description="Default; a request may override it.")
    max_tokens: int | None = Field(None, ge=1, description="Default per model call; a request may override it.")
    tools: list[Literal["calculator", "current_time", "http_fetch"]] = Field(default_factory=list)
    http_allow_hosts: list[str] = Field(default_factory=list, description="Hosts http_fetch may GET.")
    mcp_servers: list[McpServerSettings] = Field(default_factory=list)

    _system_prompt_text: str | None = PrivateAttr(None)

    @property
    def served_names(self) -> list[str]:
        return [self.name, *self.aliases]

    @model_validator(mode="after")
    def _check(self) -> AgentSettings:
        if self.system_prompt is not None and self.system_prompt_file is not None:
            raise ValueError("set only one of system_prompt, system_prompt_file")
        if self.system_prompt_file is not None:
            try:
                self._system_prompt_text = self.system_prompt_file.read_text(encoding="utf-8")
            except OSError as exc:
                raise ValueError(f"cannot read system_prompt_file {str(self.system_prompt_file)!r}: "
                                 f"{exc.strerror}") from None
        else:
            self._system_prompt_text = self.system_prompt
        if "http_fetch" in self.tools and not self.http_allow_hosts:
            raise ValueError("the http_fetch tool needs http_allow_hosts (the hosts it may fetch from)")
        if len(set(self.tools)) != len(self.tools):
            raise ValueError("a built-in tool is listed twice in tools")
        names = [server.name for server in self.mcp_servers]
        if len(set(names)) != len(names):
            raise ValueError("two mcp_servers have the same name")
        return self

    @property
    def system_prompt_text(self) -> str | None:
        return self._system_prompt_text


class EndpointSettings(_Section):
    """A static endpoint declared in TOML: a fixed JSON answer on a fixed path."""

    method: Literal["GET", "POST", "PUT", "DELETE", "PATCH"] = "GET"
    path: str = Field(pattern=r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*$")
    status: int = Field(200, ge=100, le=599)
    response: JsonValue = None
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("method", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        if isinstance(value, str) and value.upper() in HTTP_METHODS:
            return value.upper()
        return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        secrets_nested_delimiter="__",
        secrets_dir_missing="ok",
        extra="forbid",
        case_sensitive=False,
    )

    server: ServerSettings = Field(default_factory=ServerSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    responses: ResponsesSettings = Field(default_factory=ResponsesSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    models: list[ModelSettings] = Field(default_factory=list)
    pools: list[PoolSettings] = Field(default_factory=list)
    agents: list[AgentSettings] = Field(default_factory=list)
    endpoints: list[EndpointSettings] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_worker_per_engine(self) -> Settings:
        embedded = [m.name for m in self.models if m.backend == "vllm"]
        if embedded and self.server.workers != 1:
            raise ValueError(
                f"server.workers: must be 1 when an embedded vllm model is configured ({', '.join(embedded)}): "
                "each worker would load its own copy of the model"
            )
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        seen: dict[str, str] = {}
        for index, model in enumerate(self.models):
            adapters = [a.name for a in model.lora_adapters] if isinstance(model, VLLMModelSettings) else []
            for served in [*model.served_names, *adapters]:
                if served in seen:
                    raise ValueError(
                        f"models[{index}]: model name {served!r} is already used by {seen[served]}"
                    )
                seen[served] = f"models[{index}] ({model.name})"
        models = set(seen)
        for index, pool in enumerate(self.pools):
            for served in pool.served_names:
                if served in seen:
                    raise ValueError(f"pools[{index}]: name {served!r} is already used by {seen[served]}")
                seen[served] = f"pools[{index}] ({pool.name})"
            for member in pool.members:
                if member not in models:
                    what = "a pool; a pool's members are models" if member in seen else "not a configured model"
                    raise ValueError(f"pools[{index}].members: {member!r} is {what}")
        routable = set(seen)
        self._check_fallbacks(routable)
        for index, agent in enumerate(self.agents):
            for served in agent.served_names:
                if served in seen:
                    raise ValueError(f"agents[{index}]: name {served!r} is already used by {seen[served]}")
                seen[served] = f"agents[{index}] ({agent.name})"
            if agent.model not in routable:
                what = "an agent; an agent cannot call an agent" if agent.model in seen else "not a served model"
                raise ValueError(f"agents[{index}].model: {agent.model!r} is {what}")
        routes: set[tuple[str, str]] = set()
        for index, endpoint in enumerate(self.endpoints):
            key = (endpoint.method, endpoint.path)
            if key in routes:
                raise ValueError(f"endpoints[{index}]: {endpoint.method} {endpoint.path} is declared twice")
            routes.add(key)
        return self

    def _check_fallbacks(self, routable: set[str]) -> None:
        """Fallbacks name models or pools, and no chain of members and fallbacks leads back to where it began."""
        edges: dict[str, list[str]] = {}
        named: list[tuple[str, str, list[str]]] = []
        for index, model in enumerate(self.models):
            named.append((f"models[{index}]", model.name, model.fallbacks + model.context_window_fallbacks))
        for index, pool in enumerate(self.pools):
            named.append((f"pools[{index}]", pool.name, pool.fallbacks + pool.context_window_fallbacks))
            edges.setdefault(pool.name, []).extend(pool.members)
        canonical = {served: model.name for model in self.models for served in model.served_names}
        canonical.update({served: pool.name for pool in self.pools for served in pool.served_names})
        for where, name, targets in named:
            for target in targets:
                if target not in routable:
                    raise ValueError(f"{where}.fallbacks: {target!r} is not a model or pool")
                edges.setdefault(name, []).append(canonical[target])

        def reaches(start: str, goal: str, seen: set[str]) -> bool:
            for nxt in edges.get(start, ()):
                if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                    return True
            return False

        for where, name, targets in named:
            if targets and reaches(name, name, {name}):
                raise ValueError(f"{where}.fallbacks: {name!r} falls back, through its fallbacks, to itself")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            NestedSecretsSettingsSource(file_secret_settings, secrets_dir=secrets_dir()),
            TomlConfigSettingsSource(settings_cls, toml_file=config_path()),
        )


def config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)


def secrets_dir() -> Path:
    return Path(os.environ.get(SECRETS_DIR_ENV) or DEFAULT_SECRETS_DIR)


def load_settings(**overrides: Any) -> Settings:
    """Build the settings, turning any mistake into a one-line :class:`ConfigError`."""
    path = config_path()
    if os.environ.get(CONFIG_ENV) and not path.is_file():
        raise ConfigError(f"{CONFIG_ENV}: config file {str(path)!r} does not exist (source: environment)")
    try:
        toml_data = tomllib.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(exc, toml_data, path, overrides)) from None
    except SettingsError as exc:
        raise ConfigError(_one_line(str(exc))) from None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _describe_validation_error(
    exc: ValidationError, toml_data: dict[str, Any], path: Path, overrides: dict[str, Any]
) -> str:
    error = exc.errors(include_url=False)[0]
    # Tagged unions put the tag in the location ("models.0.openai.name"); users never wrote it.
    loc = [p for p in error["loc"] if not (isinstance(p, str) and p in BACKENDS)]
    setting = param_path(loc) or "settings"
    message = error["msg"]
    if error["type"] == "union_tag_invalid":
        message = f"unknown backend {error['input'].get('backend')!r}; expected one of: {', '.join(BACKENDS)}"
    elif error["type"] == "extra_forbidden":
        message = "unknown setting"
    elif error["type"] == "value_error":
        message = message.removeprefix("Value error, ")
        # Whole-settings checks name the setting at the start of their message ("server.workers: ...").
        named = _NAMED_MESSAGE.match(message) if not loc else None
        if named:
            setting, message = named["setting"], named["message"]
            loc = [int(p) if p.isdigit() else p for p in re.split(r"[.\[\]]+", setting) if p]
    if error["type"] not in ("extra_forbidden", "missing") and "input" in error and not _is_secret(loc):
        shown = repr(error["input"])
        if len(shown) <= 60 and not isinstance(error["input"], dict | list):
            message += f" (got {shown})"
    return _one_line(f"{setting}: {message} (source: {_source_of(loc, toml_data, path, overrides)})")


def _is_secret(loc: list[int | str]) -> bool:
    return any(isinstance(p, str) and ("key" in p or "secret" in p) for p in loc)


def _source_of(loc: list[int | str], toml_data: dict[str, Any], path: Path, overrides: dict[str, Any]) -> str:
    """Best effort at naming which source supplied the value at ``loc``, mirroring source priority."""
    if not loc:
        return "settings"
    top = str(loc[0])
    if top in overrides:
        return "arguments"
    names = [p for p in loc if isinstance(p, str)]
    environ = {k.upper(): k for k in os.environ}
    for depth in range(len(names), 0, -1):
        candidate = ENV_PREFIX + "__".join(names[:depth]).upper()
        if candidate in environ:
            return f"environment variable {environ[candidate]}"
    sdir = secrets_dir()
    if sdir.is_dir():
        files = {f.name.upper(): f for f in sdir.iterdir()}
        for depth in range(len(names), 0, -1):
            candidate = ENV_PREFIX + "__".join(names[:depth]).upper()
            if candidate in files:
                return f"secrets file {files[candidate]}"
    if top in toml_data:
        return f"config file {path}"
    return "default"
