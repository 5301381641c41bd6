"""Embedded engine vs vLLM's own server: the same tiny model, the same engine arguments, the same load.

    .venv/bin/python -m bench.vllm_compare [--quick] [--rounds N] [--batches N] [--scenarios chat,tools,lora]
                                           [--paired] [--profile]

Builds the demo model (``python -m app.demo_model``) unless it exists, then, one server at a time (the
machine has two cores), alternating Helios Serve (``backend = "vllm"``) and
``vllm.entrypoints.openai.api_server`` round by round: start, warm up, drive ``--batches`` batches, stop.
With ``--paired`` both servers of a scenario are up together (the idle one costs about 2% of a core) and
their batches alternate A B B A ..., which keeps a drifting machine's speed out of the ratios.
Each scenario starts its own servers, configured alike on both sides:

- ``chat``: batches of 32 concurrent streaming chat requests of 128 tokens (``ignore_eos``).
- ``tools``: both servers with the hermes tool-call parser and auto tool choice (vLLM's
  ``--enable-auto-tool-choice --tool-call-parser hermes``, Helios's ``tool_call_parser = "hermes"``,
  ``enable_auto_tool_choice = true``) and compact-JSON structured outputs (xgrammar,
  ``disable_any_whitespace``); batches of 320 (quick: 128) ``tool_choice: "required"`` streaming requests,
  16 in flight at a time, max_tokens 64, with two small ``strict`` function tools (string arguments with
  maxLength, so vLLM's hermes structural tag pins the arguments to their schemas). The random model prefers
  whitespace, which JSON allows between tokens and which would run every call to max_tokens, so the
  requests carry a logit bias against the tokenizer's whitespace-only tokens: calls then end, as a real
  model's do. Responses whose stream carried ``tool_calls`` deltas are counted on both sides.
- ``lora``: a rank-8 random LoRA adapter (peft, ``tests/support/lora.py``) served next to the base model
  (Helios ``lora_adapters``, vLLM ``--enable-lora --lora-modules``); the ``chat`` load on the base name and
  on the adapter's name, in alternating order. Skipped, saying why, when peft is missing.

Prints requests/s, output tokens/s, TTFT and end-to-end p50/p99 for each server and the Helios/vLLM ratios
(over all batches, and the median and range of batch-by-batch ratios); writes
``bench/results/<ts>-vllm.json``. TTFT is the time to the first delta carrying content or tool calls.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/vllm_compare.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from bench import procs
from bench.run import LITELLM_VENV, MB, RESULTS, ROOT, git_commit, pct, ratio, summarize_profile, table

PYTHON = sys.executable
MODEL_DIR = ROOT / "bench" / ".cache" / "demo-model"
LORA_DIR = ROOT / "bench" / ".cache" / "demo-lora"
SERVED = "tiny"
ADAPTER = "tiny-lora"
CONCURRENCY = 32
TOKENS = 128
TOOL_CONCURRENCY = 16
TOOL_TOKENS = 64
TOOL_REQUESTS = 320  # per measured batch
TOOL_REQUESTS_QUICK = 128
ENGINE = {"enforce_eager": True, "max_model_len": 512, "kv_cache_memory_bytes": 67_108_864, "max_num_seqs": 32}
STRUCTURED = {"backend": "xgrammar", "disable_any_whitespace": True}
TOOL_PARSER = "hermes"
LORA = {"max_loras": 1, "max_lora_rank": 16}
LORA_RANK = 8
ENV = {"VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}
PROMPT = [{"role": "user", "content": "Tell me a long story."}]
TOOL_PROMPT = [{"role": "user", "content": "What is the weather in Paris, and what time is it there?"}]
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city", "strict": True,
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                       "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "The time in a zone", "strict": True,
        "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 8}},
                       "required": ["timezone"], "additionalProperties": False}}},
]


@dataclass(frozen=True, slots=True)
class Setup:
    """What a scenario's servers are started with besides ENGINE, the same on both sides in each one's syntax."""

    helios: str = ""  # extra TOML keys of the model entry
    vllm: tuple[str, ...] = ()  # extra api_server arguments


@dataclass(frozen=True, slots=True)
class Load:
    """One measured load: ``requests`` streaming chat requests per batch, ``concurrency`` at a time."""

    name: str
    request: dict[str, Any]  # the chat request, model included
    concurrency: int
    requests: int
    warmup_tokens: int | None = None  # max_tokens of the warm-up batch (None: the load's own)

    def body(self, max_tokens: int | None = None) -> bytes:
        request = {**self.request, "max_tokens": max_tokens} if max_tokens else self.request
        return json.dumps(request).encode()


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    setup: Setup
    loads: tuple[Load, ...]


def ensure_model(directory: Path) -> Path:
    if not (directory / "helios-demo-model.json").exists():
        print(f"building the demo model in {directory} ...", flush=True)
        subprocess.run([PYTHON, "-m", "app.demo_model", "--output", str(directory)], cwd=ROOT, check=True,
                       env={**os.environ, **ENV})
    return directory


def ensure_lora(model: Path, directory: Path) -> Path | str:
    """The adapter directory (built with peft unless it exists), or why there is none."""
    if (directory / "adapter_config.json").exists():
        return directory
    if importlib.util.find_spec("peft") is None:
        return f"peft is not installed in {sys.prefix} (pip install peft)"
    print(f"building a rank-{LORA_RANK} LoRA adapter in {directory} ...", flush=True)
    out = subprocess.run([PYTHON, "-m", "tests.support.lora", "--model", str(model), "--output", str(directory),
                          "--rank", str(LORA_RANK)], cwd=ROOT, env={**os.environ, **ENV}, capture_output=True,
                         text=True, timeout=600, check=False)
    if out.returncode != 0:
        return f"building the adapter failed: {(out.stderr or out.stdout).strip()[-500:]}"
    return directory


def whitespace_tokens(model: Path) -> list[int]:
    """Token ids whose text is only whitespace (the random model's favourite filler inside JSON)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    return [i for i in range(tokenizer.get_vocab_size()) if (text := tokenizer.decode([i])) and not text.strip()]


def scenarios(model: Path, lora: Path | None, quick: bool) -> dict[str, Scenario]:
    def chat_load(name: str, served: str) -> Load:
        return Load(name, {"model": served, "messages": PROMPT, "max_tokens": TOKENS, "ignore_eos": True,
                           "stream": True, "temperature": 0.0, "stream_options": {"include_usage": True}},
                    CONCURRENCY, CONCURRENCY, warmup_tokens=16)

    tools = Load("tools", {"model": SERVED, "messages": TOOL_PROMPT, "tools": TOOLS, "tool_choice": "required",
                           "max_tokens": TOOL_TOKENS, "stream": True, "temperature": 0.0,
                           "logit_bias": {str(i): -100 for i in whitespace_tokens(model)},
                           "stream_options": {"include_usage": True}},
                 TOOL_CONCURRENCY, TOOL_REQUESTS_QUICK if quick else TOOL_REQUESTS)
    structured = json.dumps(STRUCTURED, separators=(",", ":"))
    found = {
        "chat": Scenario("chat", Setup(), (chat_load("chat", SERVED),)),
        "tools": Scenario(
            "tools",
            Setup(helios=f'tool_call_parser = "{TOOL_PARSER}"\nenable_auto_tool_choice = true\n'
                         f"structured_outputs = {toml_inline(STRUCTURED)}\n",
                  vllm=("--enable-auto-tool-choice", "--tool-call-parser", TOOL_PARSER,
                        "--structured-outputs-config", structured)),
            (tools,)),
    }
    if lora is not None:
        found["lora"] = Scenario(
            "lora",
            Setup(helios=f'lora_adapters = [{{ name = "{ADAPTER}", path = "{lora}" }}]\n'
                         f"max_loras = {LORA['max_loras']}\nmax_lora_rank = {LORA['max_lora_rank']}\n",
                  vllm=("--enable-lora", "--lora-modules", f"{ADAPTER}={lora}",
                        "--max-loras", str(LORA["max_loras"]), "--max-lora-rank", str(LORA["max_lora_rank"]))),
            (chat_load("lora-base", SERVED), chat_load("lora-adapter", ADAPTER)))
    return found


def toml_inline(values: dict[str, Any]) -> str:
    return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in values.items()) + " }"


def helios(workdir: Path, model: Path, setup: Setup, tag: str) -> procs.Service:
    port = procs.free_port()
    config = workdir / f"{tag}-helios.toml"
    config.write_text(f"""
[server]
host = "127.0.0.1"
port = {port}
workers = 1
log_level = "warning"

[[models]]
name = "{SERVED}"
backend = "vllm"
model = "{model}"
enforce_eager = {str(ENGINE["enforce_eager"]).lower()}
max_model_len = {ENGINE["max_model_len"]}
kv_cache_memory_bytes = {ENGINE["kv_cache_memory_bytes"]}
max_num_seqs = {ENGINE["max_num_seqs"]}
{setup.helios}""")
    return procs.Service("helios", [PYTHON, "-m", "app"], port, "/ready", env={**ENV, "HELIOS_CONFIG": str(config)},
                         cwd=str(ROOT), log_path=workdir / f"{tag}-helios.log")


def vllm(workdir: Path, model: Path, setup: Setup, tag: str) -> procs.Service:
    port = procs.free_port()
    argv = [PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name",
            SERVED, "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
            "--max-model-len", str(ENGINE["max_model_len"]),
            "--kv-cache-memory-bytes", str(ENGINE["kv_cache_memory_bytes"]),
            "--max-num-seqs", str(ENGINE["max_num_seqs"]), *setup.vllm]
    return procs.Service("vllm", argv, port, "/health", env=ENV, cwd=str(workdir), log_path=workdir / f"{tag}-vllm.log")


@dataclass(slots=True)
class Sample:
    start: float
    ttft: float = float("nan")
    e2e: float = float("nan")
    tokens: int = 0
    prompt_tokens: int = 0
    tool_deltas: int = 0  # chunks whose delta carried tool_calls
    finish: str | None = None
    error: str | None = None


async def one(session: aiohttp.ClientSession, url: str, body: bytes) -> Sample:
    sample = Sample(start=time.perf_counter())
    deltas = 0  # chunks carrying content or tool calls
    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
            if response.status != 200:
                sample.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return sample
            buffer = b""
            async for data in response.content.iter_any():
                buffer += data
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    if not event.startswith(b"data: ") or event == b"data: [DONE]":
                        continue
                    chunk = json.loads(event[6:])
                    if "error" in chunk:
                        sample.error = str(chunk["error"])[:200]
                    for choice in chunk.get("choices") or ():
                        delta = choice.get("delta") or {}
                        if delta.get("tool_calls"):
                            sample.tool_deltas += 1
                        if delta.get("content") or delta.get("tool_calls"):
                            deltas += 1
                            if deltas == 1:
                                sample.ttft = time.perf_counter() - sample.start
                        sample.finish = choice.get("finish_reason") or sample.finish
                    usage = chunk.get("usage")
                    if usage:
                        sample.tokens = int(usage.get("completion_tokens") or 0)
                        sample.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        sample.error = type(exc).__name__
    sample.e2e = time.perf_counter() - sample.start
    sample.tokens = sample.tokens or deltas
    return sample


async def batch(port: int, body: bytes, concurrency: int, count: int) -> tuple[list[Sample], float]:
    """``count`` requests, ``concurrency`` in flight at a time (closed loop; all at once when equal)."""
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    timeout = aiohttp.ClientTimeout(total=600)
    slots = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def gated() -> Sample:
            async with slots:
                return await one(session, url, body)

        started = time.perf_counter()
        samples = await asyncio.gather(*(gated() for _ in range(count)))
        return list(samples), time.perf_counter() - started


def warm(service: procs.Service, load: Load) -> None:
    """One batch of ``concurrency`` requests, not measured: first-request costs (and the tools' grammar
    compilation) stay out."""
    asyncio.run(batch(service.port, load.body(load.warmup_tokens), load.concurrency, load.concurrency))


def new_visit(service: procs.Service) -> dict[str, Any]:
    return {"startup_s": service.startup_seconds, "rss_mb": procs.rss_bytes(service.pid) / MB, "batches": []}


def measured_batch(service: procs.Service, load: Load) -> dict[str, Any]:
    """One batch of ``load``: its raw numbers."""
    cpu0 = procs.cpu_seconds(service.pid)
    samples, wall = asyncio.run(batch(service.port, load.body(), load.concurrency, load.requests))
    cpu = procs.cpu_seconds(service.pid) - cpu0
    ok = [s for s in samples if s.error is None]
    errors = [s.error for s in samples if s.error is not None]
    return {"wall": wall, "requests": len(ok), "tokens": sum(s.tokens for s in ok), "cpu": cpu,
            "prompt_tokens": sum(s.prompt_tokens for s in ok),
            "tool_call_responses": sum(1 for s in ok if s.tool_deltas),
            "finish": dict(Counter(str(s.finish) for s in ok)),
            "ttft": [s.ttft for s in ok], "e2e": [s.e2e for s in ok],
            "errors": len(errors), "first_error": errors[0] if errors else None,
            "error_kinds": dict(Counter(e.split(":")[0] for e in errors)),
            "server_alive": service.proc is not None and service.proc.poll() is None}


def drive(service: procs.Service, load: Load, batches: int, profile_to: Path | None = None) -> dict[str, Any]:
    """Warm up, then ``batches`` batches of ``load``; raw numbers of this visit.
    With ``profile_to``, py-spy records the server's process tree (engine core included) meanwhile."""
    warm(service, load)
    spy = None
    if profile_to is not None:
        pyspy = shutil.which("py-spy") or str(LITELLM_VENV / "bin/py-spy")
        spy = subprocess.Popen([pyspy, "record", "--pid", str(service.pid), "--subprocesses", "--rate", "200",
                                "--format", "raw", "--output", str(profile_to), "--nonblocking",
                                "--duration", "8"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)
    visit = new_visit(service)
    for _ in range(batches):
        visit["batches"].append(measured_batch(service, load))
    if spy is not None:
        spy.wait(timeout=120)
    return visit


def summarize(visits: list[dict[str, Any]]) -> dict[str, Any]:
    batches = [b for v in visits for b in v["batches"]]
    tokens = sum(b["tokens"] for b in batches)
    requests = sum(b["requests"] for b in batches)
    wall = sum(b["wall"] for b in batches)
    ttft = [1e3 * t for b in batches for t in b["ttft"]]
    e2e = [1e3 * t for b in batches for t in b["e2e"]]
    finish: Counter[str] = Counter()
    error_kinds: Counter[str] = Counter()
    for b in batches:
        finish.update(b["finish"])
        error_kinds.update(b["error_kinds"])
    return {"tokens_per_s": tokens / wall if wall else 0.0, "requests_per_s": requests / wall if wall else 0.0,
            "batch_tokens_per_s": [round(b["tokens"] / b["wall"], 1) for b in batches],
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "e2e_p50": pct(e2e, 50), "e2e_p99": pct(e2e, 99),
            "tokens": tokens, "requests": requests, "errors": sum(b["errors"] for b in batches),
            "error_kinds": dict(error_kinds), "server_died": not all(b["server_alive"] for b in batches),
            "tokens_per_request": tokens / requests if requests else None,
            "prompt_tokens_per_request": sum(b["prompt_tokens"] for b in batches) / requests if requests else None,
            "tool_call_responses": sum(b["tool_call_responses"] for b in batches), "finish": dict(finish),
            "cpu_s_per_1k_tokens": 1000 * sum(b["cpu"] for b in batches) / tokens if tokens else None,
            "startup_s": min(v["startup_s"] for v in visits), "rss_mb": max(v["rss_mb"] for v in visits),
            "first_error": next((b["first_error"] for b in batches if b["first_error"]), None)}


# (label, stats key, target on the Helios/vLLM ratio: ">= x", "<= x" or "-")
Metric = tuple[str, str, str]
CHAT_METRICS: list[Metric] = [("output tokens/s", "tokens_per_s", ">= 1.0"), ("TTFT p50", "ttft_p50", "<= 1.05"),
                              ("TTFT p99", "ttft_p99", "-"), ("E2E p50", "e2e_p50", "-")]
TOOL_METRICS: list[Metric] = [("requests/s", "requests_per_s", ">= 1.0"), ("output tokens/s", "tokens_per_s", ">= 1.0"),
                              ("TTFT p50", "ttft_p50", "<= 1.05"), ("TTFT p99", "ttft_p99", "-"),
                              ("E2E p50", "e2e_p50", "-")]


def batch_ratios(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str) -> list[float]:
    """``key`` of each batch of ``a`` over the same-numbered batch of ``b``, visit by visit (neighbours in
    time, so a machine's drift affects both alike)."""
    out = []
    for va, vb in zip(a, b, strict=False):
        for ba, bb in zip(va["batches"], vb["batches"], strict=False):
            value = ratio(summarize([{**va, "batches": [ba]}])[key], summarize([{**vb, "batches": [bb]}])[key])
            if value is not None:
                out.append(value)
    return out


RATIO_HEADERS = ["ratio", "measured", "batch pairs: median", "min - max", "target", "met"]


def ratios(a: dict[str, Any] | None, b: dict[str, Any] | None, metrics: list[Metric],
           a_visits: list[dict[str, Any]], b_visits: list[dict[str, Any]]) -> list[list[Any]]:
    """Rows of ``a``/``b`` ratios (over all batches, and batch pair by batch pair) with their targets and
    whether the overall one meets it."""
    rows = []
    for label, key, target in metrics:
        value = ratio(a[key], b[key]) if a and b else None
        pairs = batch_ratios(a_visits, b_visits, key)
        met = "-"
        if target != "-" and value is not None:
            bound = float(target.split()[1])
            met = "yes" if (value >= bound if target.startswith(">=") else value <= bound) else "NO"
        rows.append([label, value, statistics.median(pairs) if pairs else None,
                     f"{min(pairs):.2f} - {max(pairs):.2f}" if pairs else None, target, met])
    return rows


def start_error(log: Path | None) -> str:
    """The last error line of a server's log, else its last line."""
    lines = [x for x in (log.read_text(errors="replace").splitlines() if log and log.exists() else []) if x.strip()]
    errors = [x for x in lines if "Error" in x or "error" in x]
    return (errors or lines or ["(no log)"])[-1].strip()[:600]


def report_chat(s: dict[str, dict[str, Any]], v: dict[str, list[dict[str, Any]]], rounds: int,
                batches: int) -> list[list[Any]]:
    rows = [[name, x["tokens_per_s"], x["ttft_p50"], x["ttft_p99"], x["e2e_p50"], x["e2e_p99"],
             x["cpu_s_per_1k_tokens"], x["startup_s"], x["rss_mb"], x["errors"]] for name, x in s.items()]
    print(table(f"Embedded engine vs vLLM's server: {CONCURRENCY} concurrent streams x {TOKENS} tokens "
                f"(ignore_eos), {rounds} round(s) x {batches} batch(es) each",
                ["server", "output tok/s", "TTFT p50 ms", "TTFT p99 ms", "E2E p50 ms", "E2E p99 ms",
                 "CPU s/1k tok", "start-up s", "RSS MB", "errors"], rows))
    out = ratios(s.get("helios"), s.get("vllm"), CHAT_METRICS, v["helios"], v["vllm"])
    print(table("Helios / vLLM", RATIO_HEADERS, out))
    return out


def report_tools(s: dict[str, dict[str, Any]], v: dict[str, list[dict[str, Any]]], rounds: int,
                 batches: int) -> list[list[Any]]:
    rows = [[name, x["requests_per_s"], x["tokens_per_s"], x["ttft_p50"], x["ttft_p99"], x["e2e_p50"],
             x["e2e_p99"], f"{x['tool_call_responses']}/{x['requests']}", x["tokens_per_request"],
             x["prompt_tokens_per_request"], " ".join(f"{k}:{n}" for k, n in sorted(x["finish"].items())),
             x["cpu_s_per_1k_tokens"], x["errors"]] for name, x in s.items()]
    print(table(f"Tool calling: tool_choice required, 2 strict tools, {TOOL_CONCURRENCY} concurrent streams, "
                f"max_tokens {TOOL_TOKENS}, --tool-call-parser {TOOL_PARSER} on both; "
                f"{rounds} round(s) x {batches} batch(es) each",
                ["server", "req/s", "output tok/s", "TTFT p50 ms", "TTFT p99 ms", "E2E p50 ms", "E2E p99 ms",
                 "with tool calls", "out tok/req", "prompt tok/req", "finish reasons", "CPU s/1k tok", "errors"],
                rows))
    out = ratios(s.get("helios"), s.get("vllm"), TOOL_METRICS, v["helios"], v["vllm"])
    print(table("Tool calling, Helios / vLLM", RATIO_HEADERS, out))
    for name, x in s.items():
        if x["tool_call_responses"] < x["requests"] + x["errors"] or not x["requests"]:
            print(f"WARNING: {name}: only {x['tool_call_responses']} of {x['requests'] + x['errors']} responses "
                  "carried tool calls")
    return out


def report_lora(base: dict[str, dict[str, Any]], adapter: dict[str, dict[str, Any]],
                base_visits: dict[str, list[dict[str, Any]]], adapter_visits: dict[str, list[dict[str, Any]]],
                rounds: int, batches: int) -> list[list[Any]]:
    rows = [[f"{name}, {label}", x["tokens_per_s"], x["ttft_p50"], x["ttft_p99"], x["e2e_p50"], x["e2e_p99"],
             x["cpu_s_per_1k_tokens"], x["startup_s"], x["errors"]]
            for name in ("helios", "vllm")
            for label, x in ((SERVED, base.get(name)), (ADAPTER, adapter.get(name))) if x]
    print(table(f"LoRA: rank-{LORA_RANK} adapter '{ADAPTER}' next to '{SERVED}' on one engine "
                f"(max_loras {LORA['max_loras']}, max_lora_rank {LORA['max_lora_rank']}), {CONCURRENCY} "
                f"concurrent streams x {TOKENS} tokens (ignore_eos), {rounds} round(s) x {batches} batch(es) each",
                ["server, model", "output tok/s", "TTFT p50 ms", "TTFT p99 ms", "E2E p50 ms", "E2E p99 ms",
                 "CPU s/1k tok", "start-up s", "errors"], rows))
    metrics = CHAT_METRICS[:3]
    out = [[f"{name} adapter / base: {label}", *rest] for name in ("helios", "vllm")
           for label, *rest in ratios(adapter.get(name), base.get(name), [(m, k, "-") for m, k, _ in metrics],
                                      adapter_visits[name], base_visits[name])]
    out += [[f"Helios / vLLM, {which}: {label}", *rest]
            for which, s, v in ((SERVED, base, base_visits), (ADAPTER, adapter, adapter_visits))
            for label, *rest in ratios(s.get("helios"), s.get("vllm"), metrics, v["helios"], v["vllm"])]
    print(table("LoRA ratios", RATIO_HEADERS, out))
    return out


Visits = dict[str, dict[str, list[dict[str, Any]]]]  # load -> server -> visits


def start(service: procs.Service, scenario: Scenario, failures: dict[str, dict[str, str]]) -> bool:
    """Start ``service``; when it does not start, say why and remember it (it is not tried again)."""
    try:
        service.start(timeout=600)
    except RuntimeError as exc:
        why = start_error(service.log_path)
        failures.setdefault(scenario.name, {})[service.name] = f"{exc}: {why}"
        print(f"  {service.name} did not start: {why}", flush=True)
        return False
    return True


def measure(selected: list[Scenario], model: Path, rounds: int, batches: int, *, profile: bool,
            paired: bool) -> tuple[Visits, dict[str, dict[str, str]], dict[str, Any], dict[str, str]]:
    """Every scenario's servers, alternating the order round by round: the visits by load and server, the
    servers that did not start (by scenario), py-spy profiles, and the servers' log tails.

    One server at a time, or with ``paired`` both of a scenario at once (an idle one costs about 2% of a
    core) with their batches interleaved A B B A ..., so that a machine whose speed drifts over minutes
    slows both alike."""
    workdir = Path(tempfile.mkdtemp(prefix="helios-vllm-bench-"))
    visits: Visits = {load.name: {"helios": [], "vllm": []} for scenario in selected for load in scenario.loads}
    failures: dict[str, dict[str, str]] = {}  # scenario -> server -> why it did not start
    profiles: dict[str, Any] = {}
    try:
        for round_no in range(rounds):
            order = (helios, vllm) if round_no % 2 == 0 else (vllm, helios)
            for scenario in selected:
                loads = scenario.loads if round_no % 2 == 0 else scenario.loads[::-1]
                services = [s for s in (make(workdir, model, scenario.setup, f"{scenario.name}-r{round_no + 1}")
                                        for make in order) if s.name not in failures.get(scenario.name, {})]
                names = (" + " if paired else ", ").join(s.name for s in services)
                print(f"round {round_no + 1}/{rounds}: {scenario.name}: {names} ...", flush=True)
                if paired:
                    visit_paired(services, scenario, loads, batches, visits, failures)
                    continue
                for service in services:
                    try:
                        if not start(service, scenario, failures):
                            continue
                        for load in loads:
                            profile_to = workdir / f"profile-{service.name}.txt" \
                                if profile and load.name == "chat" and not visits["chat"][service.name] else None
                            visits[load.name][service.name].append(drive(service, load, batches, profile_to))
                            if profile_to is not None and profile_to.exists():
                                profiles[service.name] = summarize_profile(profile_to)
                    finally:
                        service.stop(timeout=60)
    finally:
        logs = {log.stem: log.read_text(errors="replace")[-2000:] for log in workdir.glob("*.log")}
        shutil.rmtree(workdir, ignore_errors=True)
    return visits, failures, profiles, logs


def visit_paired(services: list[procs.Service], scenario: Scenario, loads: Sequence[Load], batches: int,
                 visits: Visits, failures: dict[str, dict[str, str]]) -> None:
    """Both servers up, each load's batches interleaved A B B A ..."""
    try:
        up = [service for service in services if start(service, scenario, failures)]
        for load in loads:
            for service in up:
                warm(service, load)
            visit = {service.name: new_visit(service) for service in up}
            for batch_no in range(batches):
                for service in up if batch_no % 2 == 0 else up[::-1]:
                    visit[service.name]["batches"].append(measured_batch(service, load))
            for service in up:
                visits[load.name][service.name].append(visit[service.name])
    finally:
        for service in services:
            service.stop(timeout=60)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"one round, one batch per server and load, {TOOL_REQUESTS_QUICK} tool requests a batch "
                             f"(else {TOOL_REQUESTS})")
    parser.add_argument("--rounds", type=int, help="visits per server, alternating (default 3; quick 1)")
    parser.add_argument("--batches", type=int, help="measured batches per visit (default 2; quick 1)")
    parser.add_argument("--scenarios", default="chat,tools,lora",
                        help="comma-separated, of chat, tools, lora (default: all)")
    parser.add_argument("--paired", action="store_true",
                        help="both servers of a scenario up at once, batches interleaved A B B A (steadier figures "
                             "on a machine whose speed drifts)")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy both servers (process trees) during their first measured chat batch")
    parser.add_argument("--model", type=Path, default=MODEL_DIR, help="demo model directory (built if missing)")
    parser.add_argument("--lora", type=Path, default=LORA_DIR, help="LoRA adapter directory (built if missing)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    batches = args.batches or (1 if args.quick else 2)
    chosen = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    if unknown := set(chosen) - {"chat", "tools", "lora"}:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if args.paired and args.profile:
        parser.error("--profile needs one server at a time (without --paired)")
    model = ensure_model(args.model.resolve())
    skipped: dict[str, str] = {}
    lora: Path | None = None
    if "lora" in chosen:
        found = ensure_lora(model, args.lora.resolve())
        if isinstance(found, str):
            skipped["lora"] = found
            print(f"skipping the LoRA scenario: {found}", flush=True)
        else:
            lora = found
    plan = scenarios(model, lora, args.quick)
    selected = [plan[name] for name in chosen if name in plan]
    RESULTS.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    visits, failures, profiles, logs = measure(selected, model, rounds, batches, profile=args.profile,
                                               paired=args.paired)
    stats = {load: {name: summarize(v) for name, v in per.items() if v} for load, per in visits.items()}
    compared: dict[str, Any] = {}
    if "chat" in stats:
        compared["chat"] = report_chat(stats["chat"], visits["chat"], rounds, batches)
    if "tools" in stats:
        compared["tools"] = report_tools(stats["tools"], visits["tools"], rounds, batches)
    if "lora-base" in stats:
        compared["lora"] = report_lora(stats["lora-base"], stats["lora-adapter"], visits["lora-base"],
                                       visits["lora-adapter"], rounds, batches)
    for load, per in stats.items():
        for name, s in per.items():
            print(f"{load}, {name}: tokens/s per batch {s['batch_tokens_per_s']}"
                  + (f"; errors {s['error_kinds']}, first: {s['first_error']}" if s["first_error"] else "")
                  + ("; THE SERVER DIED" if s["server_died"] else ""))
    for scenario, why in {**skipped, **{f"{k}/{n}": e for k, v in failures.items() for n, e in v.items()}}.items():
        print(f"NOT MEASURED: {scenario}: {why}")
    for name, prof in profiles.items():
        print(f"\npy-spy, {name} (process tree) during a batch: {prof['samples']} samples; by process: "
              f"{prof['processes']}\ntop self time:")
        print("\n".join(f"  {share:5.1f}%  {fn}" for fn, share in prof["self"][:20]))
        print("top inclusive:")
        print("\n".join(f"  {share:5.1f}%  {fn}" for fn, share in prof["inclusive"][:30]))
    report = {"commit": git_commit(), "profiles": profiles, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "rounds": rounds, "batches": batches, "scenarios": chosen, "paired": args.paired,
              "engine": ENGINE, "structured_outputs": STRUCTURED, "tool_call_parser": TOOL_PARSER, "lora": LORA,
              "loads": {load.name: {"request": load.request, "concurrency": load.concurrency,
                                    "requests": load.requests} for scenario in selected for load in scenario.loads},
              "stats": stats, "ratios": compared, "skipped": skipped, "failures": failures, "visits": visits,
              "seconds": time.perf_counter() - began, "loadavg": os.getloadavg(),
              "log_tails": logs if failures or any(s["errors"] for per in stats.values() for s in per.values())
              else {}}
    out = RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}-vllm.json"
    out.write_text(json.dumps(report, indent=1, default=str))
    print(f"\nfinished in {report['seconds']:.0f} s; results: {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
