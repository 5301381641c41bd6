"""Resilience benchmark: a pool of two imitation providers under faults, and what routing costs when nothing fails.

    .venv/bin/python -m bench.resilience [--quick] [--strategy priority|weighted] [--profile] [--keep-workdir]

One Helios worker serves:

- ``pool``: the internal models ``m1`` and ``m2``, each on its own ``bench/provider.py`` process, routed with
  ``strategy = "priority"`` by default: every request goes to ``m1`` first while it is healthy, so a failing
  ``m1`` is the worst case for a pool (each request meets the failure first unless ``m1`` is cooling down), and
  its recovery is unambiguous (its share goes from none back to all). ``--strategy weighted`` runs 1:1
  weights instead (half the requests meet ``m1`` first; its share comes back to about half);
- ``plain``: a model on a third provider process, and ``solo``: a pool whose one member is ``plain`` (the same
  backend object, so the same connection pool): the happy-path cost of routing.

Part 1, resilience: one closed loop of 64 connections on ``pool`` runs through four phases without pausing,
    (a) healthy; (b) ``m1``'s provider fails 30% of its chat requests with HTTP 500 (the provider's
    ``POST /control/faults``, failures spread evenly); (c) ``m1``'s provider killed (SIGKILL: in-flight
    requests cut, then connection refused); (d) ``m1``'s provider restarted on its port.
Per phase, by the time a request was sent: client-visible errors (every answer checked: HTTP 200, the text,
usage, and ``X-Helios-Served-By`` a member; target 0, as ``m2`` stays healthy throughout), p50/p99 latency
after the phase's first ``settle`` seconds and the added latency over (a)'s (target: p99 within 2x of (a)'s),
upstream attempts per client request (target at most 1.3) counted at the providers (their
``GET /control/stats``, divided by the requests answered between the counts: a request reaches a provider a
queue's time after it is sent) and from the ``X-Helios-Attempts`` headers (refused connections never reach a
provider), the share each member served, Helios' CPU per request and its pool counters (``/metrics``:
cool-downs, attempts by outcome). Whether ``m1``'s cool-downs hold (at most one begins per cool-down period:
more means a cool-down ended early, without its probe). In (d): whether ``m1`` got its traffic back, and how
long after its restart it answered again (a probe goes through when its cool-down ends). A timeline follows.

Part 2, routing cost on the happy path, ``solo`` against ``plain`` (target: at most 0.05 ms more per request):

- c=1: one connection each, request by request, the order reversed every other turn; the added latency is the
  median of the per-turn differences (with a 95% interval for that median), the added CPU likewise from
  Helios' on-CPU time (schedstat) around each request;
- c=64: Helios' CPU per request from utime+stime in ``/proc/<pid>/stat`` (and schedstat, in nanoseconds).
  This machine's speed drifts by up to 2x within a minute, and an A/A test of one worker in alternating
  segments showed per-round differences of 0.4-0.9 ms (of about 3 ms per request): too noisy for a 0.05 ms
  target. So a second worker with the same configuration starts, both take c=64 at the same time (one path
  each, so both see the same machine), and the paths swap workers every round; the added CPU per pair of
  rounds is free of any difference between the two workers (shown too);
- in process: ``RouterBackend.chat`` over a backend that answers at once against that backend alone, in a
  process of its own with the metrics in multiprocess mode as in a worker: the router's own time, precisely.

``--profile`` adds py-spy profiles of the worker under c=64 load on ``solo`` and ``plain`` (py-spy from PATH,
the venv, LiteLLM's bench venv or /tmp/pyspy-venv).

Tables are printed and written with the JSON to ``bench/results/<timestamp>-resilience-<mode>.json`` (and
``.md``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/resilience.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import loadgen, procs, responses, run

TOKENS = run.NONSTREAM_TOKENS
CONCURRENCY = 64
POOL, SOLO, PLAIN = "pool", "solo", "plain"
M1, M2 = "m1", "m2"
FAIL_RATE = 0.3
FAIL_STATUS = 500
ROUTING: dict[str, float] = {
    "max_attempts": 3,  # each member once, then one retry round
    "allowed_fails": 3,
    "failure_window": 10.0,
    "cooldown": 3.0,
    "backoff_base": 0.05,
    "backoff_max": 1.0,
    "max_retry_wait": 5.0,
}
MEMBER_CONFIG = {"timeout": 30.0, "connect_timeout": 2.0}
ERRORS_GOAL = 0
P99_RATIO_GOAL = 2.0
ATTEMPTS_GOAL = 1.3
ADDED_MS_GOAL = 0.05
REQUEST_TIMEOUT = 30.0  # seconds a client request may take before it counts as an error
PHASES = (
    ("a", "healthy"),
    ("b", f"m1 fails {FAIL_RATE:.0%} with HTTP {FAIL_STATUS}"),
    ("c", "m1 down (killed: connection refused)"),
    ("d", "m1 back (restarted)"),
)
COST_PATHS = ("plain", "solo (pool of one)")


@dataclass
class Plan:
    phase_seconds: tuple[float, float, float, float]
    settle: float  # seconds at the start of each phase left out of its latency figures
    c1_count: int  # request pairs at c=1
    c64_count: int  # requests per worker per round at c=64
    rounds: int  # c=64 rounds (the paths swap workers every round)
    time_limit: float  # seconds: a c=64 round at most (x4), the c=1 pairs at most (x8)
    warmup: int
    profile_seconds: float


QUICK = Plan(phase_seconds=(6, 10, 8, 10), settle=2, c1_count=300, c64_count=300, rounds=8, time_limit=6,
             warmup=200, profile_seconds=6)
FULL = Plan(phase_seconds=(20, 30, 25, 30), settle=3, c1_count=2000, c64_count=500, rounds=40, time_limit=15,
            warmup=1000, profile_seconds=12)


# ---- the client ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Record:
    start: float
    end: float
    error: str | None  # None: a checked HTTP 200
    attempts: int | None  # X-Helios-Attempts
    served_by: str | None  # X-Helios-Served-By


class _Tracked(responses._Checked):
    """A checked connection that also reads the routing headers of each answer."""

    attempts: int | None
    served_by: str | None

    def _reset(self) -> None:
        super()._reset()
        self.attempts = None
        self.served_by = None

    def _finish(self, error: str | None = None) -> None:
        if self.result is not None and self.head_done:
            keep = self.keep  # the reads up to the end of the head
            end = keep.find(b"\r\n\r\n")
            for line in bytes(keep[:max(end, 0)]).split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                key = name.strip().lower()
                if key == b"x-helios-attempts":
                    self.attempts = int(value)
                elif key == b"x-helios-served-by":
                    self.served_by = value.strip().decode()
        super()._finish(error)


async def drive(port: int, payload: bytes, check: responses.Check, served_by: set[str], *, concurrency: int,
                stop: asyncio.Event, records: list[Record]) -> None:
    """``concurrency`` connections sending requests back to back until ``stop`` is set."""
    loop = asyncio.get_running_loop()
    clock = time.perf_counter

    async def worker() -> None:
        client: _Tracked | None = None
        try:
            while not stop.is_set():
                sent = clock()
                try:
                    if client is None or client.closed:
                        _, client = await loop.create_connection(functools.partial(_Tracked, check), "127.0.0.1",
                                                                 port)
                    result = await asyncio.wait_for(client.request(payload), REQUEST_TIMEOUT)
                except (OSError, TimeoutError) as exc:
                    records.append(Record(sent, clock(), f"client: {type(exc).__name__}", None, None))
                    if client is not None:
                        client.close()
                        client = None
                    await asyncio.sleep(0.05)
                    continue
                error = result.error or (None if result.ok else f"HTTP {result.status}")
                if error is None and client.served_by not in served_by:
                    error = f"served by {client.served_by!r}"
                records.append(Record(result.start, result.end, error, client.attempts, client.served_by))
        finally:
            if client is not None:
                client.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def http(port: int, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """One request on a connection of its own, for the providers' control endpoints."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        data = json.dumps(body).encode() if body is not None else b""
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"{method} {path} on port {port}: {head[:80]!r}")
    doc: dict[str, Any] = json.loads(payload)
    return doc


_METRIC = re.compile(r'^(helios_pool_attempts_total|helios_pool_cooldowns_total)\{([^}]*)\} ([0-9.e+]+)$', re.M)


def pool_metrics(port: int) -> dict[str, float]:
    """Helios' pool counters for ``pool``: ``cooldowns m1``, ``attempts m1 ok`` and so on."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for name, labels, value in _METRIC.findall(text):
        tags = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if tags.get("pool") != POOL:
            continue
        key = (f"cooldowns {tags['member']}" if name.startswith("helios_pool_cooldowns")
               else f"attempts {tags['member']} {tags.get('outcome')}")
        out[key] = out.get(key, 0.0) + float(value)
    return out


# ---- statistics ----------------------------------------------------------------------------------


def median_interval(values: list[float]) -> tuple[float | None, float | None, float | None]:
    """The median and a 95% interval for it (order statistics, the normal approximation to the binomial)."""
    if not values:
        return None, None, None
    ordered = sorted(values)
    n = len(ordered)
    half = 1.96 * n ** 0.5 / 2
    low = max(0, int(n / 2 - half))
    high = min(n - 1, int(n / 2 + half))
    return statistics.median(ordered), ordered[low], ordered[high]


def mean_se(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None)


def _lat(records: list[Record]) -> list[float]:
    return [1e3 * (r.end - r.start) for r in records if r.error is None]


def _pm(mean: float | None, error: float | None, digits: int = 3) -> str:
    return "-" if mean is None else f"{mean:.{digits}f} +- {responses._num(error, digits)}"


def _met(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "NO")


# ---- the run -------------------------------------------------------------------------------------


class ResilienceBench:
    def __init__(self, plan: Plan, workdir: Path, mode: str, strategy: str) -> None:
        self.plan = plan
        self.workdir = workdir
        self.strategy = strategy
        self.services: list[procs.Service] = []
        self.text: list[str] = []
        self.generation = {M1: 0, M2: 0}
        self.report: dict[str, Any] = {
            "mode": mode, "plan": plan.__dict__, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "commit": run.git_commit(), "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(),
            "strategy": strategy, "routing": ROUTING, "member_config": MEMBER_CONFIG, "concurrency": CONCURRENCY,
            "fault": {"fail_rate": FAIL_RATE, "status": FAIL_STATUS}, "tokens": TOKENS,
        }

    def emit(self, block: str) -> None:
        if not self.text:
            block = (f"Helios commit {self.report['commit']}; {os.cpu_count()} CPUs; load average before "
                     f"{self.report['loadavg_before'][0]:.2f}. Client, provider imitations and Helios (one worker) "
                     "share these CPUs: latencies are noisy, CPU per request much less so.\n") + block
        print(block, flush=True)
        self.text.append(block)

    # ---- processes ---------------------------------------------------------------------------------

    def provider(self, name: str, port: int | None = None) -> procs.Service:
        port = port or procs.free_port()
        generation = self.generation.get(name, 0)
        return procs.Service(f"provider-{name}", [run.PYTHON, "-m", "bench.provider", "--port", str(port),
                                                  "--tokens", str(TOKENS)],
                             port, "/health", cwd=str(run.ROOT),
                             log_path=self.workdir / f"provider-{name}-{generation}.log")

    def config(self, port: int, tag: str = "helios") -> Path:
        members = "\n".join(f"""
[[models]]
name = "{name}"
internal = true
backend = "openai"
base_url = "http://127.0.0.1:{self.providers[name].port}/v1"
api_key = "sk-x"
upstream_model = "gpt-4o"
max_retries = 0
timeout = {MEMBER_CONFIG['timeout']}
connect_timeout = {MEMBER_CONFIG['connect_timeout']}
""" for name in (M1, M2))
        weights = "weights = [1.0, 1.0]\n" if self.strategy == "weighted" else ""
        routing = "\n".join(f"{key} = {value:g}" for key, value in ROUTING.items())
        path = self.workdir / f"{tag}.toml"
        path.write_text(f"""
[server]
host = "127.0.0.1"
port = {port}
workers = 1
log_level = "warning"
keep_alive_timeout = 60

[metrics]
multiprocess_dir = "{self.workdir}/metrics-{tag}"

[routing]
{routing}
{members}
[[models]]
name = "{PLAIN}"
backend = "openai"
base_url = "http://127.0.0.1:{self.providers[PLAIN].port}/v1"
api_key = "sk-x"
upstream_model = "gpt-4o"
max_retries = 0

[[pools]]
name = "{POOL}"
members = ["{M1}", "{M2}"]
strategy = "{self.strategy}"
{weights}
[[pools]]
name = "{SOLO}"
members = ["{PLAIN}"]
""")
        return path

    def start(self) -> None:
        self.providers: dict[str, procs.Service] = {}
        for name in (M1, M2, PLAIN):
            service = self.provider(name)
            service.start()
            self.services.append(service)
            self.providers[name] = service
        port = procs.free_port()
        self.helios = procs.Service("helios", [run.PYTHON, "-m", "app"], port, "/ready",
                                    env={"HELIOS_CONFIG": str(self.config(port))}, cwd=str(run.ROOT),
                                    log_path=self.workdir / "helios.log")
        self.helios.start()
        self.services.append(self.helios)
        self.routes = {
            POOL: responses.Route(POOL, port, POOL, self.helios, self.helios.pid),
            COST_PATHS[0]: responses.Route(COST_PATHS[0], port, PLAIN, self.helios, self.helios.pid),
            COST_PATHS[1]: responses.Route(COST_PATHS[1], port, SOLO, self.helios, self.helios.pid),
        }
        expected = {POOL: M1 if self.strategy == "priority" else None, COST_PATHS[0]: PLAIN, COST_PATHS[1]: PLAIN}
        for name, route in self.routes.items():
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                             data=route.body(stream=False, tokens=TOKENS),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as response:
                served, attempts = response.headers["X-Helios-Served-By"], response.headers["X-Helios-Attempts"]
                problem = responses.chat_check(TOKENS, False)(response.read(), loadgen.Result(start=0.0))
            if problem or attempts != "1" or (expected[name] and served != expected[name]):
                raise RuntimeError(f"{name}: {problem or 'answer ok'}, served by {served}, attempts {attempts}")
        for route in self.routes.values():
            results = responses.segment(route, stream=False, tokens=TOKENS, concurrency=8, count=self.plan.warmup,
                                        time_limit=60)[0]
            bad = [r for r in results if not r.ok]
            if bad or len(results) < self.plan.warmup:
                raise RuntimeError(f"{route.name}: warm-up failed, {len(bad)} bad of {len(results)}")
        self.report["helios"] = {"startup_s": self.helios.startup_seconds,
                                 "rss_after_warmup_mb": procs.rss_bytes(self.helios.pid) / run.MB}

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()

    def kill(self, service: procs.Service) -> None:
        """A crash: SIGKILL to the provider's session (ours, led by its PID), so its sockets close at once."""
        assert service.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(service.pid, signal.SIGKILL)
        service.proc.wait(10)

    def restart(self, name: str) -> procs.Service:
        old = self.providers[name]
        self.generation[name] += 1
        service = self.provider(name, old.port)
        service.start(timeout=60)
        self.services[self.services.index(old)] = service
        self.providers[name] = service
        return service

    # ---- part 1: resilience ------------------------------------------------------------------------

    async def snapshot(self) -> dict[str, Any]:
        """What the providers counted (None: down), Helios' CPU seconds and pool counters, now."""
        loop = asyncio.get_running_loop()
        counts: dict[str, Any] = {}
        for name in (M1, M2):
            service = self.providers[name]
            if service.proc is None or service.proc.poll() is not None:
                counts[name] = None
                continue
            stats = await http(service.port, "GET", "/control/stats")
            counts[name] = {"generation": self.generation[name], "chat": sum(stats["chat_requests"].values()),
                            "failed": sum(stats["failed"].values())}
        metrics = await loop.run_in_executor(None, pool_metrics, self.helios.port)
        return {"providers": counts, "cpu": procs.cpu_seconds(self.helios.pid), "metrics": metrics}

    async def phases(self) -> tuple[list[Record], list[tuple[str, float, float]], list[dict[str, Any]], float]:
        loop = asyncio.get_running_loop()
        clock = time.perf_counter
        route = self.routes[POOL]
        records: list[Record] = []
        stop = asyncio.Event()
        seconds = dict(zip((key for key, _ in PHASES), self.plan.phase_seconds, strict=True))
        snaps: list[dict[str, Any]] = []
        marks: list[tuple[str, float]] = []
        m1 = self.providers[M1]
        began = clock()
        load: asyncio.Task[None] | None = None
        self.lags: list[tuple[float, float]] = []

        async def probe() -> None:
            """How late a 10 ms sleep of the client's own loop wakes up: seconds of lag mean the client (the
            machine) stalled, not Helios."""
            while not stop.is_set():
                before = clock()
                await asyncio.sleep(0.01)
                self.lags.append((before, clock() - before - 0.01))

        lagging = asyncio.create_task(probe())
        try:
            # At each boundary: the snapshot that ends one phase and begins the next, then the change. Phase (d)
            # begins once the restarted provider answers its health check (counts from its new process).
            for key, _ in PHASES:
                if key == "d":
                    m1 = await loop.run_in_executor(None, self.restart, M1)
                marks.append((key, clock()))
                snaps.append(await self.snapshot())
                if key == "a":
                    load = asyncio.create_task(drive(
                        route.port, route.payload(stream=False, tokens=TOKENS),
                        route.check(stream=False, tokens=TOKENS), {M1, M2}, concurrency=CONCURRENCY, stop=stop,
                        records=records))
                elif key == "b":
                    await http(m1.port, "POST", "/control/faults", {"fail_rate": FAIL_RATE, "status": FAIL_STATUS})
                elif key == "c":
                    self.kill(m1)
                await asyncio.sleep(seconds[key])
            marks.append(("end", clock()))
            snaps.append(await self.snapshot())
        finally:
            stop.set()
            if load is not None:
                await asyncio.wait_for(load, REQUEST_TIMEOUT + 10)
            await lagging
        bounds = [(key, start, marks[i + 1][1]) for i, (key, start) in enumerate(marks[:-1])]
        return records, bounds, snaps, began

    def resilience(self) -> None:
        self.report.setdefault("speed_index_us", []).append(round(responses.speed_index(), 3))
        records, bounds, snaps, began = loadgen.run(self.phases)
        plan = self.plan
        cooldown = ROUTING["cooldown"]
        out: dict[str, Any] = {}
        for i, (key, start, end) in enumerate(bounds):
            out[key] = self.phase_stats(key, [r for r in records if start <= r.start < end], start, end,
                                        snaps[i], snaps[i + 1], out.get("a", {}),
                                        sum(start <= r.end < end for r in records))
        self.report["resilience"] = {"phases": out, "timeline": self.timeline(records, bounds, began)}
        settings = ", ".join(f"{k} {v:g}" for k, v in ROUTING.items())
        rows = []
        for key, label in PHASES:
            s = out[key]
            rows.append([f"({key}) {label}", s["seconds"], s["requests"], s["errors"], s["rps"], s["p50"], s["p99"],
                         s["added_p50"] if key != "a" else None, s["added_p99"] if key != "a" else None,
                         s["p99_ratio"] if key != "a" else None, s["attempts_per_request_providers"],
                         s["attempts_per_request_headers"], s["upstream_failed"],
                         s["m1_share"], s["cpu_ms_per_request"], s["client_lag_max_ms"]])
        block = run.table(
            f"Resilience: pool of m1, m2 ({self.strategy}), c={CONCURRENCY}, non-streaming {TOKENS} tokens; latency "
            f"after each phase's first {plan.settle:g} s",
            ["phase", "s", "requests", "errors", "req/s", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms",
             "p99 / (a)", "attempts/req (providers)", "attempts/req (headers)", "upstream 500s", "m1 share",
             "CPU ms/req", "client lag max ms"], rows)
        block += (f"\nrouting: {settings}; members: max_retries 0, timeout {MEMBER_CONFIG['timeout']:g} s, "
                  f"connect_timeout {MEMBER_CONFIG['connect_timeout']:g} s")
        for key, _ in PHASES:
            s = out[key]
            extra = f"; errors: {s['error_kinds']}" if s["errors"] else ""
            missing = f"; {s['missing_attempts_header']} answers without X-Helios-Attempts" \
                if s["missing_attempts_header"] else ""
            block += (f"\n({key}) served by {s['served_by']}; upstream requests {s['upstream_by_provider']} "
                      f"({s['upstream_failed']} failed); whole-phase p99 {responses._num(s['p99_whole_phase'], 1)} ms,"
                      f" max {responses._num(s['max_whole_phase'], 1)} ms; Helios pool counters "
                      f"{ {k: int(v) for k, v in s['pool_metrics'].items()} }{extra}{missing}")
        d = out["d"]
        block += (f"\n(d) m1 answered again {responses._num(d['m1_first_answer_after_restart_s'], 2)} s after its "
                  f"restart (cool-down {cooldown:g} s); its share in the second half of (d): "
                  f"{responses._num(d['m1_share_second_half'], 3)}; traffic back: {_met(d['m1_back'])}")
        self.emit(block)
        self.emit(self.timeline_table(self.report["resilience"]["timeline"]))

    def phase_stats(self, key: str, mine: list[Record], start: float, end: float, before_snap: dict[str, Any],
                    after_snap: dict[str, Any], base: dict[str, Any], completed: int) -> dict[str, Any]:
        """One phase's figures from the requests sent in it and the snapshots at its ends. The providers' counts
        are divided by the requests answered between the snapshots (``completed``): at c=64 a request reaches
        the provider a queue's time (about its latency) after it was sent, so it is counted in the phase in which
        it was answered, not the one in which it was sent."""
        steady = [r for r in mine if r.start >= start + self.plan.settle]
        ok = [r for r in mine if r.error is None]
        lat = _lat(steady)
        served = Counter(r.served_by for r in ok)
        by_provider: dict[str, int] = {}
        failed_upstream = 0
        for name in (M1, M2):
            before, after = before_snap["providers"][name], after_snap["providers"][name]
            if after is None:
                by_provider[name] = 0
                continue
            same = before is not None and before["generation"] == after["generation"]
            by_provider[name] = after["chat"] - (before["chat"] if same else 0)
            failed_upstream += after["failed"] - (before["failed"] if same else 0)
        upstream = sum(by_provider.values())
        metrics = {k: v - before_snap["metrics"].get(k, 0.0) for k, v in after_snap["metrics"].items()
                   if v - before_snap["metrics"].get(k, 0.0)}
        headers = [r.attempts for r in mine if r.attempts is not None]
        cpu = after_snap["cpu"] - before_snap["cpu"]
        s: dict[str, Any] = {
            "seconds": end - start, "requests": len(mine), "ok": len(ok), "errors": len(mine) - len(ok),
            "error_kinds": dict(Counter(r.error for r in mine if r.error)), "rps": len(mine) / (end - start),
            "steady_requests": len(lat), "p50": run.pct(lat, 50), "p99": run.pct(lat, 99),
            "p99_whole_phase": run.pct(_lat(mine), 99), "max_whole_phase": max(_lat(mine), default=None),
            "served_by": dict(served), "m1_share": served[M1] / len(ok) if ok else None,
            "m1_share_steady": (sum(r.served_by == M1 for r in steady if r.error is None)
                                / max(1, sum(r.error is None for r in steady))),
            "m1_cooldowns": int(metrics.get(f"cooldowns {M1}", 0)),
            "m1_cooldowns_most": math.ceil((end - start) / ROUTING["cooldown"]) + 1,
            "upstream_requests": upstream, "upstream_by_provider": by_provider, "upstream_failed": failed_upstream,
            "answered_between_snapshots": completed,
            "attempts_per_request_providers": upstream / completed if completed else None,
            "attempts_per_request_headers": sum(headers) / len(headers) if headers else None,
            "missing_attempts_header": sum(r.attempts is None and r.error is None for r in mine),
            "cpu_ms_per_request": 1e3 * cpu / len(mine) if mine else None,
            "pool_metrics": metrics,
            "client_lag_max_ms": 1e3 * max((lag for t, lag in self.lags if start <= t < end), default=0.0),
        }
        s["added_p50"] = responses._sub(s["p50"], base.get("p50"))
        s["added_p99"] = responses._sub(s["p99"], base.get("p99"))
        s["p99_ratio"] = run.ratio(s["p99"], base.get("p99"))
        if key == "d":
            back = [r for r in ok if r.served_by == M1]
            s["m1_first_answer_after_restart_s"] = (min(r.end for r in back) - start) if back else None
            later = [r for r in ok if r.start >= start + (end - start) / 2]
            s["m1_share_second_half"] = (sum(r.served_by == M1 for r in later) / len(later)) if later else None
            expected = 1.0 if self.strategy == "priority" else 0.5
            s["m1_back"] = bool(back) and (s["m1_share_second_half"] or 0) >= 0.8 * expected and by_provider[M1] > 0
        return s

    def timeline(self, records: list[Record], bounds: list[tuple[str, float, float]],
                 began: float) -> list[dict[str, Any]]:
        total = bounds[-1][2] - began
        width = max(1.0, round(total / 45))
        buckets: dict[int, list[Record]] = {}
        for r in records:
            buckets.setdefault(int((r.start - began) // width), []).append(r)
        rows = []
        for index in sorted(buckets):
            mine = buckets[index]
            at = began + index * width
            phase = next((key for key, start, end in bounds if start <= at + width / 2 < end), None)
            if phase is None:
                continue
            ok = [r for r in mine if r.error is None]
            lat = _lat(mine)
            headers = [r.attempts for r in mine if r.attempts is not None]
            rows.append({"t": round(index * width), "phase": phase, "requests": len(mine),
                         "errors": len(mine) - len(ok),
                         "rps": len(mine) / width, "p50": run.pct(lat, 50), "p99": run.pct(lat, 99),
                         "m1_share": sum(r.served_by == M1 for r in ok) / len(ok) if ok else None,
                         "attempts": sum(headers) / len(headers) if headers else None,
                         "lag": 1e3 * max((lag for t, lag in self.lags if at <= t < at + width), default=0.0)})
        return rows

    def timeline_table(self, rows: list[dict[str, Any]]) -> str:
        return run.table("Timeline (by the second a request was sent; attempts from X-Helios-Attempts; client lag: "
                         "how late the client's own 10 ms timer woke, a stall of the client or the machine)",
                         ["t s", "phase", "req/s", "errors", "p50 ms", "p99 ms", "m1 share", "attempts/req",
                          "client lag max ms"],
                         [[r["t"], r["phase"], r["rps"], r["errors"], r["p50"], r["p99"], r["m1_share"],
                           r["attempts"], r["lag"]] for r in rows])

    # ---- part 2: routing cost ----------------------------------------------------------------------

    def start_twin(self) -> None:
        """A second worker with the same configuration: at c=64 the two paths run at the same time, one on each
        worker, so both see the same machine (its speed drifts by 2x within a minute here), and swap workers
        every round, so a difference between the workers themselves cancels out."""
        port = procs.free_port()
        self.twin = procs.Service("helios-twin", [run.PYTHON, "-m", "app"], port, "/ready",
                                  env={"HELIOS_CONFIG": str(self.config(port, "twin"))}, cwd=str(run.ROOT),
                                  log_path=self.workdir / "helios-twin.log")
        self.twin.start()
        self.services.append(self.twin)
        for model in (PLAIN, SOLO):
            route = responses.Route(model, port, model, self.twin, self.twin.pid)
            results = responses.segment(route, stream=False, tokens=TOKENS, concurrency=8, count=self.plan.warmup,
                                        time_limit=60)[0]
            if any(not r.ok for r in results) or len(results) < self.plan.warmup:
                raise RuntimeError(f"twin worker, {model}: warm-up failed")

    async def paired(self, routes: list[responses.Route], count: int) -> dict[str, Any]:
        """c=1: one connection per path, one request on each in turn (the order reversed every other turn);
        Helios' on-CPU time (schedstat) from before each request to ``SETTLE`` after its answer."""
        loop = asyncio.get_running_loop()
        clock = time.perf_counter
        clients: dict[str, responses._Checked] = {}
        results: dict[str, list[loadgen.Result]] = {r.name: [] for r in routes}
        cpu: dict[str, list[float]] = {r.name: [] for r in routes}
        deadline = clock() + self.plan.time_limit * 8
        try:
            for turn in range(count):
                if clock() > deadline:
                    break
                for route in routes if turn % 2 == 0 else routes[::-1]:
                    name = route.name
                    client = clients.get(name)
                    if client is None or client.closed:
                        _, client = await loop.create_connection(
                            functools.partial(responses._Checked, route.check(stream=False, tokens=TOKENS)),
                            "127.0.0.1", route.port)
                        clients[name] = client
                    before = responses.task_cpu_ns(route.pid)
                    results[name].append(await client.request(route.payload(stream=False, tokens=TOKENS)))
                    await asyncio.sleep(responses.SETTLE)
                    cpu[name].append((responses.task_cpu_ns(route.pid) - before) / 1e6)
        finally:
            for client in clients.values():
                client.close()
        return {"results": results, "cpu": cpu}

    async def simultaneous(self, count: int, rounds: int) -> list[dict[str, Any]]:
        """c=64 on each worker at once, ``count`` requests each per round: round 0 plain on the first worker
        and solo on the twin, round 1 the other way round, and so on. Connections stay open for the run."""
        loop = asyncio.get_running_loop()
        clock = time.perf_counter
        workers = [self.helios, self.twin]
        check = responses.chat_check(TOKENS, False)
        payloads = {(w.name, model): responses.Route(model, w.port, model).payload(stream=False, tokens=TOKENS)
                    for w in workers for model in (PLAIN, SOLO)}

        async def connect(worker: procs.Service) -> responses._Checked:
            _, client = await loop.create_connection(functools.partial(responses._Checked, check), "127.0.0.1",
                                                     worker.port)
            return client

        conns = {w.name: [await connect(w) for _ in range(CONCURRENCY)] for w in workers}
        out: list[dict[str, Any]] = []
        try:
            for turn in range(rounds):
                roles = dict(zip((w.name for w in workers), (PLAIN, SOLO) if turn % 2 == 0 else (SOLO, PLAIN),
                                 strict=True))
                results: dict[str, list[loadgen.Result]] = {w.name: [] for w in workers}
                remaining = dict.fromkeys(roles, count)
                walls: dict[str, float] = {}
                started = clock()

                async def one(worker: procs.Service, i: int, results: dict[str, list[loadgen.Result]] = results,
                              remaining: dict[str, int] = remaining, roles: dict[str, str] = roles) -> None:
                    name = worker.name
                    while remaining[name] > 0:
                        remaining[name] -= 1
                        client = conns[name][i]
                        if client.closed:
                            client = conns[name][i] = await connect(worker)
                        results[name].append(await client.request(payloads[(name, roles[name])]))

                async def all_of(worker: procs.Service, walls: dict[str, float] = walls,
                                 started: float = started) -> None:
                    await asyncio.gather(*(one(worker, i) for i in range(CONCURRENCY)))
                    walls[worker.name] = clock() - started

                before = {w.name: (procs.cpu_seconds(w.pid), responses.task_cpu_ns(w.pid)) for w in workers}
                await asyncio.wait_for(asyncio.gather(*(all_of(w) for w in workers)), self.plan.time_limit * 4 + 30)
                for w in workers:
                    stat = procs.cpu_seconds(w.pid) - before[w.name][0]
                    ns = responses.task_cpu_ns(w.pid) - before[w.name][1]
                    ok = sum(r.ok for r in results[w.name])
                    out.append({"turn": turn, "worker": w.name, "model": roles[w.name], "results": results[w.name],
                                "wall": walls[w.name], "cpu": stat, "ns": ns, "ok": ok,
                                "cpu_ms": 1e3 * stat / ok if ok else None, "ns_ms": ns / 1e6 / ok if ok else None})
        finally:
            for clients in conns.values():
                for client in clients:
                    client.close()
        return out

    def cost(self) -> None:
        plan = self.plan
        plain, solo = (self.routes[name] for name in COST_PATHS)
        speeds = self.report.setdefault("speed_index_us", [])
        speeds.append(round(responses.speed_index(), 3))
        found = loadgen.run(lambda: self.paired([plain, solo], plan.c1_count))
        c1: dict[str, Any] = {}
        for route in (plain, solo):
            results, cpu = found["results"][route.name], found["cpu"][route.name]
            lat = [1e3 * r.latency for r in results if r.ok]
            c1[route.name] = {"requests": len(lat), "errors": len(results) - len(lat), "p50": run.pct(lat, 50),
                              "p99": run.pct(lat, 99), "cpu_ms": statistics.fmean(cpu) if cpu else None,
                              "error_kinds": dict(Counter(r.error or f"HTTP {r.status}" for r in results
                                                          if not r.ok))}
        turns = [(m, b, cm, cb) for m, b, cm, cb in zip(found["results"][solo.name], found["results"][plain.name],
                                                        found["cpu"][solo.name], found["cpu"][plain.name],
                                                        strict=False) if m.ok and b.ok]
        c1["pairs"] = len(turns)
        c1["added_latency"] = dict(zip(("median", "low", "high"),
                                       median_interval([1e3 * (m.latency - b.latency) for m, b, _, _ in turns]),
                                       strict=True))
        cpu_diffs = [cm - cb for _, _, cm, cb in turns]
        c1["added_cpu"] = dict(zip(("median", "low", "high"), median_interval(cpu_diffs), strict=True))
        c1["added_cpu"]["mean"], c1["added_cpu"]["se"] = mean_se(cpu_diffs)
        speeds.append(round(responses.speed_index(), 3))

        if not hasattr(self, "twin"):
            self.start_twin()
        rounds = plan.rounds + plan.rounds % 2  # whole pairs of rounds
        segments = loadgen.run(lambda: self.simultaneous(plan.c64_count, rounds))
        c64: dict[str, Any] = {}
        for model, name in ((PLAIN, plain.name), (SOLO, solo.name)):
            mine = [s for s in segments if s["model"] == model]
            stats = run.summarize_async([(s["results"], s["wall"], s["cpu"]) for s in mine], stream=False)
            ok = sum(s["ok"] for s in mine)
            c64[name] = {k: stats[k] for k in ("requests", "errors", "error_kinds", "p50", "p99", "cpu_per_1k")}
            c64[name]["rps"] = statistics.fmean(s["ok"] / s["wall"] for s in mine)  # per worker, while both ran
            c64[name]["cpu_ns_ms"] = sum(s["ns"] for s in mine) / 1e6 / ok if ok else None
        for kind, key in (("stat", "cpu_ms"), ("schedstat", "ns_ms")):
            by_turn: dict[int, dict[str, float]] = {}
            for s in segments:
                by_turn.setdefault(s["turn"], {})[s["model"]] = s[key]
            added = [by_turn[t][SOLO] - by_turn[t][PLAIN] for t in sorted(by_turn)
                     if by_turn[t].get(SOLO) is not None and by_turn[t].get(PLAIN) is not None]
            pairs = [(a + b) / 2 for a, b in zip(added[::2], added[1::2], strict=False)]
            bias = [(a - b) / 2 for a, b in zip(added[::2], added[1::2], strict=False)]  # twin minus first worker
            mean, se = mean_se(pairs)
            c64[f"added_cpu_{kind}"] = {"median": statistics.median(pairs) if pairs else None, "mean": mean, "se": se,
                                        "by_pair": pairs, "by_round": added,
                                        "worker_bias": statistics.fmean(bias) if bias else None}
        c64["added_cpu_pooled"] = responses._sub(c64[solo.name]["cpu_per_1k"], c64[plain.name]["cpu_per_1k"])
        c64["rounds"] = rounds
        speeds.append(round(responses.speed_index(), 3))
        self.report["cost"] = {"c1": c1, "c64": c64, "in_process": self.micro()}
        self.emit_cost()

    def micro(self) -> dict[str, Any]:
        """The router's own time per call in a process of its own (metrics in multiprocess mode, as in a
        worker): ``RouterBackend.chat`` over a backend that answers at once, against that backend alone."""
        directory = self.workdir / "micro-metrics"
        directory.mkdir(exist_ok=True)
        done = subprocess.run([run.PYTHON, "-c", "import bench.resilience as r; r.micro()"], cwd=str(run.ROOT),
                              env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}, capture_output=True,
                              text=True, timeout=300, check=False)
        if done.returncode != 0:
            return {"error": done.stderr[-2000:]}
        found: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return found

    def emit_cost(self) -> None:
        cost = self.report["cost"]
        c1, c64, micro = cost["c1"], cost["c64"], cost["in_process"]
        solo = COST_PATHS[1]
        rows = []
        for name in COST_PATHS:
            s = c1[name]
            mine = name == solo
            rows.append([name, s["p50"], s["p99"], s["cpu_ms"], c1["added_latency"]["median"] if mine else None,
                         c1["added_cpu"]["median"] if mine else None, c1["added_cpu"]["mean"] if mine else None,
                         s["requests"], s["errors"]])
        block = run.table(f"Routing cost, c=1, non-streaming {TOKENS} tokens: {SOLO} (a pool of one: {PLAIN}) against "
                          f"{PLAIN}, interleaved request by request; CPU per request read around each (schedstat)",
                          ["path", "p50 ms", "p99 ms", "CPU ms/req", "added paired p50 ms",
                           "added CPU ms/req, median", "added CPU ms/req, mean", "requests", "errors"], rows)
        lat, cpu = c1["added_latency"], c1["added_cpu"]
        block += (f"\nper-turn differences of {c1['pairs']} turns, medians with 95% intervals: latency "
                  f"{responses._num(lat['median'])} ms ({responses._num(lat['low'])} .. {responses._num(lat['high'])}),"
                  f" CPU {responses._num(cpu['median'])} ms ({responses._num(cpu['low'])} .. "
                  f"{responses._num(cpu['high'])}); CPU mean +- standard error {_pm(cpu['mean'], cpu['se'])} ms")
        self.emit(block)
        rows = []
        for name in COST_PATHS:
            s = c64[name]
            mine = name == solo
            rows.append([name, s["p50"], s["p99"], s["rps"], s["cpu_per_1k"], s["cpu_ns_ms"],
                         c64["added_cpu_pooled"] if mine else None,
                         c64["added_cpu_stat"]["median"] if mine else None,
                         c64["added_cpu_schedstat"]["median"] if mine else None, s["requests"], s["errors"]])
        block = run.table(f"Routing cost, c={CONCURRENCY} on each of two workers at once ({c64['rounds']} rounds, the "
                          "paths swapping workers every round); Helios CPU per request from /proc/<pid>/stat (and "
                          "schedstat); added = per pair of rounds, the worker difference cancelled",
                          ["path", "p50 ms", "p99 ms", "req/s per worker", "CPU ms/req (stat)",
                           "CPU ms/req (schedstat)", "added CPU, pooled", "added CPU, median of pairs (stat)",
                           "added CPU, median of pairs (schedstat)", "requests", "errors"], rows)
        for kind in ("stat", "schedstat"):
            a = c64[f"added_cpu_{kind}"]
            block += (f"\nadded CPU ({kind}) per pair of rounds, mean +- standard error {_pm(a['mean'], a['se'])} ms;"
                      f" the twin worker's own difference {responses._num(a['worker_bias'])} ms; pairs: "
                      + ", ".join(responses._num(v) for v in a["by_pair"]))
        if "error" in micro:
            block += f"\nin-process router timing failed: {micro['error']}"
        else:
            block += (f"\nin process: RouterBackend.chat over a backend answering at once costs "
                      f"{micro['added_us']:.2f} us more per call than that backend alone ({micro['direct_us']:.2f} "
                      f"us); blocks of {micro['calls']:,} calls, median of {len(micro['by_block'])} block differences")
        errors = {f"{n} c=64": c64[n]["error_kinds"] for n in COST_PATHS if c64[n]["errors"]}
        errors.update({f"{n} c=1": c1[n]["error_kinds"] for n in COST_PATHS if c1[n]["errors"]})
        if errors:
            block += f"\nERRORS: {errors}"
        self.emit(block)

    # ---- targets -----------------------------------------------------------------------------------

    def targets(self) -> None:
        rows: list[list[Any]] = []

        def goal(figure: str, value: Any, text: str, ok: Callable[[Any], bool]) -> None:
            rows.append([figure, value, text, _met(None if value is None else ok(value))])

        def info(figure: str, value: Any) -> None:
            rows.append([figure, value, "-", "-"])

        phases = self.report.get("resilience", {}).get("phases", {})
        for key, label in PHASES:
            s = phases.get(key)
            if s is None:
                continue
            goal(f"({key}) {label}: client-visible errors", s["errors"], f"= {ERRORS_GOAL}",
                 lambda v: v <= ERRORS_GOAL)
            if key != "a":
                goal(f"({key}) p99 / healthy p99, after {self.plan.settle:g} s", s["p99_ratio"],
                     f"<= {P99_RATIO_GOAL:g}", lambda v: v <= P99_RATIO_GOAL)
                info(f"({key}) added p99 (ms)", s["added_p99"])
                info(f"({key}) the client's own loop lag, most (ms): a stall of the machine, not of Helios",
                     s["client_lag_max_ms"])
            if key in ("b", "c"):
                most = s["m1_cooldowns_most"]
                goal(f"({key}) m1's cool-downs hold: cool-downs started, at most one per {ROUTING['cooldown']:g} s "
                     "(+1)", s["m1_cooldowns"], f"<= {most}", lambda v, most=most: v <= most)
                info(f"({key}) m1's share of the answers after {self.plan.settle:g} s", s["m1_share_steady"])
            goal(f"({key}) upstream attempts per request, counted at the providers",
                 s["attempts_per_request_providers"], f"<= {ATTEMPTS_GOAL:g}", lambda v: v <= ATTEMPTS_GOAL)
            goal(f"({key}) upstream attempts per request, X-Helios-Attempts (refused connections included)",
                 s["attempts_per_request_headers"], f"<= {ATTEMPTS_GOAL:g}", lambda v: v <= ATTEMPTS_GOAL)
        if "d" in phases:
            d = phases["d"]
            goal("(d) m1 got traffic back (probe after its cool-down)", "yes" if d["m1_back"] else "no", "yes",
                 lambda v: v == "yes")
            info("(d) seconds from m1's restart to its first answer", d["m1_first_answer_after_restart_s"])
        cost = self.report.get("cost")
        if cost:
            c1, c64, micro = cost["c1"], cost["c64"], cost["in_process"]
            goal("routing cost, c=1: added latency, paired p50 (ms)", c1["added_latency"]["median"],
                 f"<= {ADDED_MS_GOAL:g}", lambda v: v <= ADDED_MS_GOAL)
            info("routing cost, c=1: 95% interval of that median (ms)",
                 f"{responses._num(c1['added_latency']['low'])} .. {responses._num(c1['added_latency']['high'])}")
            info("routing cost, c=1: added CPU per request, median of turns (schedstat, ms)",
                 c1["added_cpu"]["median"])
            info("routing cost, c=1: added CPU per request, mean +- standard error (ms)",
                 _pm(c1["added_cpu"]["mean"], c1["added_cpu"]["se"]))
            stat, sched = c64["added_cpu_stat"], c64["added_cpu_schedstat"]
            goal("routing cost, c=64: added Helios CPU per request, /proc/<pid>/stat, median of pairs (ms)",
                 stat["median"], f"<= {ADDED_MS_GOAL:g}", lambda v: v <= ADDED_MS_GOAL)
            info("routing cost, c=64: the same, mean +- standard error (ms)", _pm(stat["mean"], stat["se"]))
            info("routing cost, c=64: per schedstat, median of pairs; mean +- standard error (ms)",
                 f"{responses._num(sched['median'])}; {_pm(sched['mean'], sched['se'])}")
            info("routing cost, c=64: plain model's CPU per request, the base (ms)", c64[COST_PATHS[0]]["cpu_per_1k"])
            if "added_us" in micro:
                goal("routing cost, in process: RouterBackend.chat's own time per call (ms)", micro["added_us"] / 1e3,
                     f"<= {ADDED_MS_GOAL:g}", lambda v: v <= ADDED_MS_GOAL)
            errors = sum(part[name]["errors"] for part in (c1, c64) for name in COST_PATHS)
            goal("routing cost: errors", errors, "= 0", lambda v: v == 0)
        speeds = self.report.get("speed_index_us", [])
        if speeds:
            info("speed index: us per JSON round trip in the client, min / max over the run",
                 f"{min(speeds):.2f} / {max(speeds):.2f}")
        self.report["targets"] = rows
        self.emit(run.table("Targets", ["figure", "measured", "goal", "met"], rows))

    # ---- profiles ----------------------------------------------------------------------------------

    def profile(self) -> None:
        candidates = [Path(run.PYTHON).parent / "py-spy", run.LITELLM_VENV / "bin/py-spy",
                      Path("/tmp/pyspy-venv/bin/py-spy")]
        pyspy = shutil.which("py-spy") or next((str(p) for p in candidates if p.exists()), None)
        if pyspy is None:
            self.emit("\npy-spy not found (pip install py-spy, or put it on PATH): no profiles")
            return
        plan = self.plan
        out: dict[str, Any] = {}
        loads = [(f"{name}, c={CONCURRENCY}", self.routes[name], False, CONCURRENCY) for name in COST_PATHS]
        loads.append((f"{COST_PATHS[1]}, c=1", self.routes[COST_PATHS[1]], False, 1))
        loads.append((f"{POOL}, m1 failing {FAIL_RATE:.0%} with HTTP {FAIL_STATUS}, c={CONCURRENCY}", self.routes[POOL],
                      True, CONCURRENCY))
        m1 = self.providers[M1].port
        for index, (name, route, fault, concurrency) in enumerate(loads):
            raw = self.workdir / f"profile-{index}.txt"
            if fault:
                loadgen.run(functools.partial(http, m1, "POST", "/control/faults",
                                              {"fail_rate": FAIL_RATE, "status": FAIL_STATUS}))
            spy = subprocess.Popen([pyspy, "record", "--pid", str(self.helios.pid), "--duration",
                                    str(int(plan.profile_seconds)), "--rate", "250", "--format", "raw", "--output",
                                    str(raw), "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
            try:
                responses.segment(route, stream=False, tokens=TOKENS, concurrency=concurrency, count=10**6,
                                  time_limit=plan.profile_seconds - 1.5)
            finally:
                if fault:
                    loadgen.run(functools.partial(http, m1, "POST", "/control/faults", {"clear": True}))
            spy.wait(timeout=plan.profile_seconds + 60)
            found: dict[str, Any] = (run.summarize_profile(raw, top=40) if raw.exists()
                                     else {"error": "py-spy produced nothing"})
            found["raw"] = str(raw)
            if raw.exists():
                found["routing"] = routing_share(raw)
            out[name] = found
            self.emit(f"\npy-spy, Helios under load on {name}: {found.get('samples')} samples; "
                      f"routing code: {found.get('routing')}; top self time:")
            self.emit("\n".join(f"  {share:5.1f}%  {frame}" for frame, share in found.get("self", [])[:25]))
            self.emit("top inclusive:")
            self.emit("\n".join(f"  {share:5.1f}%  {frame}" for frame, share in found.get("inclusive", [])[:40]))
        self.report["profile"] = out


def routing_share(raw: Path) -> dict[str, float]:
    """Shares of py-spy samples in app/routing: on its own lines (self) and below its frames (inclusive, the
    member's call included), and in the member's call below the router."""
    total = own = below = member = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        routing = [i for i, f in enumerate(frames) if "app/routing/" in f]
        if not routing:
            continue
        below += count
        if "app/routing/" in frames[-1]:
            own += count
        elif any("backends/remote" in f for f in frames[routing[-1]:]):
            member += count
    if not total:
        return {}
    return {"self %": round(100 * own / total, 2), "inclusive %": round(100 * below / total, 2),
            "member call below the router %": round(100 * member / total, 2),
            "the router's own, callees but the member call included %": round(100 * (below - member) / total, 2)}


def micro(calls: int = 20_000, blocks: int = 12) -> None:
    """Print (JSON) the time per ``chat`` call of a one-member RouterBackend over a backend that answers at once,
    and of that backend alone, in blocks taken in turn; run in a process of its own (``PROMETHEUS_MULTIPROC_DIR``
    set, as in a worker)."""
    from app.backends.base import Backend, CallStats
    from app.protocol import ChatCompletionRequest
    from app.routing.pool import RouterBackend
    from app.settings import RoutingSettings

    body = json.dumps({"model": SOLO, "messages": run.PROMPT, "max_tokens": TOKENS}).encode()
    request = ChatCompletionRequest.model_validate_json(body)
    answer = b"{}"

    class Instant(Backend):
        async def start(self) -> None: ...
        async def close(self) -> None: ...
        def not_ready_reason(self) -> str | None:
            return None

        async def chat(self, request: Any, body: bytes, served_as: str, stats: CallStats) -> bytes:
            stats.prompt_tokens, stats.completion_tokens = 12, TOKENS
            stats.finish_reasons = ["stop"]
            return answer

        async def chat_stream(self, *args: Any) -> Any:
            raise NotImplementedError

        completion = completion_stream = embeddings = chat_stream

    backend = Instant(PLAIN)
    router = RouterBackend(SOLO, [(PLAIN, backend)], [], [], RoutingSettings(**ROUTING))

    async def block(target: Backend, n: int) -> float:
        started = time.perf_counter()
        for _ in range(n):
            await target.chat(request, body, SOLO, CallStats())
        return (time.perf_counter() - started) / n * 1e6

    async def measure() -> dict[str, Any]:
        await block(backend, calls // 4)
        await block(router, calls // 4)
        direct, routed = [], []
        for i in range(blocks):
            for target in (backend, router) if i % 2 == 0 else (router, backend):
                (direct if target is backend else routed).append(await block(target, calls))
        diffs = [r - d for r, d in zip(routed, direct, strict=True)]
        return {"calls": calls, "direct_us": statistics.median(direct), "router_us": statistics.median(routed),
                "added_us": statistics.median(diffs), "by_block": diffs}

    print(json.dumps(asyncio.run(measure())))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short phases and few rounds: about a minute")
    parser.add_argument("--strategy", choices=("priority", "weighted"), default="priority",
                        help="the pool's strategy (weighted: 1:1)")
    parser.add_argument("--profile", action="store_true", help="py-spy the worker under the routing-cost load")
    parser.add_argument("--only", choices=("resilience", "cost"), help="one part only")
    parser.add_argument("--keep-workdir", action="store_true", help="keep configs, logs and profiles (path printed)")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else FULL
    plan = Plan(**base.__dict__)
    mode = "quick" if args.quick else "full"
    run.RESULTS.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="helios-bench-resilience-"))
    began = time.perf_counter()
    bench = ResilienceBench(plan, workdir, mode, args.strategy)
    try:
        bench.start()
        if args.only in (None, "resilience"):
            bench.resilience()
        if args.only in (None, "cost"):
            bench.cost()
        bench.targets()
        if args.profile:
            bench.profile()
    finally:
        bench.stop()
        if args.keep_workdir:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report = bench.report
    report["seconds"] = time.perf_counter() - began
    report["loadavg_after"] = os.getloadavg()
    out = run.RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}-resilience-{mode}.json"
    out.write_text(json.dumps(report, indent=1, default=str))
    out.with_suffix(".md").write_text("\n".join(bench.text) + "\n")
    print(f"\nfinished in {report['seconds']:.0f} s; results: {out.relative_to(run.ROOT)} (and .md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
