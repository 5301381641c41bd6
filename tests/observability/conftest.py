"""Fixtures for the observability tests.

``prometheus_tools`` (prometheus and promtool, from Debian's package) lives in tests/conftest.py with the
other system tools, so that it is installed before the first test and a missing one fails in CI.
"""
