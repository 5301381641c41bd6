"""Every setting is documented: the README names each key, and config/config.toml mentions each one."""

from __future__ import annotations

import typing

from pydantic import BaseModel

from app.settings import Settings
from tests.support.server import REPO_ROOT


def _models(annotation: object) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models(arg)]


def _keys(model: type[BaseModel], seen: set[type[BaseModel]]) -> set[str]:
    seen.add(model)
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        keys.add(field.alias or name)
        for sub in _models(field.annotation):
            if sub not in seen:
                keys |= _keys(sub, seen)
    return keys


def test_every_setting_is_in_the_readme_and_the_default_configuration() -> None:
    keys = _keys(Settings, set()) - set(Settings.model_fields)
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    config = (REPO_ROOT / "config" / "config.toml").read_text(encoding="utf-8")
    # Nested keys may be documented under their section's name: `structured_outputs.backend`.
    assert sorted(k for k in keys if f"`{k}`" not in readme and f".{k}`" not in readme) == []
    assert sorted(k for k in keys if k not in config) == []
