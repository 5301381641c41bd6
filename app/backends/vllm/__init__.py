"""Local models on an embedded vLLM ``AsyncLLM`` engine, the only place that imports vLLM.

``backend`` runs the engine's lifecycle and calls; beside it, one module per job: ``names`` (the vLLM names
we use, imported lazily), ``prompts`` (chat templates and token budgets), ``params`` (request fields to
sampling parameters), ``parsing`` (vLLM's tool-call and reasoning parsers), ``outputs`` (engine outputs to
OpenAI objects), ``generation`` (one engine request and its place in the queue), ``adapters`` (LoRA adapters
served under their own names) and ``pooling`` (embeddings).
"""

from app.backends.vllm.backend import VLLMBackend

__all__ = ["VLLMBackend"]
