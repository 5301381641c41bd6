"""The ``helios-serve`` command: check the configuration, print it, or serve."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import tomli_w

from app import __version__, fatal
from app.settings import CONFIG_ENV, ConfigError, Settings, load_settings

EXIT_CONFIG = 2
EXIT_STARTUP = 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="helios-serve", description="OpenAI-compatible LLM serving appliance."
    )
    parser.add_argument("--config", metavar="PATH", help=f"TOML configuration file (default: ${CONFIG_ENV} "
                                                          "or config/config.toml)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective configuration as TOML, secrets masked, and exit")
    parser.add_argument("--check-config", action="store_true", help="validate the configuration and exit")
    parser.add_argument("--version", action="version", version=f"helios-serve {__version__}")
    return parser


def effective_config_toml(settings: Settings) -> str:
    # mode="json" renders SecretStr as "**********", so no secret can reach the output.
    return tomli_w.dumps(_drop_none(settings.model_dump(mode="json")))


def _drop_none(value: Any) -> Any:
    # TOML has no null: an unset optional setting is simply absent.
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value if v is not None]
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.config:
        # Through the environment, so Hypercorn's worker processes load the same file.
        os.environ[CONFIG_ENV] = args.config
    try:
        settings = load_settings()
        if args.print_config:
            sys.stdout.write(effective_config_toml(settings))
            return 0
        from app.factory import create_app

        create_app(settings)  # route collisions in [[endpoints]] are configuration errors too
    except ConfigError as exc:
        print(f"helios-serve: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check_config:
        print("configuration OK")
        return 0
    from app.logs import configure_logging
    from app.server import serve

    configure_logging(settings.server.log_level, settings.server.log_format)
    code = serve(settings)
    failure = fatal.failure()
    if failure is not None:
        print(f"helios-serve: start-up failed: {failure}", file=sys.stderr)
        return EXIT_STARTUP
    return code
