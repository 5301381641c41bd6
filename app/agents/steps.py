"""How an agent's steps are shown to the client: lines of ``reasoning_content``, identical in a stream and in
a whole answer.

Chat UIs (Open WebUI, LibreChat) show ``reasoning_content`` as a collapsible section and the ``openai``
client accepts it on both messages and deltas, so the steps are visible without touching ``content``, which
stays only the answer. One line when a tool call starts (name and arguments), one when it ends (outcome and
a preview of the result), in the order they happen.
"""

from __future__ import annotations

_PREVIEW = 300


def started(step: int, name: str, arguments: str) -> str:
    return f"[step {step}] → {name}({arguments})\n"


def finished(step: int, name: str, outcome: str, text: str, seconds: float) -> str:
    preview = " ".join(text.split())
    if len(preview) > _PREVIEW:
        preview = preview[: _PREVIEW - 1] + "…"
    status = "" if outcome == "ok" else f" [{outcome}]"
    return f"[step {step}] ← {name}{status} in {seconds * 1000:.0f} ms: {preview}\n"


def step_limit(max_steps: int) -> str:
    return f"[step limit] {max_steps} rounds of tool calls reached: answering without more tools.\n"
