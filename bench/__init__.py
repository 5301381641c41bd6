"""Benchmarks of Helios Serve against a direct provider and LiteLLM; see run.py and vllm_compare.py."""
