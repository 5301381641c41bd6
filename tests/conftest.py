"""Shared fixtures: the imitated provider, the gateway as a real Hypercorn process, and clients."""

from tests.support.engine import demo_model_dir  # noqa: F401
from tests.support.fixtures import fake_provider, helios, provider  # noqa: F401
from tests.support.lora import demo_lora_dir  # noqa: F401
