"""Trim OpenAI's OpenAPI spec to the schemas the tests validate against, for a self-contained clone.

``python -m tests.support.openapi_trim [--spec PATH] [--output PATH]`` reads the full spec (``--spec``, else
``$HELIOS_OPENAPI_SPEC``, else ``../shared/openai-openapi/openapi.json`` beside the clone) and writes
``tests/data/openai-schemas.json``: the ``components.schemas`` named in :data:`ROOTS` and every schema they
reference, transitively, with documentation-only keywords (``description``, ``title``, ``example(s)``,
``x-*``...) removed from schema objects, and a ``x-helios-source`` header saying where it came from.

The output is deterministic (sorted keys). The header's date (and the commit of a git checkout of the spec,
when there is one) are carried over from the existing output as long as nothing else changed, so
regenerating from the same spec gives identical bytes; ``tests/test_openapi_support.py`` checks that.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "DOC_KEYWORDS",
    "FULL_SPEC_PATH",
    "LICENSE_TEXT",
    "ROOTS",
    "SOURCE_KEY",
    "TRIMMED_PATH",
    "full_spec_path",
    "generate",
    "main",
    "references",
    "strip_docs",
    "trim",
]

_REPO = Path(__file__).resolve().parents[2]
# Where CI (and a development machine) keeps the full spec: ../shared beside the clone.
FULL_SPEC_PATH = _REPO.parent / "shared/openai-openapi/openapi.json"
TRIMMED_PATH = _REPO / "tests/data/openai-schemas.json"
SPEC_ENV = "HELIOS_OPENAPI_SPEC"  # the same variable tests/support/openapi.py reads
SOURCE_KEY = "x-helios-source"
UPSTREAM = "https://github.com/openai/openai-openapi"

# Every schema name the tests pass to validate()/is_valid()/errors() (directly or through helpers such as
# raw_json, _raw_json, stream and validated_chunks), and CreateCompletionResponse, the base of the synthetic
# CreateCompletionStreamResponse. A test naming a schema not listed here gets a KeyError saying so.
ROOTS = (
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateCompletionResponse",
    "CreateEmbeddingResponse",
    "ErrorResponse",
    "ListModelsResponse",
    "Model",
    "Response",
    "ResponseItemList",
    "ResponseStreamEvent",
)

# Keywords of a schema object that only document it: no validator looks at them. Keys starting with "x-"
# (x-oaiMeta, x-oaiTypeLabel, x-stainless-const...) are dropped too.
DOC_KEYWORDS = frozenset({"$comment", "deprecated", "description", "example", "examples", "externalDocs", "title"})

# Where subschemas sit inside a schema object; everything else (enum, const, default, required...) is data and
# is copied untouched, so a property or enum value called "description" survives.
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
        "contentSchema",
    }
)
_REF_PREFIX = "#/components/schemas/"
# Header fields that describe the machine that generated the file rather than the spec it came from.
_VOLATILE = ("generated", "checkout_commit")

# The licence of OpenAI's openai-openapi repository, under which the trimmed schemas are redistributed.
LICENSE_TEXT = """\
MIT License

Copyright (c) 2020 OpenAI

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


def full_spec_path() -> Path:
    """The full spec: $HELIOS_OPENAPI_SPEC, else ../shared/openai-openapi/openapi.json beside the clone."""
    override = os.environ.get(SPEC_ENV)
    return Path(override) if override else FULL_SPEC_PATH


def strip_docs(schema: Any) -> Any:
    """A copy of one schema object (recursively) without its documentation-only keywords."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in DOC_KEYWORDS or key.startswith("x-"):
            continue
        if key in _SCHEMA_MAP_KEYWORDS and isinstance(value, dict):
            out[key] = {name: strip_docs(sub) for name, sub in value.items()}
        elif key in _SCHEMA_LIST_KEYWORDS and isinstance(value, list):
            out[key] = [strip_docs(sub) for sub in value]
        elif key in _SCHEMA_KEYWORDS:
            out[key] = strip_docs(value)
        else:
            out[key] = value
    return out


def _refs(node: Any) -> Iterator[str]:
    # Every "$ref" anywhere, not only in schema positions: an extra schema kept is harmless, a missing one is not.
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def references(schema: Any) -> set[str]:
    """Names of the component schemas one schema refers to."""
    names = set()
    for ref in _refs(schema):
        if not ref.startswith(_REF_PREFIX):
            raise ValueError(f"unsupported $ref {ref!r}: only {_REF_PREFIX}... is resolved")
        names.add(ref.removeprefix(_REF_PREFIX))
    return names


def trim(schemas: dict[str, Any], roots: Iterable[str] = ROOTS) -> dict[str, Any]:
    """The named schemas and all they reference, transitively, each stripped of documentation."""
    kept: dict[str, Any] = {}
    pending = list(roots)
    while pending:
        name = pending.pop()
        if name in kept:
            continue
        if name not in schemas:
            raise KeyError(f"schema {name!r} is not in the spec's components.schemas")
        kept[name] = strip_docs(schemas[name])
        pending.extend(sorted(references(kept[name]) - kept.keys()))
    return kept


def _upstream_commit(spec: Path) -> str | None:
    """The openai-openapi commit named by a README beside the spec (../shared/openai-openapi/README.md)."""
    try:
        text = (spec.parent / "README.md").read_text(encoding="utf-8")
    except OSError:
        return None
    found = re.search(r"openai/openai-openapi,?\s+commit\s+([0-9a-f]{40})", text)
    return found.group(1) if found else None


def _checkout_commit(spec: Path) -> str | None:
    """HEAD of a git checkout holding the spec file, when it is tracked and unmodified there."""
    directory = spec.resolve().parent
    try:
        tracked = subprocess.run(
            ["git", "-C", str(directory), "ls-files", "--error-unmatch", spec.name],
            capture_output=True, text=True, timeout=30, check=False,
        )
        if tracked.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(directory), "status", "--porcelain", "--", spec.name],
            capture_output=True, text=True, timeout=30, check=True,
        )
        if dirty.stdout.strip():
            return None
        head = subprocess.run(
            ["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() or None


def _sorted(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: _sorted(node[key]) for key in sorted(node)}
    if isinstance(node, list):
        return [_sorted(value) for value in node]
    return node


def _render(document: dict[str, Any]) -> str:
    """Sorted keys at every level, except that the header comes first."""
    ordered = {SOURCE_KEY: _sorted(document[SOURCE_KEY])}
    ordered.update(_sorted({key: value for key, value in document.items() if key != SOURCE_KEY}))
    return json.dumps(ordered, indent=1, ensure_ascii=False) + "\n"


def generate(spec: Path, previous: str | None = None, today: datetime.date | None = None) -> str:
    """The trimmed file's text, from the full spec at ``spec``.

    ``previous`` is the current trimmed file's text: when only the header's volatile fields (date, checkout
    commit) would change, it is returned unchanged.
    """
    raw = spec.read_bytes()
    document = json.loads(raw)
    schemas = trim(document["components"]["schemas"])
    info = document.get("info", {})
    source: dict[str, Any] = {
        "comment": (
            "Generated by `python -m tests.support.openapi_trim` from OpenAI's OpenAPI spec; do not edit. Only the "
            "components.schemas listed under roots and those they reference, without documentation-only keywords."
        ),
        "roots": sorted(ROOTS),
        "spec": {
            "repository": UPSTREAM,
            "file": "openapi.json",
            "openapi": document.get("openapi"),
            "info_version": info.get("version"),
            "commit": _upstream_commit(spec),
            "sha256": hashlib.sha256(raw).hexdigest(),
        },
        "license": {"spdx": "MIT", "text": LICENSE_TEXT},
        "generated": (today or datetime.datetime.now(datetime.UTC).date()).isoformat(),
    }
    checkout = _checkout_commit(spec)
    if checkout is not None:
        source["checkout_commit"] = checkout
    trimmed = {
        SOURCE_KEY: source,
        "openapi": document.get("openapi"),
        "info": {key: info[key] for key in ("title", "version", "license") if key in info},
        "components": {"schemas": schemas},
    }
    if previous is not None:
        try:
            before = json.loads(previous)[SOURCE_KEY]
        except (ValueError, KeyError, TypeError):
            before = None
        if isinstance(before, dict):
            kept = {**source}
            for key in _VOLATILE:
                kept.pop(key, None)
                if key in before:
                    kept[key] = before[key]
            if _render({**trimmed, SOURCE_KEY: kept}) == previous:
                return previous
    return _render(trimmed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.openapi_trim", description=__doc__.split("\n")[0])
    parser.add_argument("--spec", type=Path, default=None, help=f"full spec (default: ${SPEC_ENV} or {FULL_SPEC_PATH})")
    parser.add_argument("--output", type=Path, default=TRIMMED_PATH, help=f"trimmed file (default: {TRIMMED_PATH})")
    args = parser.parse_args(argv)
    spec: Path = args.spec or full_spec_path()
    output: Path = args.output
    if not spec.is_file():
        parser.error(f"full spec not found at {spec} (give --spec or set {SPEC_ENV})")
    previous = output.read_text(encoding="utf-8") if output.is_file() else None
    text = generate(spec, previous)
    if text == previous:
        print(f"{output}: up to date ({len(text.encode())} bytes)")
        return 0
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
    count = len(json.loads(text)["components"]["schemas"])
    print(f"{output}: wrote {count} schemas, {len(text.encode())} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
