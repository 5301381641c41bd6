"""Routing: served names answered by other backends, with retries, fail-over, cool-downs and spill-over."""
