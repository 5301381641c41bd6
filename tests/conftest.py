"""Shared fixtures: the imitated provider, the gateway as a real Hypercorn process, and clients.

Also the system tools the tests need, in one place (:data:`TOOLS`): after collection, before the first test
runs, every tool a selected test needs is installed (Debian packages: tests/support/prometheus.py, redis.py),
so no test finds one missing because the module that used to install it runs later. A test whose tool could
not be installed fails; where a tool may be absent on a developer's machine it skips instead, but never in CI
(``CI`` set, as CI services do): there a missing tool is always a failure.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests.support.ci import in_ci
from tests.support.engine import demo_model_dir, engine_gateway, engine_gateway_loading  # noqa: F401
from tests.support.fixtures import fake_provider, helios, provider  # noqa: F401
from tests.support.lora import demo_lora_dir  # noqa: F401
from tests.support.prometheus import PrometheusTools, PrometheusUnavailable, ensure_prometheus
from tests.support.redis import RedisUnavailable, ensure_redis


@dataclass(frozen=True)
class Tool:
    """A system tool some tests need, how to install it, and which tests need it."""

    name: str
    ensure: Callable[[], object]
    unavailable: type[Exception]
    needed_by: Callable[[pytest.Item], bool]
    # Whether a test may skip (outside CI) when the tool cannot be installed, rather than fail.
    may_skip: bool


def _fixtures(item: pytest.Item) -> tuple[str, ...]:
    return tuple(getattr(item, "fixturenames", ()))


TOOLS = (
    # prometheus and promtool (Debian's prometheus package): tests/observability (the prometheus_tools
    # fixture) and tests/deploy/test_helm.py's promtool check of the chart's PrometheusRule.
    Tool(
        name="prometheus",
        ensure=ensure_prometheus,
        unavailable=PrometheusUnavailable,
        needed_by=lambda item: "prometheus_tools" in _fixtures(item) or "promtool" in item.name,
        may_skip=True,
    ),
    # redis-server (Debian's redis-server package): the Redis response store tests, which never skip.
    Tool(
        name="redis-server",
        ensure=ensure_redis,
        unavailable=RedisUnavailable,
        needed_by=lambda item: "redis_server" in _fixtures(item),
        may_skip=False,
    ),
)

_missing = pytest.StashKey[dict[str, str]]()


def _install_needed(session: pytest.Session) -> dict[str, str]:
    """Install the tools the selected tests need; the reason each one that could not be installed is missing."""
    missing: dict[str, str] = {}
    for tool in TOOLS:
        if any(tool.needed_by(item) for item in session.items):
            try:
                tool.ensure()
            except tool.unavailable as exc:
                missing[tool.name] = str(exc)
    return missing


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> None:
    """After collection, before the first test (and outside every test's timeout): install the tools."""
    if not session.config.option.collectonly:
        session.stash[_missing] = _install_needed(session)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before the test's fixtures: a test needing a tool that could not be installed fails (or skips)."""
    missing = item.session.stash.get(_missing, {})
    for tool in TOOLS:
        reason = missing.get(tool.name)
        if reason is not None and tool.needed_by(item):
            message = f"{tool.name} is not available: {reason}"
            if tool.may_skip and not in_ci():
                pytest.skip(message)
            pytest.fail(f"{message} (CI must run this test)" if in_ci() else message, pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _engines_load_early(request: pytest.FixtureRequest) -> None:
    """When a selected test needs the shared engine appliance, start it before the first test: its engines
    take minutes to load on the CPU, which the tests before its first user (deploy, remote agents) cover."""
    if any("engine_gateway" in _fixtures(item) for item in request.session.items):
        # A failure here is kept by pytest and raised again to each test that needs the appliance; raised
        # here, it would fail every test of the session instead.
        with contextlib.suppress(Exception, pytest.fail.Exception, pytest.skip.Exception):
            request.getfixturevalue("engine_gateway_loading")


@pytest.fixture(scope="session")
def prometheus_tools() -> PrometheusTools:
    """prometheus and promtool, installed from Debian's package (before the first test, see TOOLS)."""
    try:
        return ensure_prometheus()
    except PrometheusUnavailable as exc:
        if in_ci():
            pytest.fail(f"Prometheus is not available in CI: {exc}", pytrace=False)
        pytest.skip(f"Prometheus is not available: {exc}")
