"""The calculator built-in (app.agents.builtins.calculate), in-process: values, its own errors for what Python
would raise, and bounded work for any expression it accepts."""

from __future__ import annotations

import contextlib
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.agents.builtins import CalculatorError, calculate


@pytest.mark.parametrize(("expression", "value"), [
    ("(2 + 3) * 4.5", "22.5"), ("-2**2", "-4"), ("2**-2", "0.25"), ("2^10", "1024"), ("7 // 2", "3"),
    ("-7 // 2", "-4"), ("7 % -3", "-2"), ("4**0.5", "2"),
    ("2**0.5", "1.4142135623730950488016887242096980785696718753769"),
    ("-" * 999 + "1", "-1"), ("(" * 100 + "1" + ")" * 100, "1"), ("10**999", "1" + "0" * 999),
])
def test_values(expression: str, value: str) -> None:
    assert calculate(expression) == value


@pytest.mark.parametrize(("expression", "error"), [
    ("(" * 200 + "1" + ")" * 200, "nested deeper"),
    ("1e999999999", "too large"),
    ("1e99999 * 1e99999", "too large"),
    ("0**-1", "division by zero"),
    ("1/0", "division by zero"),
    ("(-8)**(1/3)", "not a number"),
    ("2**100001", "exponent too large"),
    ("2 +", "ends too early"),
    ("import os", "unexpected character"),
    ("1" * 1001, "longer than 1000"),
])
def test_errors_are_the_calculators_own(expression: str, error: str) -> None:
    with pytest.raises(CalculatorError, match=error):
        calculate(expression)


def _timed(expression: str) -> float:
    started = time.process_time()
    with contextlib.suppress(CalculatorError):
        calculate(expression)
    return time.process_time() - started


def test_the_costliest_known_expressions_are_cheap() -> None:
    # Fractional powers were the costly operation: a 995-character sum of them took seconds of CPU.
    for expression in ("+".join(["9**.9"] * 166), "+".join(["0.123456789**0.987654321"] * 40),
                       "+".join(["7**9999"] * 90)):
        assert len(expression) <= 1000
        assert _timed(expression) < 0.5, expression[:40]


_ATOMS = st.sampled_from(["9", ".9", "0", "1e9", "9999", "0.5", "1.0000001", "7"])
_OPS = st.sampled_from(["+", "-", "*", "/", "//", "%", "**", "^"])


@st.composite
def _expressions(draw: st.DrawFn) -> str:
    parts = [draw(_ATOMS)]
    for _ in range(draw(st.integers(0, 120))):
        parts += [draw(_OPS), draw(st.sampled_from(["", "-", "("])) + draw(_ATOMS)]
    text = "".join(parts)
    return text + ")" * (text.count("(") - text.count(")"))


@settings(max_examples=150, deadline=None)
@given(st.one_of(_expressions(), st.text(max_size=300)))
def test_any_input_is_a_value_or_a_calculator_error_quickly(expression: str) -> None:
    started = time.process_time()
    try:
        result = calculate(expression[:1000])
    except CalculatorError:
        pass
    else:
        assert isinstance(result, str) and result
    assert time.process_time() - started < 0.5
