"""Fixtures for the observability tests."""

from __future__ import annotations

import pytest

from tests.support.prometheus import PrometheusTools, PrometheusUnavailable, ensure_prometheus


@pytest.fixture(scope="session")
def prometheus_tools() -> PrometheusTools:
    """prometheus and promtool, installed from Debian's package on first use."""
    try:
        return ensure_prometheus()
    except PrometheusUnavailable as exc:
        pytest.skip(f"Prometheus is not available: {exc}")
