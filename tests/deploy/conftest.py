"""Fixtures of the container tests (a private dockerd, shared by test_docker.py and test_compose.py), and
the ``images`` marker: the slow image builds (cpu flavor: torch + vLLM) run only when selected with
``pytest -m images``, so ``make test`` stays fast."""

from __future__ import annotations

import pytest

from tests.support.docker import cpu_image, docker_engine, gateway_image, prometheus_image  # noqa: F401 - fixtures

IMAGES_MARKER = "images"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{IMAGES_MARKER}: builds a heavy image (cpu flavor); run with -m images")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Opt-in rather than opt-out: a plain `pytest` must not start a multi-GB, many-minute build.
    if IMAGES_MARKER in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="slow image build: select it with `pytest -m images` (make test-images)")
    for item in items:
        if IMAGES_MARKER in item.keywords:
            item.add_marker(skip)
