"""The built-in tools: a small, safe set with no shell and no file-system access.

``calculator`` evaluates arithmetic with its own parser over decimals (never ``eval``), ``current_time``
tells the time in a timezone, and ``http_fetch`` GETs a URL from an agent's list of allowed hosts, refusing
redirects to any other host.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import zoneinfo
from concurrent.futures import ThreadPoolExecutor
from decimal import ROUND_FLOOR, Decimal, DivisionByZero, InvalidOperation, Overflow, localcontext
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx2

from app.agents.tools import Tool, ToolResult, ToolSource
from app.settings import AgentSettings

_MAX_EXPRESSION = 1000
_MAX_EXPONENT = 10_000
_MAX_REDIRECTS = 5
_EXACT_DIGITS = 1000
# Results that are not integers are shown to 50 significant digits, so a fractional power (the one costly
# operation: a logarithm and an exponential at the context's precision) is worked out to a few more than that,
# not to the 1,000 digits of exact integers. With this and the length limit, every expression is cheap.
_INEXACT_DIGITS = 60
_SHOWN_DIGITS = 50
# Parentheses nested deeper than this are refused rather than recursed into.
_MAX_DEPTH = 100


def _schema(*, optional: bool = False, **strings: str) -> dict[str, Any]:
    """An arguments schema of string properties with these descriptions (all required unless optional)."""
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False,
                              "properties": {name: {"type": "string", "description": text}
                                             for name, text in strings.items()}}
    if not optional:
        schema["required"] = list(strings)
    return schema


class CalculatorError(ValueError):
    """An expression that is not arithmetic, or whose value cannot be computed."""


class _Parser:
    """Recursive descent over + - * / // % ** ^ ( ) and unary signs, with the usual precedence:
    ``**``/``^`` binds tighter than unary minus on its left (``-2**2 == -4``) and is right-associative."""

    _TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)|(\*\*|//|[-+*/%^()]))")

    def __init__(self, text: str) -> None:
        self.tokens: list[str] = []
        position = 0
        text = text.rstrip()
        while position < len(text):
            match = self._TOKEN.match(text, position)
            if match is None:
                raise CalculatorError(f"unexpected character {text[position:].lstrip()[:1]!r}")
            self.tokens.append(match.group(1) or match.group(2))
            position = match.end()
        self.position = 0
        self.depth = 0

    def parse(self) -> Decimal:
        if not self.tokens:
            raise CalculatorError("empty expression")
        value = self._sum()
        if self.position != len(self.tokens):
            raise CalculatorError(f"unexpected {self.tokens[self.position]!r}")
        return value

    def _peek(self) -> str | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def _take(self) -> str:
        token = self._peek()
        if token is None:
            raise CalculatorError("the expression ends too early")
        self.position += 1
        return token

    def _sum(self) -> Decimal:
        value = self._product()
        while self._peek() in ("+", "-"):
            value = value + self._product() if self._take() == "+" else value - self._product()
        return value

    def _product(self) -> Decimal:
        value = self._unary()
        while self._peek() in ("*", "/", "//", "%"):
            operator, right = self._take(), self._unary()
            if operator == "*":
                value *= right
            elif right == 0:
                raise CalculatorError("division by zero")
            elif operator == "/":
                value /= right
            else:
                # Floor division and its remainder, as in Python (Decimal's own truncate towards zero).
                floor = (value / right).to_integral_value(rounding=ROUND_FLOOR)
                value = floor if operator == "//" else value - right * floor
        return value

    def _unary(self) -> Decimal:
        # A run of signs is read in a loop: a recursion per sign would let "------1" exhaust the stack.
        negative = False
        while self._peek() in ("+", "-"):
            negative ^= self._take() == "-"
        value = self._power()
        return -value if negative else value

    def _power(self) -> Decimal:
        base = self._atom()
        if self._peek() in ("**", "^"):
            self._take()
            exponent = self._unary()  # right-associative, and 2**-1 is allowed
            if abs(exponent) > _MAX_EXPONENT:
                raise CalculatorError("exponent too large")
            if base == 0 and exponent < 0:
                raise CalculatorError("division by zero")
            if exponent == exponent.to_integral_value():
                return base**exponent
            with localcontext() as context:
                context.prec = _INEXACT_DIGITS
                return base**exponent
        return base

    def _atom(self) -> Decimal:
        token = self._take()
        if token == "(":
            self.depth += 1
            if self.depth > _MAX_DEPTH:
                raise CalculatorError(f"parentheses nested deeper than {_MAX_DEPTH}")
            value = self._sum()
            if self._take() != ")":
                raise CalculatorError("missing ')'")
            self.depth -= 1
            return value
        if token[0].isdigit() or token[0] == ".":
            return Decimal(token)
        raise CalculatorError(f"unexpected {token!r}")


def calculate(expression: str) -> str:
    """The value of an arithmetic expression: integers exact up to 1,000 digits, other results to 50
    significant digits. Every failure is a CalculatorError saying why (never Python's own exceptions)."""
    if len(expression) > _MAX_EXPRESSION:
        raise CalculatorError(f"expression longer than {_MAX_EXPRESSION} characters")
    with localcontext() as context:
        context.prec = _EXACT_DIGITS
        context.Emax = 100_000
        context.Emin = -100_000
        try:
            value = _Parser(expression).parse()
            if value == value.to_integral_value() and value.adjusted() < _EXACT_DIGITS:
                return str(value.quantize(Decimal(1)))
            context.prec = _SHOWN_DIGITS
            return str(+value.normalize(context))
        except (DivisionByZero, ZeroDivisionError):
            raise CalculatorError("division by zero") from None
        except Overflow:
            raise CalculatorError("a number or the result is too large") from None
        except InvalidOperation:
            raise CalculatorError("the result is not a number (e.g. a fractional power of a negative)") from None


class Calculator(Tool):
    name = "calculator"
    description = ("Evaluate an arithmetic expression exactly: + - * / // % and ** (or ^), parentheses, "
                   "integers and decimals. Example: (2 + 3) * 4.5")
    parameters = _schema(expression="The expression, e.g. 12 * (3 + 4) / 2")

    def __init__(self) -> None:
        # Bounded work, but still milliseconds of CPU for the longest expressions: off the event loop, so that
        # other requests are served meanwhile, and on one thread, so that concurrent calls queue behind each
        # other instead of taking turns at the interpreter lock with the event loop.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="helios-calculator")

    async def call(self, arguments: dict[str, Any]) -> ToolResult:
        try:
            expression = str(arguments["expression"])
            return ToolResult(await asyncio.get_running_loop().run_in_executor(self._thread, calculate, expression))
        except CalculatorError as exc:
            return ToolResult(f"error: {exc}", is_error=True)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


class CurrentTime(Tool):
    name = "current_time"
    description = "The current date and time in an IANA timezone (default UTC), in ISO 8601 with weekday."
    parameters = _schema(optional=True, timezone="An IANA timezone such as Europe/Paris or UTC")

    async def call(self, arguments: dict[str, Any]) -> ToolResult:
        name = str(arguments.get("timezone") or "UTC")
        try:
            zone = zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            return ToolResult(f"error: unknown timezone {name!r}; use an IANA name such as Europe/Paris",
                              is_error=True)
        now = dt.datetime.now(zone)
        return ToolResult(f"{now.isoformat(timespec='seconds')} ({now.strftime('%A')}, {name})")


class HttpFetch(Tool):
    name = "http_fetch"
    description = "GET a web page or API by URL and return its status and text (only from allowed hosts)."
    parameters = _schema(url="The http(s) URL to GET")

    def __init__(self, allow_hosts: list[str], timeout: float, max_bytes: int) -> None:
        self._hosts = frozenset(host.lower() for host in allow_hosts)
        self._max_bytes = max_bytes
        self._client = httpx2.AsyncClient(timeout=timeout, follow_redirects=False)
        self.description = f"{self.description} Allowed hosts: {', '.join(sorted(self._hosts))}."

    def _refusal(self, url: str) -> str | None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            return f"only http and https URLs can be fetched, not {url!r}"
        if (parts.hostname or "").lower() not in self._hosts:
            return f"host {parts.hostname!r} is not allowed (allowed: {', '.join(sorted(self._hosts))})"
        return None

    async def call(self, arguments: dict[str, Any]) -> ToolResult:
        url = str(arguments["url"])
        for _ in range(_MAX_REDIRECTS + 1):
            refusal = self._refusal(url)
            if refusal is not None:
                return ToolResult(f"error: {refusal}", is_error=True)
            async with self._client.stream("GET", url) as response:
                if response.is_redirect and "location" in response.headers:
                    url = urljoin(url, response.headers["location"])
                    continue
                body = bytearray()
                async for piece in response.aiter_bytes():
                    body += piece
                    if len(body) > self._max_bytes:
                        break
                text = body[: self._max_bytes].decode(response.encoding or "utf-8", errors="replace")
                return ToolResult(f"HTTP {response.status_code}\n{text}", is_error=response.status_code >= 400)
        return ToolResult(f"error: more than {_MAX_REDIRECTS} redirects", is_error=True)

    async def close(self) -> None:
        await self._client.aclose()


class Builtins(ToolSource):
    """The built-in tools an agent lists in ``tools``."""

    label = "builtin"

    def __init__(self, settings: AgentSettings) -> None:
        self._tools: list[Tool] = []
        for name in settings.tools:
            if name == "calculator":
                self._tools.append(Calculator())
            elif name == "current_time":
                self._tools.append(CurrentTime())
            else:
                self._tools.append(HttpFetch(settings.http_allow_hosts, settings.tool_timeout,
                                             settings.max_tool_output_bytes))

    async def start(self) -> None:
        """Nothing to connect."""

    async def close(self) -> None:
        for tool in self._tools:
            if isinstance(tool, HttpFetch):
                await tool.close()
            elif isinstance(tool, Calculator):
                tool.close()

    def tools(self) -> list[Tool]:
        return self._tools

    def not_ready_reason(self) -> str | None:
        return None
