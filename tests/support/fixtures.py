"""Pytest fixtures; import them into a conftest (``from tests.support.fixtures import *``)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import pytest

from tests.support.fake_provider import FakeProvider
from tests.support.server import HeliosProcess

__all__ = ["HeliosFactory", "fake_provider", "helios", "provider"]


class HeliosFactory(Protocol):
    """Starts a gateway subprocess; the fixture stops it at teardown."""

    def __call__(
        self,
        config: Mapping[str, Any],
        env: Mapping[str, str | None] | None = None,
        wait_ready: bool = False,
        **options: Any,
    ) -> HeliosProcess:
        """``options`` go to HeliosProcess (e.g. ``command``)."""


@pytest.fixture(scope="session")
def fake_provider() -> Iterator[FakeProvider]:
    """One FakeProvider for the whole session (state accumulates; see ``provider``)."""
    with FakeProvider() as fake:
        yield fake


@pytest.fixture
def provider(fake_provider: FakeProvider) -> FakeProvider:
    """The session FakeProvider with its recorded state cleared for this test."""
    fake_provider.reset()
    return fake_provider


@pytest.fixture
def helios(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HeliosFactory]:
    """Factory starting gateway processes; all of them are stopped at teardown."""
    started: list[HeliosProcess] = []

    def start(
        config: Mapping[str, Any],
        env: Mapping[str, str | None] | None = None,
        wait_ready: bool = False,
        **options: Any,
    ) -> HeliosProcess:
        # pytest keeps tmp dirs of recent runs, so config and logs survive a failure.
        process = HeliosProcess(config, env, workdir=tmp_path_factory.mktemp("helios"), **options)
        started.append(process)
        return process.start(wait_ready=wait_ready)

    yield start
    for process in reversed(started):
        process.close()  # idempotent: also fine for ones a test already terminated
