"""Validate JSON bodies against OpenAI's official OpenAPI schemas.

By default the schemas come from ``tests/data/openai-schemas.json``, the part of OpenAI's spec the tests use
(made by ``python -m tests.support.openapi_trim`` from the full spec, so a clone needs nothing beside it);
``$HELIOS_OPENAPI_SPEC`` points them at another spec instead, e.g. the full ``openapi.json``.
"""

from __future__ import annotations

import copy
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator  # type: ignore[import-untyped]
from jsonschema.exceptions import ValidationError  # type: ignore[import-untyped]
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from tests.support.openapi_trim import FULL_SPEC_PATH, SPEC_ENV, TRIMMED_PATH

__all__ = [
    "COMPLETION_STREAM_SCHEMA",
    "DEFAULT_SPEC_PATH",
    "FULL_SPEC_PATH",
    "SPEC_ENV",
    "errors",
    "is_valid",
    "load_schemas",
    "schema_names",
    "spec_path",
    "validate",
]

# Not in the spec: added at load time, see _completion_stream_schema.
COMPLETION_STREAM_SCHEMA = "CreateCompletionStreamResponse"
# The trimmed copy committed with the tests; FULL_SPEC_PATH is the full one beside the clone (../shared).
DEFAULT_SPEC_PATH = TRIMMED_PATH

# The document gets a synthetic URI so "#/components/schemas/X" refs resolve against it.
_BASE_URI = "urn:helios:openai-openapi"
_SCHEMAS_POINTER = "#/components/schemas/"

# Only these keywords hold subschemas; everything else (enum, default, example...) is data.
_SCHEMA_MAP_KEYWORDS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
_SCHEMA_LIST_KEYWORDS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
_SCHEMA_KEYWORDS = frozenset(
    {
        "items",
        "additionalItems",
        "additionalProperties",
        "unevaluatedItems",
        "unevaluatedProperties",
        "not",
        "contains",
        "propertyNames",
        "if",
        "then",
        "else",
    }
)
_COMBINATORS = frozenset({"$ref", "allOf", "anyOf", "oneOf", "not"})
# Kept on the outer schema when a nullable one is wrapped, so error output stays readable.
_ANNOTATIONS = ("title", "description", "default", "deprecated")
_MAX_MESSAGE = 400


class _State:
    """Per-process cache of the converted spec (mutated only under ``lock``)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.schemas: dict[str, Any] | None = None
        self.registry: Registry[Any] | None = None
        self.validators: dict[str, Any] = {}


_state = _State()


def spec_path() -> Path:
    """Path of the spec: $HELIOS_OPENAPI_SPEC, else the trimmed copy under tests/data."""
    override = os.environ.get(SPEC_ENV)
    return Path(override) if override else DEFAULT_SPEC_PATH


def _convert(node: Any) -> Any:
    """Rewrite one OpenAPI schema (recursively) into plain JSON Schema 2020-12."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-"):
            continue
        if key in _SCHEMA_MAP_KEYWORDS and isinstance(value, dict):
            out[key] = {name: _convert(sub) for name, sub in value.items()}
        elif key in _SCHEMA_LIST_KEYWORDS and isinstance(value, list):
            out[key] = [_convert(sub) for sub in value]
        elif key in _SCHEMA_KEYWORDS:
            out[key] = _convert(value)
        else:
            out[key] = value  # data keywords and scalars are copied untouched

    nullable = out.pop("nullable", False) is True
    # OpenAPI 3.0 idiom `allOf: [{$ref: X}, {nullable: true}]` means "X or null"; a bare
    # `{}` member would otherwise make the null branch a no-op.
    all_of = out.get("allOf")
    if isinstance(all_of, list) and any(_is_bare_null_marker(sub) for sub in all_of):
        nullable = True
        kept = [sub for sub in all_of if not _is_bare_null_marker(sub)]
        if kept:
            out["allOf"] = kept
        else:
            del out["allOf"]

    # 3.0 boolean exclusiveMinimum/Maximum modify minimum/maximum; 2020-12 wants numbers.
    for exclusive, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        flag = out.get(exclusive)
        if isinstance(flag, bool):
            del out[exclusive]
            if flag and bound in out:
                out[exclusive] = out.pop(bound)

    if nullable:
        out = _make_nullable(out)
    return out


def _is_bare_null_marker(schema: Any) -> bool:
    """True for `{nullable: true}` with nothing but annotations (already converted)."""
    return isinstance(schema, dict) and schema.get("_helios_null_marker") is True


def _make_nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """Return a schema that also accepts null."""
    constraints = {k: v for k, v in schema.items() if k not in _ANNOTATIONS}
    if not constraints:
        # Nothing to widen; mark it so an enclosing allOf can turn itself nullable.
        return {**schema, "_helios_null_marker": True}
    type_ = schema.get("type")
    if isinstance(type_, (str, list)) and not _COMBINATORS.intersection(schema) and "const" not in schema:
        types = [type_] if isinstance(type_, str) else list(type_)
        widened = dict(schema)
        if "null" not in types:
            widened["type"] = [*types, "null"]
        # An enum without null would still reject null even with the widened type.
        enum = widened.get("enum")
        if isinstance(enum, list) and None not in enum:
            widened["enum"] = [*enum, None]
        return widened
    outer = {k: schema[k] for k in _ANNOTATIONS if k in schema}
    outer["anyOf"] = [constraints, {"type": "null"}]
    return outer


def _strip_markers(node: Any) -> Any:
    """Drop leftover null markers (those outside any allOf) so they never reach jsonschema."""
    if isinstance(node, dict):
        return {k: _strip_markers(v) for k, v in node.items() if k != "_helios_null_marker"}
    if isinstance(node, list):
        return [_strip_markers(v) for v in node]
    return node


def _completion_stream_schema(response: dict[str, Any]) -> dict[str, Any]:
    """CreateCompletionResponse relaxed for stream chunks.

    The spec describes no event-stream for /completions, yet OpenAI streams
    ``text_completion`` chunks with ``finish_reason: null`` (until the last chunk)
    and ``usage: null`` (with ``stream_options.include_usage``).
    """
    schema = copy.deepcopy(response)
    choice = schema["properties"]["choices"]["items"]
    choice["properties"]["finish_reason"] = _make_nullable(choice["properties"]["finish_reason"])
    schema["properties"]["usage"] = _make_nullable(schema["properties"]["usage"])
    schema["description"] = "Helios-local: a streamed text_completion chunk."
    return schema


def load_schemas() -> dict[str, Any]:
    """Converted `components.schemas`, loaded once per process."""
    return _ensure_loaded()[0]


def _ensure_loaded() -> tuple[dict[str, Any], Registry[Any]]:
    with _state.lock:
        if _state.schemas is None or _state.registry is None:
            path = spec_path()
            try:
                document = json.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError as exc:
                raise FileNotFoundError(f"OpenAI spec not found at {path} (set {SPEC_ENV})") from exc
            raw = document["components"]["schemas"]
            schemas = {name: _strip_markers(_convert(schema)) for name, schema in raw.items()}
            schemas[COMPLETION_STREAM_SCHEMA] = _completion_stream_schema(schemas["CreateCompletionResponse"])
            # Only components are needed: every $ref in them points into components/schemas.
            resource = DRAFT202012.create_resource({"components": {"schemas": schemas}})
            _state.registry = Registry().with_resource(_BASE_URI, resource)
            _state.schemas = schemas
        return _state.schemas, _state.registry


def schema_names() -> list[str]:
    """All schema names under components/schemas."""
    return sorted(load_schemas())


def _validator(schema_name: str) -> Any:
    schemas, registry = _ensure_loaded()
    with _state.lock:
        validator = _state.validators.get(schema_name)
        if validator is None:
            if schema_name not in schemas:
                hint = ""
                if spec_path() == DEFAULT_SPEC_PATH:
                    hint = " (the trimmed copy: add it to ROOTS in tests/support/openapi_trim.py and regenerate)"
                raise KeyError(f"unknown schema {schema_name!r} in {spec_path()}{hint}")
            ref = {"$ref": f"{_BASE_URI}{_SCHEMAS_POINTER}{schema_name}"}
            validator = Draft202012Validator(ref, registry=registry)
            _state.validators[schema_name] = validator
        return validator


def _location(error: ValidationError) -> str:
    parts = ["$"]
    for item in error.absolute_path:
        parts.append(f"[{item}]" if isinstance(item, int) else f".{item}")
    return "".join(parts)


def _short(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def _describe(error: ValidationError, depth: int = 0) -> Iterator[str]:
    indent = "  " * (depth + 1)
    schema_path = "/".join(map(str, error.schema_path))
    yield f"{indent}- {_location(error)}: {_short(error.message)} (schema {schema_path})"
    # anyOf/oneOf failures only say "not valid under any"; the branch errors explain why.
    if error.context and depth < 2:
        for sub in sorted(error.context, key=lambda e: (-len(e.absolute_path), str(e.message)))[:6]:
            yield from _describe(sub, depth + 1)


def errors(schema_name: str, instance: object) -> list[str]:
    """Readable descriptions of every validation error (empty when valid)."""
    found = sorted(_validator(schema_name).iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))
    return ["\n".join(_describe(error)) for error in found]


def is_valid(schema_name: str, instance: object) -> bool:
    """Whether `instance` conforms to the named schema."""
    return bool(_validator(schema_name).is_valid(instance))


def validate(schema_name: str, instance: object) -> None:
    """Raise AssertionError listing every way `instance` violates the named schema."""
    problems = errors(schema_name, instance)
    if problems:
        shown = _short(json.dumps(instance, default=repr))
        raise AssertionError(
            f"{len(problems)} error(s) validating against {schema_name}:\n"
            + "\n".join(problems)
            + f"\ninstance: {shown}"
        )
