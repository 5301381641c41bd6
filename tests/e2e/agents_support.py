"""Helpers for agent tests: scripts for the fake provider's ``tool-script`` model, and reading its answers.

The ``tool-script`` model answers with the tool calls a test puts in the user message, round after round, then
with text quoting every tool result it received (``results: <call id>=<content> | ...``).
"""

from __future__ import annotations

import json
from typing import Any


def script(*rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation asking the scripted model for these rounds of tool calls."""
    return [{"role": "user", "content": json.dumps({"rounds": list(rounds)})}]


def calc(expression: str) -> dict[str, Any]:
    return {"name": "calculator", "arguments": {"expression": expression}}


def results(content: str | None) -> dict[str, str]:
    """The scripted model's quoted tool results: call id -> result text."""
    assert content and content.startswith("results: "), content
    pairs = [part.split("=", 1) for part in content.removeprefix("results: ").split(" | ") if part]
    return {key: value for key, value in pairs}
