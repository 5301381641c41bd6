"""HTTP routes: the OpenAI API, health and readiness, and TOML-declared endpoints."""
