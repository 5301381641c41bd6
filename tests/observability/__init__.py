"""Prometheus rules, Grafana provisioning and the dashboard, checked statically and against real servers."""
