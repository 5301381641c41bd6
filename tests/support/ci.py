"""Whether the tests run in CI, where a missing tool fails its tests instead of skipping them."""

from __future__ import annotations

import os


def in_ci() -> bool:
    """Whether the tests run in CI: ``CI`` set to anything but empty, 0, false or no."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
