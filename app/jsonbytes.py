"""Edits to JSON documents held as bytes, without a parse and re-serialise when it can be avoided.

The gateway must rewrite a couple of top-level fields (``model``, ``stream_options``) in bodies it
otherwise relays untouched; on every request and every stream chunk a full round trip through Python
objects would cost more than the rest of the relay.
"""

from __future__ import annotations

import json
import re
from typing import Any

_encode_basestring = json.encoder.encode_basestring
_MODEL_KEY = re.compile(rb'"model"\s*:\s*"(?:[^"\\]|\\.)*"')


def encode_string(value: str) -> bytes:
    # The encoder json.dumps(ensure_ascii=False) ends up calling, without its per-call set-up: this runs for
    # every streamed token of a Responses stream.
    return _encode_basestring(value).encode()


def _outer_object_start(doc: bytes) -> int:
    start = doc.find(b"{")
    if start == -1 or doc[:start].strip():
        return -1
    return start


def replace_model(doc: bytes, encoded_name: bytes) -> bytes:
    """Set the top-level ``model`` string of a JSON object to ``encoded_name`` (already JSON-encoded)."""
    start = _outer_object_start(doc)
    match = _MODEL_KEY.search(doc, start + 1) if start != -1 else None
    # In valid JSON an unescaped '"model"' followed by ':' is a key; it belongs to the outermost
    # object for sure when no '{' or '[' appears before it (a nested object needs one).
    if (
        match is not None
        and doc.find(b"{", start + 1, match.start()) == -1
        and doc.find(b"[", start + 1, match.start()) == -1
    ):
        return b"".join((doc[: match.start()], b'"model":', encoded_name, doc[match.end():]))
    return set_fields(doc, {"model": json.loads(encoded_name)})


def prepend_field(doc: bytes, key: str, encoded_value: bytes) -> bytes:
    """Add a top-level key the document does not have yet (the caller knows it is absent)."""
    start = _outer_object_start(doc)
    if start == -1:
        return set_fields(doc, {key: json.loads(encoded_value)})
    rest = doc[start + 1:]
    separator = b"" if rest.lstrip().startswith(b"}") else b","
    return b"".join((b"{", encode_string(key), b":", encoded_value, separator, rest))


def set_fields(doc: bytes, fields: dict[str, Any]) -> bytes:
    """The slow, always-correct path: parse, update top-level fields, serialise."""
    data = json.loads(doc)
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    data.update(fields)
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
