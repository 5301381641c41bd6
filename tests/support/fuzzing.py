"""Fuzzing from the appliance's own ``/openapi.json``: hypothesis strategies for request bodies, the document
as the oracle of what is valid, and mutations that break one field of a body.

The generator covers the JSON Schema that pydantic emits (``type``, ``properties``, ``required``, ``items``,
``anyOf``/``oneOf``, ``enum``/``const``, bounds, ``pattern``, ``propertyNames``, ``$ref``); keywords it does not
generate from (``allOf``, ``if``/``then``, ``not``) are the document's cross-field rules, which the oracle
(a full JSON Schema validator over the same document) decides. So a generated body needs not be valid: the test
asks the document whether it is, and expects the appliance to agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st
from jsonschema import Draft202012Validator, validators  # type: ignore[import-untyped]
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

Json = Any
Path = tuple[int | str, ...]

#: JSON Schema calls 2.0 an integer; the appliance's models are strict and do not (an integer is written
#: without a fraction), so the oracle takes the models' meaning.
_STRICT_TYPES = Draft202012Validator.TYPE_CHECKER.redefine(
    "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool))
OwnValidator = validators.extend(Draft202012Validator, type_checker=_STRICT_TYPES)

_BASE_URI = "urn:helios:own-openapi"
_COMPONENTS = "#/components/schemas/"
#: Arrays and free-form objects stay small: the point is shapes and values, not volume (tests/e2e has the
#: hostile sizes).
MAX_ITEMS = 3
MAX_TEXT = 24

#: Strings that have broken parsers and renderers before: markup, template syntax, control and wide characters.
_TRICKY_TEXT = st.sampled_from([
    "", " ", "\x00", "\n\n", "{{ raise_exception('x') }}", "{% for %}", "<|im_start|>", "</s>", "\u202e\ufeff",
    "\U0001f600" * 3, "null", "0", "-1", "1e309", "\\", '"', "a" * 300,
])
TEXT = st.one_of(st.text(max_size=MAX_TEXT), _TRICKY_TEXT)
#: Integers where the schema sets no bound, from the ordinary to the ones that overflow C types.
_WIDE_INTS = st.one_of(st.integers(-3, 300), st.sampled_from([2**31, 2**32 + 1, 2**63, -(2**63) - 1, 2**64, 10**30]))
_FLOATS = st.floats(allow_nan=False, allow_infinity=False, width=64)

JSON_VALUES: st.SearchStrategy[Json] = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | _FLOATS | TEXT,
    lambda inner: st.lists(inner, max_size=MAX_ITEMS) | st.dictionaries(TEXT, inner, max_size=MAX_ITEMS),
    max_leaves=6,
)


@dataclass(frozen=True)
class Document:
    """One published OpenAPI document: its request body schemas and a validator for each."""

    raw: Mapping[str, Any]

    @property
    def components(self) -> Mapping[str, Any]:
        schemas: Mapping[str, Any] = self.raw.get("components", {}).get("schemas", {})
        return schemas

    def post_routes(self) -> list[str]:
        """Every path whose POST operation takes a JSON body."""
        return sorted(path for path, item in self.raw["paths"].items()
                      if "application/json" in item.get("post", {}).get("requestBody", {}).get("content", {}))

    def request_schema(self, path: str) -> Mapping[str, Any]:
        schema: Mapping[str, Any] = (self.raw["paths"][path]["post"]["requestBody"]["content"]
                                     ["application/json"]["schema"])
        return schema

    def resolve(self, schema: Mapping[str, Any]) -> Mapping[str, Any]:
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith(_COMPONENTS):
            return self.resolve(self.components[ref.removeprefix(_COMPONENTS)])
        return schema

    def validator(self, path: str) -> Any:
        resource: Resource[Any] = DRAFT202012.create_resource(dict(self.raw))
        registry: Registry[Any] = Registry().with_resource(_BASE_URI, resource)
        pointer = path.replace("~", "~0").replace("/", "~1")
        ref = {"$ref": f"{_BASE_URI}#/paths/{pointer}/post/requestBody/content/application~1json/schema"}
        return OwnValidator(ref, registry=registry)


#: An override that leaves a property out of the generated bodies.
OMIT: st.SearchStrategy[Json] = st.nothing()
Overrides = Mapping[Path, st.SearchStrategy[Json]]


def bodies(document: Document, schema: Mapping[str, Any],
           overrides: Overrides | None = None) -> st.SearchStrategy[Json]:
    """Bodies shaped by ``schema``; ``overrides`` replace the strategy at a property path (``("model",)``)."""
    return _from_schema(document, schema, (), overrides or {})


def _from_schema(document: Document, schema: Mapping[str, Any], at: Path, overrides: Overrides) -> Any:
    if at in overrides:
        return overrides[at]
    schema = document.resolve(schema)
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    members = schema.get("anyOf") or schema.get("oneOf")
    if members:
        return st.one_of([_from_schema(document, member, at, overrides) for member in members])
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of([_from_schema(document, {**schema, "type": k}, at, overrides) for k in kind])
    build = _BUILDERS.get(kind) if isinstance(kind, str) else None
    return JSON_VALUES if build is None else build(document, schema, at, overrides)


def _string(document: Document, schema: Mapping[str, Any], at: Path, overrides: Overrides) -> Any:
    if "pattern" in schema:
        return st.from_regex(schema["pattern"], fullmatch=True).filter(lambda s: len(s) <= MAX_TEXT * 4)
    low = schema.get("minLength", 0)
    high = schema.get("maxLength", max(low, MAX_TEXT))
    return st.text(min_size=low, max_size=high) | TEXT.filter(lambda s: low <= len(s) <= high)


def _integer(document: Document, schema: Mapping[str, Any], at: Path, overrides: Overrides) -> Any:
    low, high = schema.get("minimum"), schema.get("maximum")
    if "exclusiveMinimum" in schema:
        low = math.floor(schema["exclusiveMinimum"]) + 1
    if "exclusiveMaximum" in schema:
        high = math.ceil(schema["exclusiveMaximum"]) - 1
    edges = [v for v in (low, high) if v is not None]
    ranged = _WIDE_INTS.filter(lambda v: (low is None or v >= low) and (high is None or v <= high))
    return st.one_of(st.integers(low, high), ranged, *(st.just(v) for v in edges))


def _number(document: Document, schema: Mapping[str, Any], at: Path, overrides: Overrides) -> Any:
    low, high = schema.get("minimum"), schema.get("maximum")
    floats = st.floats(low, high, allow_nan=False, allow_infinity=False)
    return floats | _integer(document, schema, at, overrides)


def _array(document: Document, schema: Mapping[str, Any], at: Path, overrides: Overrides) -> Any:
    low = schema.get("minItems", 0)
    high = min(schema.get("maxItems", MAX_ITEMS), max(low, MAX_ITEMS))
    items = schema.get("items", {})

    def at_index(i: int) -> Any:
        return _from_schema(document, items, (*at, i), overrides)

    return st.integers(low, high).flatmap(lambda n: st.tuples(*(at_index(i) for i in range(n))).map(list))


def _object(document: Document, schema: Mapping[str, Any], at: Path, overrides: Overrides) -> Any:
    properties: Mapping[str, Any] = schema.get("properties", {})
    if not properties:
        names = schema.get("propertyNames", {})
        values = schema.get("additionalProperties")
        patterns: Mapping[str, Any] = schema.get("patternProperties", {})
        if len(patterns) == 1:
            [(pattern, values)] = patterns.items()
            names = names or {"pattern": pattern}
        keys = _string(document, names, at, overrides) if names else TEXT
        inner = _from_schema(document, values, (*at, "*"), overrides) if isinstance(values, dict) else JSON_VALUES
        low = schema.get("minProperties", 0)
        high = min(schema.get("maxProperties", MAX_ITEMS), max(low, MAX_ITEMS))
        return st.dictionaries(keys, inner, min_size=low, max_size=high)
    required = set(schema.get("required", ()))
    strategies = {name: _from_schema(document, sub, (*at, name), overrides) for name, sub in properties.items()
                  if overrides.get((*at, name)) is not OMIT}
    objects = st.fixed_dictionaries({k: v for k, v in strategies.items() if k in required},
                                    optional={k: v for k, v in strategies.items() if k not in required})
    if "allOf" not in schema:
        return objects
    # Cross-field rules, met where they are (a few retries per object) rather than by a whole body at once;
    # mostly, since an object breaking them is a case too.
    rules = Draft202012Validator({"allOf": schema["allOf"]})
    return st.one_of(objects.filter(rules.is_valid), objects.filter(rules.is_valid), objects)


_BUILDERS: dict[str, Callable[[Document, Mapping[str, Any], Path, Overrides], Any]] = {
    "string": _string,
    "integer": _integer,
    "number": _number,
    "boolean": lambda *_: st.booleans(),
    "null": lambda *_: st.none(),
    "array": _array,
    "object": _object,
}


# ---- the oracle ----------------------------------------------------------------------------------


def violations(validator: Any, body: Json) -> list[Path]:
    """Where ``body`` breaks the document (every error's location, nested ones of anyOf/oneOf included)."""
    found: list[Path] = []

    def walk(errors: Any) -> None:
        for error in errors:
            at = tuple(error.absolute_path)
            found.append(at)
            if error.validator == "required" and isinstance(error.instance, dict):
                # A missing property is told by its own name, not its parent's.
                found.extend((*at, name) for name in error.validator_value if name not in error.instance)
            walk(error.context or ())

    walk(validator.iter_errors(body))
    return found


def related(a: Sequence[int | str], b: Sequence[int | str]) -> bool:
    """Whether one location is inside the other (a rule on an object names the object, not its field)."""
    n = min(len(a), len(b))
    return tuple(a[:n]) == tuple(b[:n])


# ---- mutations -----------------------------------------------------------------------------------

#: What a broken field becomes: each of JSON's kinds, the edges of numbers and the empty containers.
WRONG_VALUES: st.SearchStrategy[Json] = st.one_of(
    st.sampled_from([None, True, False, 0, -1, 1.5, -1e308, 2**64, 10**400, "", "x", [], {}, [None], {"": None}]),
    JSON_VALUES,
)
DELETE = object()


def locations(body: Json, at: Path = ()) -> list[Path]:
    """Every location in a body, containers included (not the root)."""
    out: list[Path] = []
    children: Any = body.items() if isinstance(body, dict) else enumerate(body) if isinstance(body, list) else ()
    for key, value in children:
        out.append((*at, key))
        out.extend(locations(value, (*at, key)))
    return out


def replaced(body: Json, at: Path, value: Any) -> Json:
    """A copy of ``body`` with the value at ``at`` replaced (or deleted, with :data:`DELETE`)."""
    if not at:
        return value
    head, *rest = at
    if isinstance(body, dict):
        copy = dict(body)
        if not rest and value is DELETE:
            del copy[head]
        else:
            copy[head] = replaced(body[head], tuple(rest), value)
        return copy
    items = list(body)
    assert isinstance(head, int)
    if not rest and value is DELETE:
        del items[head]
    else:
        items[head] = replaced(items[head], tuple(rest), value)
    return items


@st.composite
def mutated(draw: st.DrawFn, body: Json, kept: frozenset[Path] = frozenset()) -> tuple[Path, Json]:
    """``body`` with one location (not one of ``kept``) replaced by a wrong value or deleted; the location too."""
    spots = [spot for spot in locations(body) if spot not in kept]
    if not spots:
        return (), draw(WRONG_VALUES)
    at = draw(st.sampled_from(spots))
    return at, replaced(body, at, draw(st.one_of(st.just(DELETE), WRONG_VALUES)))


def parse_param(param: str) -> Path:
    """The inverse of :func:`app.errors.param_path`: ``messages[0].content`` -> ``("messages", 0, "content")``."""
    out: list[int | str] = []
    for piece in param.replace("[", ".[").split("."):
        if piece.startswith("[") and piece.endswith("]") and piece[1:-1].isdigit():
            out.append(int(piece[1:-1]))
        elif piece:
            out.append(piece)
    return tuple(out)
