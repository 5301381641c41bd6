"""Backends: the engines behind the model names (remote providers, embedded vLLM)."""
