"""The ASGI application Hypercorn's workers import (``app.asgi:app``), built from the environment."""

from app.factory import create_app
from app.logs import configure_logging
from app.settings import load_settings

settings = load_settings()
configure_logging(settings.server.log_level, settings.server.log_format)
app = create_app(settings)
