"""Gateway benchmark: client → provider directly (the floor), → Helios Serve, → LiteLLM's proxy.

    .venv/bin/python -m bench.run [--quick] [--rounds N] [--duration S] [--soak-requests N] [--profile]

Every scenario runs its targets interleaved (A B C A B C ...) against one provider imitation
(``bench/provider.py``), which is measured alone first. Non-streaming load comes from ``wrk`` (closed loop,
fixed duration) and from an asyncio open-loop client (fixed rate and count); streaming load from the
asyncio client (fixed counts), which records time to first byte and to each chunk. CPU seconds are the
utime+stime of each process tree before/after each segment. Tables are printed and everything is written
to ``bench/results/<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import loadgen, procs

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
LITELLM_VENV = BENCH / ".venv-litellm"
LITELLM_SPEC = ["litellm[proxy]==1.106.2", "prisma", "opentelemetry-sdk", "py-spy"]
PYTHON = sys.executable
MB = 1024 * 1024
STREAM_TOKENS = 256
NONSTREAM_TOKENS = 16
PROMPT = [{"role": "user", "content": "Hello! Please answer this benchmark request."}]


# ---- targets --------------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    port: int
    model: str
    service: procs.Service | None = None  # None: the provider itself (direct path)
    pid: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    def body(self, *, stream: bool, tokens: int) -> bytes:
        doc: dict[str, Any] = {"model": self.model, "messages": PROMPT, "max_tokens": tokens}
        if stream:
            doc["stream"] = True
        return json.dumps(doc).encode()

    def payload(self, *, stream: bool, tokens: int) -> bytes:
        return loadgen.http_request("127.0.0.1", self.port, "/v1/chat/completions",
                                    self.body(stream=stream, tokens=tokens))

    def cpu(self) -> float:
        return procs.cpu_seconds(self.pid)

    def rss(self) -> int:
        return procs.rss_bytes(self.pid)


def provider_service(workdir: Path, tokens: int = NONSTREAM_TOKENS) -> procs.Service:
    """The provider imitation (bench/provider.py) on a free port."""
    port = procs.free_port()
    return procs.Service("provider", [PYTHON, "-m", "bench.provider", "--port", str(port), "--tokens", str(tokens)],
                         port, "/health", cwd=str(ROOT), log_path=workdir / "provider.log")


def helios_service(workdir: Path, provider_port: int, workers: int, *, upstream_model: str = "gpt-4o",
                   extra_config: str = "") -> procs.Service:
    """Helios with one remote model ``m`` on the provider (as ``upstream_model``), plus ``extra_config`` TOML."""
    port = procs.free_port()
    config = workdir / f"helios-w{workers}.toml"
    config.write_text(f"""
[server]
host = "127.0.0.1"
port = {port}
workers = {workers}
log_level = "warning"

[metrics]
multiprocess_dir = "{workdir}/metrics-w{workers}"

[[models]]
name = "m"
backend = "openai"
base_url = "http://127.0.0.1:{provider_port}/v1"
api_key = "sk-x"
upstream_model = "{upstream_model}"
max_retries = 0
{extra_config}""")
    return procs.Service(f"helios-w{workers}", [PYTHON, "-m", "app"], port, "/ready",
                         env={"HELIOS_CONFIG": str(config)}, cwd=str(ROOT),
                         log_path=workdir / f"helios-w{workers}.log")


def ensure_litellm() -> Path:
    marker = LITELLM_VENV / ".installed-1.106.2"
    if not marker.exists():
        print(f"installing LiteLLM into {LITELLM_VENV} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run([str(LITELLM_VENV / "bin/pip"), "install", "-q", *LITELLM_SPEC], check=True)
        marker.touch()
    return LITELLM_VENV / "bin/litellm"


def litellm_service(workdir: Path, provider_port: int) -> procs.Service:
    port = procs.free_port()
    config = workdir / "litellm.yaml"
    config.write_text(f"""model_list:
  - model_name: m
    litellm_params:
      model: openai/gpt-4o
      api_base: http://127.0.0.1:{provider_port}/v1
      api_key: sk-x
litellm_settings:
  num_retries: 0
""")
    argv = [str(ensure_litellm()), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
            "--num_workers", "1"]
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "DISABLE_SCHEMA_UPDATE": "True",
           # loopback only, and Helios runs without keys too: no auth on either gateway
           "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true"}
    return procs.Service("litellm", argv, port, "/health/liveliness", env=env, cwd=str(workdir),
                         log_path=workdir / "litellm.log")


def git_commit() -> str:
    """HEAD of the tree under test, with "+dirty" when app/ has uncommitted changes."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "app") else "")


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("installing wrk (apt-get install -y wrk) ...", flush=True)
        subprocess.run(["apt-get", "install", "-y", "wrk"], check=False, stdout=subprocess.DEVNULL)
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("wrk is needed: apt-get install -y wrk")
    return found


# ---- measurements ---------------------------------------------------------------------------------


def pct(values: Sequence[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


def run_wrk(wrk: str, workdir: Path, target: Target, *, connections: int, duration: float,
            limit: int = 0, stream: bool = False, tokens: int = NONSTREAM_TOKENS) -> dict[str, Any]:
    body_file = workdir / f"body-{target.name}-{int(stream)}-{tokens}.json"
    body_file.write_bytes(target.body(stream=stream, tokens=tokens))
    env = {**os.environ, "BENCH_BODY_FILE": str(body_file), "BENCH_LIMIT": str(limit)}
    argv = [wrk, "-t1", f"-c{connections}", f"-d{duration:.0f}s", "--timeout", "10s",
            "-s", str(BENCH / "post.lua"), f"http://127.0.0.1:{target.port}"]
    cpu0 = target.cpu()
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=duration + 60, check=False)
    cpu = target.cpu() - cpu0
    line = next((x for x in out.stdout.splitlines() if x.startswith("BENCHJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no summary for {target.name}: {out.stdout}\n{out.stderr}")
    data: dict[str, Any] = json.loads(line[len("BENCHJSON "):])
    seconds = data["duration_us"] / 1e6
    errors = data["connect"] + data["read"] + data["write"] + data["status"] + data["timeout"]
    return {"requests": data["requests"], "seconds": seconds, "errors": errors, "cpu": cpu,
            "p50": data["p50"] / 1e3, "p90": data["p90"] / 1e3, "p95": data["p95"] / 1e3,
            "p99": data["p99"] / 1e3, "p999": data["p999"] / 1e3, "max": data["max"] / 1e3}


def merge_wrk(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Requests/s over all rounds; percentiles as the median of the rounds' percentiles."""
    requests = sum(r["requests"] for r in rounds)
    seconds = sum(r["seconds"] for r in rounds)
    cpu = sum(r["cpu"] for r in rounds)
    merged: dict[str, Any] = {
        "requests": requests, "rps": requests / seconds if seconds else 0.0,
        "errors": sum(r["errors"] for r in rounds), "cpu_per_1k": 1000 * cpu / requests if requests else None,
        "rounds": rounds,
    }
    for key in ("p50", "p95", "p99", "p999", "max"):
        merged[key] = statistics.median(r[key] for r in rounds)
    return merged


def run_async(target: Target, factory: Callable[[], Any]) -> tuple[list[loadgen.Result], float, float]:
    cpu0 = target.cpu()
    results, wall = loadgen.run(factory)
    return results, wall, target.cpu() - cpu0


def summarize_async(runs: list[tuple[list[loadgen.Result], float, float]], *,
                    stream: bool) -> dict[str, Any]:
    results = [r for rs, _, _ in runs for r in rs]
    ok = [r for r in results if r.ok]
    wall = sum(w for _, w, _ in runs)
    cpu = sum(c for _, _, c in runs)
    lat = [1e3 * r.latency for r in ok]
    kinds: dict[str, int] = {}
    for r in results:
        if not r.ok:
            kind = r.error or f"HTTP {r.status}"
            kinds[kind] = kinds.get(kind, 0) + 1
    out: dict[str, Any] = {
        "requests": len(ok), "errors": len(results) - len(ok), "error_kinds": kinds,
        "rps": len(ok) / wall if wall else 0.0,
        "cpu_per_1k": 1000 * cpu / len(ok) if ok else None,
        "p50": pct(lat, 50), "p95": pct(lat, 95), "p99": pct(lat, 99), "max": max(lat, default=float("nan")),
    }
    if stream:
        events = sum(r.events for r in ok)
        ttft = [1e3 * (r.first_event - r.start) for r in ok if r.first_event]
        ttfb = [1e3 * (r.first_byte - r.start) for r in ok if r.first_byte]
        gaps = [1e3 * (b[0] - a[0]) for r in ok for a, b in zip(r.reads, r.reads[1:], strict=False)]
        out.update({
            "events": events, "events_per_response": events / len(ok) if ok else 0,
            "events_per_s": events / wall if wall else 0.0,
            "cpu_per_1k_events": 1000 * cpu / events if events else None,
            "ttft_p50": pct(ttft, 50), "ttft_p95": pct(ttft, 95), "ttft_p99": pct(ttft, 99),
            "ttfb_p50": pct(ttfb, 50), "ttfb_p99": pct(ttfb, 99),
            "read_gap_p50": pct(gaps, 50), "read_gap_p99": pct(gaps, 99),
        })
    return out


# ---- reporting ------------------------------------------------------------------------------------


def _f(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def table(title: str, headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[_f(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = [f"\n### {title}\n", "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    return "\n".join(lines)


def ratio(a: Any, b: Any) -> float | None:
    try:
        return float(a) / float(b) if a is not None and b else None
    except (TypeError, ValueError):
        return None


def latency_table(title: str, stats: dict[str, dict[str, Any]], direct: str = "direct",
                  keys: tuple[str, str, str] = ("p50", "p95", "p99")) -> str:
    base = stats.get(direct, {})
    headers = ["path", f"{keys[0]} ms", f"{keys[1]} ms", f"{keys[2]} ms", "req/s",
               f"added {keys[0]} ms", f"added {keys[2]} ms", "CPU s/1k req", "errors"]
    rows = []
    for name, s in stats.items():
        added50 = None if name == direct else s[keys[0]] - base.get(keys[0], float("nan"))
        added99 = None if name == direct else s[keys[2]] - base.get(keys[2], float("nan"))
        rows.append([name, s[keys[0]], s[keys[1]], s[keys[2]], s["rps"], added50, added99,
                     s.get("cpu_per_1k"), s["errors"]])
    text = table(title, headers, rows)
    lite = stats.get("litellm")
    for name, s in stats.items():
        if name.startswith("helios") and lite:
            floor = base.get(keys[0], 0.0)
            text += (f"\n{name}/litellm: req/s {_f(ratio(s['rps'], lite['rps']))}x, "
                     f"{keys[0]} {_f(ratio(s[keys[0]], lite[keys[0]]))}x, "
                     f"{keys[2]} {_f(ratio(s[keys[2]], lite[keys[2]]))}x, "
                     f"added {keys[0]} {_f(ratio(s[keys[0]] - floor, lite[keys[0]] - floor))}x, "
                     f"CPU/req {_f(ratio(s.get('cpu_per_1k'), lite.get('cpu_per_1k')))}x")
    return text


# ---- the run --------------------------------------------------------------------------------------


@dataclass
class Plan:
    rounds: int
    duration: float  # seconds per wrk segment
    stream_c1_count: int
    stream_c16_count: int
    stream_seconds: float  # time limit per streaming segment (a slow gateway gets fewer requests)
    open_seconds: float
    soak_requests: int
    soak_interval: float
    warmup: int
    client_floor_calls: int


QUICK = Plan(rounds=2, duration=2, stream_c1_count=40, stream_c16_count=64, stream_seconds=2.5, open_seconds=2,
             soak_requests=3_000, soak_interval=2, warmup=200, client_floor_calls=500)
FULL = Plan(rounds=3, duration=8, stream_c1_count=200, stream_c16_count=400, stream_seconds=15, open_seconds=8,
            soak_requests=100_000, soak_interval=10, warmup=1000, client_floor_calls=3000)


def interleave(rounds: int, targets: list[Target], step: Callable[[Target], Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {t.name: [] for t in targets}
    for _ in range(rounds):
        for target in targets:
            out[target.name].append(step(target))
    return out


def warm(target: Target, count: int) -> None:
    payload = target.payload(stream=False, tokens=NONSTREAM_TOKENS)
    results, _ = loadgen.run(lambda: loadgen.closed_loop(
        "127.0.0.1", target.port, payload, concurrency=8, count=count, time_limit=60))
    spayload = target.payload(stream=True, tokens=STREAM_TOKENS)
    sresults, _ = loadgen.run(lambda: loadgen.closed_loop(
        "127.0.0.1", target.port, spayload, concurrency=4, count=max(8, count // 20), time_limit=60))
    bad = [r for r in results + sresults if not r.ok]
    if bad:
        raise RuntimeError(f"{target.name}: warm-up failed: status {bad[0].status} {bad[0].error}")


def soak(target: Target, requests: int, interval: float) -> dict[str, Any]:
    """A fixed number of non-streaming requests at c=32 (asyncio client), RSS sampled every ``interval``."""
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    started = time.perf_counter()

    def sample() -> None:
        while True:
            samples.append((time.perf_counter() - started, target.rss()))
            if stop.wait(interval):
                break

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    payload = target.payload(stream=False, tokens=NONSTREAM_TOKENS)
    try:
        run = run_async(target, lambda: loadgen.closed_loop("127.0.0.1", target.port, payload, concurrency=32,
                                                             count=requests, time_limit=max(60, requests / 100)))
    finally:
        stop.set()
        thread.join()
    samples.append((time.perf_counter() - started, target.rss()))
    result = summarize_async([run], stream=False)
    rss = [s[1] for s in samples]
    return {**result, "seconds": run[1],
            "rss_start_mb": rss[0] / MB, "rss_end_mb": rss[-1] / MB, "rss_max_mb": max(rss) / MB,
            "rss_growth_mb": (rss[-1] - rss[0]) / MB,
            "samples": [(round(t, 1), round(r / MB, 2)) for t, r in samples]}


def profile(workdir: Path, target: Target, wrk: str, seconds: float) -> dict[str, Any]:
    """py-spy record against the gateway under non-streaming c=64 and streaming c=16 load."""
    pyspy = shutil.which("py-spy") or str(LITELLM_VENV / "bin/py-spy")
    out: dict[str, Any] = {}
    for kind in ("nonstream_c64", "stream_c16"):
        raw = workdir / f"profile-{target.name}-{kind}.txt"
        spy = subprocess.Popen([pyspy, "record", "--pid", str(target.pid), "--duration", str(int(seconds)),
                                "--rate", "250", "--format", "raw", "--output", str(raw), "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)
        if kind == "nonstream_c64":
            run_wrk(wrk, workdir, target, connections=64, duration=seconds)
        else:
            loadgen.run(functools.partial(loadgen.closed_loop, "127.0.0.1", target.port,
                                          target.payload(stream=True, tokens=STREAM_TOKENS), concurrency=16,
                                          count=100_000, time_limit=seconds))
        spy.wait(timeout=seconds + 60)
        out[kind] = summarize_profile(raw) if raw.exists() else {"error": "py-spy produced nothing"}
        out[kind]["raw"] = str(raw)
    return out


def summarize_profile(raw: Path, top: int = 30) -> dict[str, Any]:
    """Self and inclusive shares of the samples, per function (line numbers dropped), from py-spy's
    collapsed stacks (``frame;frame;... count``); the threads' and process' own frames are skipped."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    processes: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        if stack.startswith("process "):
            process = stack.split(";", 1)[0][:80]
            processes[process] = processes.get(process, 0) + count
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")
                  if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            incl[frame] = incl.get(frame, 0) + count

    def share(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return {"samples": total, "self": share(own), "inclusive": share(incl),
            "processes": {k: round(100 * v / total, 1) for k, v in processes.items()} if total else {}}


class Bench:
    """One run: the processes, the report, and the text printed."""

    def __init__(self, plan: Plan, wrk: str, workdir: Path) -> None:
        self.plan = plan
        self.wrk = wrk
        self.workdir = workdir
        self.services: list[procs.Service] = []
        self.targets: dict[str, Target] = {}
        self.text: list[str] = []
        self.report: dict[str, Any] = {"plan": plan.__dict__, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                       "commit": git_commit(),
                                       "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(),
                                       "scenarios": {}, "gateways": {}}

    def emit(self, block: str) -> None:
        if not self.text:
            block = (f"Helios commit {self.report['commit']}; {os.cpu_count()} CPUs; load average before "
                     f"{self.report['loadavg_before'][0]:.2f}\n") + block
        print(block, flush=True)
        self.text.append(block)

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()

    # ---- processes ---------------------------------------------------------------------------------

    def start_provider(self) -> Target:
        provider = provider_service(self.workdir)
        provider.start()
        self.services.append(provider)
        direct = self.targets["direct"] = Target("direct", provider.port, "gpt-4o", provider, provider.pid)
        warm(direct, self.plan.warmup)
        return direct

    def provider_capacity(self) -> None:
        direct = self.targets["direct"]
        cap = run_wrk(self.wrk, self.workdir, direct, connections=64, duration=self.plan.duration * 2)
        payload = direct.payload(stream=True, tokens=STREAM_TOKENS)
        scap = summarize_async([run_async(direct, lambda: loadgen.closed_loop(
            "127.0.0.1", direct.port, payload, concurrency=16, count=self.plan.stream_c16_count * 4,
            time_limit=30))], stream=True)
        rps = cap["requests"] / cap["seconds"]
        self.report["provider_capacity"] = {"nonstream_c64_rps": rps, "p99": cap["p99"],
                                            "stream_c16_events_per_s": scap["events_per_s"],
                                            "cpu_per_1k": 1000 * cap["cpu"] / cap["requests"]}
        self.emit(f"\nProvider imitation alone: {rps:,.0f} req/s non-streaming at c=64 (wrk, 1 thread; p99 "
                  f"{cap['p99']:.2f} ms, {1000 * cap['cpu'] / cap['requests']:.3f} CPU s/1k req); streaming "
                  f"{STREAM_TOKENS} chunks at c=16: {scap['events_per_s']:,.0f} events/s to the asyncio client")

    def start_gateways(self, services: list[procs.Service]) -> None:
        rows = []
        for service in services:
            service.start()
            self.services.append(service)
            time.sleep(1.0)
            target = Target(service.name, service.port, "m", service, service.pid)
            rss_start = target.rss()
            warm(target, self.plan.warmup)
            target.info = {"startup_s": service.startup_seconds, "rss_after_start_mb": rss_start / MB,
                           "rss_after_warmup_mb": target.rss() / MB,
                           "processes": len(procs.tree_pids(target.pid))}
            self.targets[service.name] = target
            rows.append([service.name, service.startup_seconds, rss_start / MB,
                         target.info["rss_after_warmup_mb"], target.info["processes"]])
        self.report["gateways"] = {t.name: t.info for t in self.targets.values() if t.info}
        self.emit(table("Gateways: start-up time (to 200 on the readiness URL) and RSS of the process tree",
                        ["gateway", "start-up s", "RSS after start MB", "RSS after warm-up MB", "processes"],
                        rows))

    # ---- scenarios ---------------------------------------------------------------------------------

    def pick(self, *names: str) -> list[Target]:
        return [self.targets[n] for n in names if n in self.targets]

    def wrk_scenario(self, key: str, title: str, connections: int, targets: list[Target]) -> dict[str, Any]:
        runs = interleave(self.plan.rounds, targets, lambda t: run_wrk(
            self.wrk, self.workdir, t, connections=connections, duration=self.plan.duration))
        stats = {name: merge_wrk(r) for name, r in runs.items()}
        self.report["scenarios"][key] = stats
        self.emit(latency_table(title, stats))
        return stats

    def open_scenario(self, rate: float, targets: list[Target]) -> None:
        count = int(rate * self.plan.open_seconds)

        def step(t: Target) -> tuple[list[loadgen.Result], float, float]:
            payload = t.payload(stream=False, tokens=NONSTREAM_TOKENS)
            return run_async(t, lambda: loadgen.open_loop("127.0.0.1", t.port, payload, rate=rate, count=count,
                                                           time_limit=self.plan.open_seconds * 3))

        runs = interleave(self.plan.rounds, targets, step)
        stats = {name: summarize_async(r, stream=False) for name, r in runs.items()}
        self.report["scenarios"]["nonstream_open"] = {"rate": rate, **stats}
        self.emit(latency_table(f"Non-streaming chat, open loop at {rate:.0f} req/s (asyncio client; latency "
                                "counted from the scheduled send time)", stats))

    def stream_runs(self, concurrency: int, count: int, targets: list[Target]) -> dict[str, dict[str, Any]]:
        def step(t: Target) -> tuple[list[loadgen.Result], float, float]:
            payload = t.payload(stream=True, tokens=STREAM_TOKENS)
            return run_async(t, lambda: loadgen.closed_loop("127.0.0.1", t.port, payload, concurrency=concurrency,
                                                             count=count, time_limit=self.plan.stream_seconds,
                                                             record_reads=True))

        runs = interleave(self.plan.rounds, targets, step)
        return {name: summarize_async(r, stream=True) for name, r in runs.items()}

    def stream_c1(self, targets: list[Target]) -> None:
        stats = self.stream_runs(1, self.plan.stream_c1_count, targets)
        self.report["scenarios"]["stream_c1"] = stats
        self.emit(latency_table(f"Streaming chat, {STREAM_TOKENS} chunks, concurrency 1: time to first token "
                                "(first SSE event)", stats, keys=("ttft_p50", "ttft_p95", "ttft_p99")))
        self.emit(latency_table("Same runs: whole streamed response", stats))

    def stream_c16(self, targets: list[Target]) -> None:
        stats = self.stream_runs(16, self.plan.stream_c16_count, targets)
        self.report["scenarios"]["stream_c16"] = stats
        rows = [[n, s["events_per_s"], s["events_per_response"], s["rps"], s["ttft_p50"], s["ttft_p99"],
                 s["read_gap_p99"], s["cpu_per_1k"], 1e3 * (s["cpu_per_1k_events"] or 0), s["errors"]]
                for n, s in stats.items()]
        block = table(f"Streaming chat, {STREAM_TOKENS} chunks, concurrency 16: chunk relay capacity",
                      ["path", "events/s", "events/resp", "resp/s", "TTFT p50 ms", "TTFT p99 ms",
                       "read gap p99 ms", "CPU s/1k req", "CPU us/event", "errors"], rows)
        lite = stats.get("litellm")
        for name in ("helios-w1", "helios-w2"):
            if lite and name in stats:
                mine = stats[name]
                block += (f"\n{name}/litellm: events/s {_f(ratio(mine['events_per_s'], lite['events_per_s']))}x, "
                          f"CPU/event {_f(ratio(mine['cpu_per_1k_events'], lite['cpu_per_1k_events']))}x")
        self.emit(block)

    def soak_scenario(self) -> None:
        plan = self.plan
        result = soak(self.targets["helios-w1"], plan.soak_requests, plan.soak_interval)
        self.report["scenarios"]["soak_helios_w1"] = result
        self.emit(table(f"Soak: helios-w1, {result['requests']:,} non-streaming requests at c=32 (asyncio client), "
                        f"RSS of the process tree every {plan.soak_interval:.0f} s",
                        ["req/s", "p50 ms", "p99 ms", "errors", "RSS start MB", "RSS end MB", "RSS max MB",
                         "growth MB"],
                        [[result["rps"], result["p50"], result["p99"], result["errors"], result["rss_start_mb"],
                          result["rss_end_mb"], result["rss_max_mb"], result["rss_growth_mb"]]]))
        self.emit("RSS samples (s: MB): " + ", ".join(f"{t:.0f}: {r:.1f}" for t, r in result["samples"]))

    def start_floors(self) -> None:
        """Hypercorn alone and Hypercorn + Quart with fixed answers (bench/floors.py), measured like gateways."""
        for kind in ("asgi", "quart"):
            port = procs.free_port()
            service = procs.Service(f"floor-{kind}", [PYTHON, "-m", "bench.floors", "serve", "--app", kind,
                                                      "--port", str(port)],
                                    port, "/health", cwd=str(ROOT), log_path=self.workdir / f"floor-{kind}.log")
            service.start()
            self.services.append(service)
            self.targets[service.name] = Target(service.name, port, "m", service, service.pid)

    def client_floor(self) -> None:
        direct = self.targets["direct"]
        done = subprocess.run([PYTHON, "-m", "bench.floors", "client", "--port", str(direct.port), "--calls",
                               str(self.plan.client_floor_calls)], cwd=ROOT, capture_output=True, text=True,
                              check=True, timeout=600)
        floors: dict[str, dict[str, float]] = json.loads(done.stdout.strip().splitlines()[-1])
        self.report["scenarios"]["client_floor"] = floors
        rows = [[transport, f["call_cpu_us"], f["call_wall_us"], f["stream_first_chunk_cpu_us"],
                 f["stream_first_chunk_wall_us"]] for transport, f in floors.items()]
        self.emit(table("Floor of every provider call: the openai client alone, back to back against the provider "
                        "imitation (bench/floors.py)",
                        ["transport", "call CPU us", "call wall us", "stream to 1st chunk CPU us",
                         "stream to 1st chunk wall us"], rows))

    def scenarios(self) -> None:
        abc = self.pick("direct", "helios-w1", "litellm")
        abcd = self.pick("direct", "helios-w1", "helios-w2", "litellm")
        c1 = self.wrk_scenario("nonstream_c1", "Non-streaming chat, concurrency 1 (wrk, closed loop): latency; "
                               "floor-* are Hypercorn alone and with Quart, answering at once", 1,
                               self.pick("direct", "floor-asgi", "floor-quart", "helios-w1", "litellm"))
        self.client_floor()
        if "floor-quart" in c1:
            server = c1["floor-quart"]["p50"] - c1["direct"]["p50"]
            call = self.report["scenarios"]["client_floor"]["aiohttp"]["call_wall_us"] / 1000
            self.report["added_latency_floor_ms"] = server + call
            self.emit(f"Lowest added latency the fixed stack allows at c=1: Hypercorn + Quart {server:.2f} ms + "
                      f"openai client call {call:.2f} ms = {server + call:.2f} ms (Helios measured "
                      f"{c1['helios-w1']['p50'] - c1['direct']['p50']:.2f} ms)")
        c64 = self.wrk_scenario("nonstream_c64", "Non-streaming chat, concurrency 64 (wrk, closed loop): "
                                "throughput", 64, abcd)
        slowest = min(s["rps"] for n, s in c64.items() if n != "direct")
        self.open_scenario(max(20.0, round(0.5 * slowest, -1)), abcd)
        self.stream_c1(abc)
        self.stream_c16(abcd)
        if self.plan.soak_requests:
            self.soak_scenario()
        self.report["targets"] = check_targets(self.report)
        self.emit(table("Targets (Helios, one worker)", ["target", "measured", "goal", "met"],
                        self.report["targets"]))

    def profile_scenario(self) -> None:
        prof = self.report["profile"] = profile(self.workdir, self.targets["helios-w1"], self.wrk,
                                                max(10.0, self.plan.duration * 2))
        for kind, found in prof.items():
            self.emit(f"\npy-spy, helios-w1 under {kind}: {found.get('samples')} samples; top self time:")
            self.emit("\n".join(f"  {share:5.1f}%  {name}" for name, share in found.get("self", [])[:20]))
            self.emit("top inclusive:")
            self.emit("\n".join(f"  {share:5.1f}%  {name}" for name, share in found.get("inclusive", [])[:30]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small counts, short soak: under two minutes")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per scenario")
    parser.add_argument("--duration", type=float, help="seconds per wrk segment")
    parser.add_argument("--soak-requests", type=int, help="0 skips the soak")
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument("--profile", action="store_true", help="py-spy the one-worker gateway afterwards")
    parser.add_argument("--profile-only", action="store_true",
                        help="only start the provider and a one-worker Helios, and py-spy it under load")
    parser.add_argument("--keep-workdir", action="store_true", help="keep configs and logs (path printed)")
    args = parser.parse_args(argv)
    overrides = {"rounds": args.rounds, "duration": args.duration, "soak_requests": args.soak_requests}
    plan = Plan(**{**(QUICK if args.quick else FULL).__dict__,
                   **{k: v for k, v in overrides.items() if v is not None}})
    wrk = ensure_wrk()
    RESULTS.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="helios-bench-"))
    began = time.perf_counter()
    bench = Bench(plan, wrk, workdir)
    bench.report["mode"] = "quick" if args.quick else "full"
    try:
        bench.start_provider()
        if not args.profile_only:
            bench.provider_capacity()
        gateways = [helios_service(workdir, bench.targets["direct"].port, 1)]
        if not args.profile_only:
            gateways.append(helios_service(workdir, bench.targets["direct"].port, 2))
            if not args.no_litellm:
                gateways.append(litellm_service(workdir, bench.targets["direct"].port))
        bench.start_gateways(gateways)
        if not args.profile_only:
            bench.start_floors()
            bench.scenarios()
        if args.profile or args.profile_only:
            bench.profile_scenario()
    finally:
        bench.stop()
        if args.keep_workdir:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report = bench.report
    report["seconds"] = time.perf_counter() - began
    report["loadavg_after"] = os.getloadavg()
    out = RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}-{report['mode']}.json"
    out.write_text(json.dumps(report, indent=1, default=str))
    out.with_suffix(".md").write_text("\n".join(bench.text) + "\n")
    print(f"\nfinished in {report['seconds']:.0f} s; results: {out.relative_to(ROOT)} (and .md)")
    return 0


def check_targets(report: dict[str, Any]) -> list[list[Any]]:
    sc = report["scenarios"]
    rows: list[list[Any]] = []

    def add(name: str, value: float | None, goal: str, ok: bool | None) -> None:
        rows.append([name, value, goal, "-" if ok is None else ("yes" if ok else "NO")])

    c1 = sc.get("nonstream_c1", {})
    if "helios-w1" in c1:
        a50 = c1["helios-w1"]["p50"] - c1["direct"]["p50"]
        a99 = c1["helios-w1"]["p99"] - c1["direct"]["p99"]
        add("added latency c=1 p50 (ms)", a50, "<= 1", a50 <= 1)
        add("added latency c=1 p99 (ms)", a99, "<= 3", a99 <= 3)
    c64 = sc.get("nonstream_c64", {})
    if "litellm" in c64:
        r = c64["helios-w1"]["rps"] / c64["litellm"]["rps"]
        add("throughput c=64, 1 worker / LiteLLM", r, ">= 5x", r >= 5)
    s1 = sc.get("stream_c1", {})
    if "helios-w1" in s1:
        a = s1["helios-w1"]["ttft_p50"] - s1["direct"]["ttft_p50"]
        add("streaming added TTFT p50 (ms)", a, "<= 1", a <= 1)
    s16 = sc.get("stream_c16", {})
    if "helios-w1" in s16:
        e = s16["helios-w1"]["events_per_s"]
        add("relay, 1 worker (chunks/s)", e, ">= 20,000", e >= 20_000)
    gw = report.get("gateways", {}).get("helios-w1")
    if gw:
        add("RSS after start-up, 1 worker (MB)", gw["rss_after_start_mb"], "< 150", gw["rss_after_start_mb"] < 150)
    soak_result = sc.get("soak_helios_w1")
    if soak_result:
        g = soak_result["rss_growth_mb"]
        add(f"RSS growth over soak of {soak_result['requests']:,} (MB)", g, "<= 10", g <= 10)
    return rows


if __name__ == "__main__":
    sys.exit(main())
