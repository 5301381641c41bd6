"""The tool interface an agent's loop calls: built-in tools and MCP servers are two sources of these."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True, frozen=True)
class ToolResult:
    """What a tool call gives back to the model: text, and whether it is an error report."""

    text: str
    is_error: bool = False


class Tool(ABC):
    """One server-side tool. ``parameters`` is the JSON schema of its arguments (an object)."""

    name: str
    description: str
    parameters: dict[str, Any]
    #: the MCP server it belongs to; None for a built-in
    server: str | None = None

    @abstractmethod
    async def call(self, arguments: dict[str, Any]) -> ToolResult:
        """Run the tool. Raising is allowed (the loop turns it into an error result); so is being cancelled,
        which must stop the work (the client left)."""

    def definition(self) -> dict[str, Any]:
        """The tool as the Chat Completions ``tools`` entry the model sees."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


class ToolSource(ABC):
    """Something that provides tools and may need a connection: the built-ins, or one MCP server."""

    #: for /ready and logs, e.g. "builtin" or "mcp:files"
    label: str

    @abstractmethod
    async def start(self) -> None:
        """Connect and list tools; failing here stops start-up."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    def tools(self) -> list[Tool]:
        """The tools available now (after filtering and prefixing)."""

    @abstractmethod
    def not_ready_reason(self) -> str | None:
        """None when every tool can be called, else a short reason for /ready."""
