"""Embedded engine vs vLLM's own server: the same tiny model, the same engine arguments, the same load.

    .venv/bin/python -m bench.vllm_compare [--quick] [--rounds N] [--batches N]

Builds the demo model (``python -m app.demo_model``) unless it exists, then, one server at a time (the
machine has two cores), alternating Helios Serve (``backend = "vllm"``) and
``vllm.entrypoints.openai.api_server`` round by round: start, warm up, drive ``--batches`` batches of 32
concurrent streaming chat requests of 128 tokens (``ignore_eos``), stop. Prints output tokens/s, TTFT and
end-to-end p50/p99 for each server and the Helios/vLLM ratios; writes ``bench/results/<ts>-vllm.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/vllm_compare.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from bench import procs
from bench.run import LITELLM_VENV, MB, RESULTS, ROOT, git_commit, pct, summarize_profile, table

PYTHON = sys.executable
MODEL_DIR = ROOT / "bench" / ".cache" / "demo-model"
SERVED = "tiny"
CONCURRENCY = 32
TOKENS = 128
ENGINE = {"enforce_eager": True, "max_model_len": 512, "kv_cache_memory_bytes": 67_108_864, "max_num_seqs": 32}
ENV = {"VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}


def ensure_model(directory: Path) -> Path:
    if not (directory / "helios-demo-model.json").exists():
        print(f"building the demo model in {directory} ...", flush=True)
        subprocess.run([PYTHON, "-m", "app.demo_model", "--output", str(directory)], cwd=ROOT, check=True,
                       env={**os.environ, **ENV})
    return directory


def helios(workdir: Path, model: Path) -> procs.Service:
    port = procs.free_port()
    config = workdir / "helios-vllm.toml"
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
""")
    return procs.Service("helios", [PYTHON, "-m", "app"], port, "/ready", env={**ENV, "HELIOS_CONFIG": str(config)},
                         cwd=str(ROOT), log_path=workdir / "helios.log")


def vllm(workdir: Path, model: Path) -> procs.Service:
    port = procs.free_port()
    argv = [PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name",
            SERVED, "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
            "--max-model-len", str(ENGINE["max_model_len"]),
            "--kv-cache-memory-bytes", str(ENGINE["kv_cache_memory_bytes"]),
            "--max-num-seqs", str(ENGINE["max_num_seqs"])]
    return procs.Service("vllm", argv, port, "/health", env=ENV, cwd=str(workdir), log_path=workdir / "vllm.log")


@dataclass(slots=True)
class Sample:
    start: float
    ttft: float = float("nan")
    e2e: float = float("nan")
    tokens: int = 0
    error: str | None = None


async def one(session: aiohttp.ClientSession, url: str, body: bytes) -> Sample:
    sample = Sample(start=time.perf_counter())
    content_chunks = 0
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
                        if (choice.get("delta") or {}).get("content"):
                            content_chunks += 1
                            if content_chunks == 1:
                                sample.ttft = time.perf_counter() - sample.start
                    usage = chunk.get("usage")
                    if usage:
                        sample.tokens = int(usage.get("completion_tokens") or 0)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        sample.error = type(exc).__name__
    sample.e2e = time.perf_counter() - sample.start
    sample.tokens = sample.tokens or content_chunks
    return sample


async def batch(port: int, count: int, tokens: int) -> tuple[list[Sample], float]:
    body = json.dumps({"model": SERVED, "messages": [{"role": "user", "content": "Tell me a long story."}],
                       "max_tokens": tokens, "ignore_eos": True, "stream": True, "temperature": 0.0,
                       "stream_options": {"include_usage": True}}).encode()
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=count)) as session:
        started = time.perf_counter()
        samples = await asyncio.gather(*(one(session, url, body) for _ in range(count)))
        return list(samples), time.perf_counter() - started


def drive(service: procs.Service, batches: int, profile_to: Path | None = None) -> dict[str, Any]:
    """Warm up, then ``batches`` batches of CONCURRENCY concurrent streams; raw numbers of this visit.
    With ``profile_to``, py-spy records the server's process tree (engine core included) meanwhile."""
    asyncio.run(batch(service.port, CONCURRENCY, 16))  # warm-up: first-request costs stay out
    spy = None
    if profile_to is not None:
        pyspy = shutil.which("py-spy") or str(LITELLM_VENV / "bin/py-spy")
        spy = subprocess.Popen([pyspy, "record", "--pid", str(service.pid), "--subprocesses", "--rate", "200",
                                "--format", "raw", "--output", str(profile_to), "--nonblocking",
                                "--duration", "8"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)
    visit: dict[str, Any] = {"startup_s": service.startup_seconds, "rss_mb": procs.rss_bytes(service.pid) / MB,
                             "batches": []}
    for _ in range(batches):
        cpu0 = procs.cpu_seconds(service.pid)
        samples, wall = asyncio.run(batch(service.port, CONCURRENCY, TOKENS))
        cpu = procs.cpu_seconds(service.pid) - cpu0
        ok = [s for s in samples if s.error is None]
        errors = [s.error for s in samples if s.error is not None]
        visit["batches"].append({"wall": wall, "tokens": sum(s.tokens for s in ok), "cpu": cpu,
                                 "ttft": [s.ttft for s in ok], "e2e": [s.e2e for s in ok],
                                 "errors": len(errors), "first_error": errors[0] if errors else None})
    if spy is not None:
        spy.wait(timeout=120)
    return visit


def summarize(visits: list[dict[str, Any]]) -> dict[str, Any]:
    batches = [b for v in visits for b in v["batches"]]
    tokens = sum(b["tokens"] for b in batches)
    wall = sum(b["wall"] for b in batches)
    ttft = [1e3 * t for b in batches for t in b["ttft"]]
    e2e = [1e3 * t for b in batches for t in b["e2e"]]
    return {"tokens_per_s": tokens / wall if wall else 0.0,
            "batch_tokens_per_s": [round(b["tokens"] / b["wall"], 1) for b in batches],
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "e2e_p50": pct(e2e, 50), "e2e_p99": pct(e2e, 99),
            "tokens": tokens, "errors": sum(b["errors"] for b in batches),
            "cpu_s_per_1k_tokens": 1000 * sum(b["cpu"] for b in batches) / tokens if tokens else None,
            "startup_s": min(v["startup_s"] for v in visits), "rss_mb": max(v["rss_mb"] for v in visits),
            "first_error": next((b["first_error"] for b in batches if b["first_error"]), None)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round, one batch per server")
    parser.add_argument("--rounds", type=int, help="visits per server, alternating (default 3; quick 1)")
    parser.add_argument("--batches", type=int, help="measured batches per visit (default 2; quick 1)")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy both servers (process trees) during their first measured batch")
    parser.add_argument("--model", type=Path, default=MODEL_DIR, help="demo model directory (built if missing)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    batches = args.batches or (1 if args.quick else 2)
    model = ensure_model(args.model.resolve())
    RESULTS.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="helios-vllm-bench-"))
    began = time.perf_counter()
    visits: dict[str, list[dict[str, Any]]] = {"helios": [], "vllm": []}
    profiles: dict[str, Any] = {}
    try:
        for round_no in range(rounds):
            order = (helios, vllm) if round_no % 2 == 0 else (vllm, helios)
            for make in order:
                service = make(workdir, model)
                print(f"round {round_no + 1}/{rounds}: {service.name} ...", flush=True)
                try:
                    service.start(timeout=600)
                    profile_to = workdir / f"profile-{service.name}.txt" \
                        if args.profile and not visits[service.name] else None
                    visits[service.name].append(drive(service, batches, profile_to))
                    if profile_to is not None and profile_to.exists():
                        profiles[service.name] = summarize_profile(profile_to)
                finally:
                    service.stop(timeout=60)
    finally:
        logs = {name: (workdir / f"{name}.log").read_text(errors="replace")[-2000:]
                for name in visits if (workdir / f"{name}.log").exists()}
        shutil.rmtree(workdir, ignore_errors=True)
    stats = {name: summarize(v) for name, v in visits.items()}
    rows = [[name, s["tokens_per_s"], s["ttft_p50"], s["ttft_p99"], s["e2e_p50"], s["e2e_p99"],
             s["cpu_s_per_1k_tokens"], s["startup_s"], s["rss_mb"], s["errors"]] for name, s in stats.items()]
    print(table(f"Embedded engine vs vLLM's server: {CONCURRENCY} concurrent streams x {TOKENS} tokens "
                f"(ignore_eos), {rounds} round(s) x {batches} batch(es) each",
                ["server", "output tok/s", "TTFT p50 ms", "TTFT p99 ms", "E2E p50 ms", "E2E p99 ms",
                 "CPU s/1k tok", "start-up s", "RSS MB", "errors"], rows))
    h, v = stats["helios"], stats["vllm"]
    throughput = h["tokens_per_s"] / v["tokens_per_s"] if v["tokens_per_s"] else float("nan")
    ttft = h["ttft_p50"] / v["ttft_p50"] if v["ttft_p50"] else float("nan")
    print(table("Helios / vLLM", ["ratio", "measured", "target", "met"], [
        ["output tokens/s", throughput, ">= 1.0", "yes" if throughput >= 1.0 else "NO"],
        ["TTFT p50", ttft, "<= 1.05", "yes" if ttft <= 1.05 else "NO"],
        ["TTFT p99", h["ttft_p99"] / v["ttft_p99"] if v["ttft_p99"] else None, "-", "-"],
        ["E2E p50", h["e2e_p50"] / v["e2e_p50"] if v["e2e_p50"] else None, "-", "-"],
    ]))
    for name, s in stats.items():
        print(f"{name}: tokens/s per batch {s['batch_tokens_per_s']}"
              + (f"; first error: {s['first_error']}" if s["first_error"] else ""))
    for name, prof in profiles.items():
        print(f"\npy-spy, {name} (process tree) during a batch: {prof['samples']} samples; by process: "
              f"{prof['processes']}\ntop self time:")
        print("\n".join(f"  {share:5.1f}%  {fn}" for fn, share in prof["self"][:20]))
        print("top inclusive:")
        print("\n".join(f"  {share:5.1f}%  {fn}" for fn, share in prof["inclusive"][:30]))
    report = {"commit": git_commit(), "profiles": profiles, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "rounds": rounds, "batches": batches,
              "engine": ENGINE, "concurrency": CONCURRENCY, "tokens": TOKENS, "stats": stats,
              "ratios": {"tokens_per_s": throughput, "ttft_p50": ttft}, "visits": visits,
              "seconds": time.perf_counter() - began, "loadavg": os.getloadavg(),
              "log_tails": logs if any(s["errors"] for s in stats.values()) else {}}
    out = RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}-vllm.json"
    out.write_text(json.dumps(report, indent=1, default=str))
    print(f"\nfinished in {report['seconds']:.0f} s; results: {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
