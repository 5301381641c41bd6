"""Responses API benchmark: ``POST /v1/responses`` against ``POST /v1/chat/completions`` through one Helios
worker, same upstream model and answer length, in one run.

    .venv/bin/python -m bench.responses [--quick] [--rounds N] [--profile] [--keep-workdir]

Helios serves the provider imitation (``bench/provider.py``) as the remote model ``m`` with
``responses_api = "chat"``, so ``/v1/responses`` is translated onto the Chat Completions path
(``app/responses/translate.py``, ``events.py``, ``service.py``) and both routes make the same upstream call.
Paths, driven by a checking asyncio client on raw sockets:

- ``direct``: chat straight to the provider, for reference (what the client and provider cost alone);
- ``chat``: ``/v1/chat/completions`` through Helios (streaming with ``stream_options.include_usage``, as
  clients do);
- ``responses store:false``: ``/v1/responses``, input a short string, nothing stored;
- ``responses store:true``: the same with ``store`` left at its default (true): the response, its input
  items and, when streamed, its events go into the in-process store (bounded; past the bound each put
  evicts the least recently used, which is part of the steady-state cost).

Scenarios: non-streaming at c=1 and c=64 (16 tokens), streaming at c=1 and c=64 (64 chunks), and the relay
rate: 8 concurrent streams of 20,000 chunks each. Every answer is checked (status 200; the text, usage and
status of the JSON; a chat stream ends with its usage chunk and ``[DONE]`` after the expected number of
events; a Responses stream ends with ``response.completed`` whose text, usage and sequence number match what
was streamed); a wrong answer counts as an error.

How the paths are interleaved, as the machine's speed drifts (2x within a minute on the shared 2-core VM;
the "speed index", a JSON round trip timed in the client before each scenario, shows by how much):

- c=1: request by request, one connection per path, the order reversed every other turn. Helios' CPU per
  request is its on-CPU time (``/proc/<pid>/task/*/schedstat``, nanoseconds) from before the request to 1 ms
  after the answer, and the "paired" added latency is the median of the per-turn differences. These are the
  steadiest figures here.
- c=64 (and the relay): short segments, the order turning every round; Helios' CPU per request is
  utime+stime from ``/proc/<pid>/stat`` over each segment divided by its requests, and the added CPU is the
  median of the per-round differences (the pooled difference and the mean +- standard error are shown too).

The added appliance time of Responses over Chat: the paired p50 latency difference at c=1 and the CPU time per
request at c=64. Target: at most 0.3 ms more per request. Relay target: at least 20,000 Response events/s per
worker to the client (events per Helios CPU second, what the worker could do on a core of its own, is shown
next to it). ``--profile`` adds py-spy profiles of the worker under chat and Responses load (py-spy from PATH,
the venv or LiteLLM's bench venv). Tables are printed and written with the JSON to
``bench/results/<timestamp>-responses-<mode>.json`` (and ``.md``).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/responses.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import loadgen, procs, run

TOKENS = run.NONSTREAM_TOKENS  # non-streaming answer length
STREAM_TOKENS = 64  # streamed answer length in the streaming scenarios
RELAY_TOKENS = 20_000  # chunks of one relay stream
RELAY_STREAMS = 8  # concurrent relay streams
PROVIDER_MAX_TOKENS = RELAY_TOKENS  # the provider imitation's cap on an answer's length
CONCURRENCIES = (1, 64)
INPUT = run.PROMPT[0]["content"]
ADDED_MS_GOAL = 0.3
RELAY_GOAL = 20_000.0
CHAT, NO_STORE, STORE, DIRECT = "chat", "responses store:false", "responses store:true", "direct"
HELIOS_CONFIG = 'responses_api = "chat"\n'  # lands in the [[models]] table of model "m"


@dataclass
class Plan:
    rounds: int  # interleaved segments per path at c=64
    c1_count: int  # non-streaming requests per path at c=1 (interleaved request by request)
    c64_count: int  # ... per path per round at c=64
    stream_c1_count: int
    stream_c64_count: int
    relay_rounds: int
    time_limit: float  # seconds per segment (a slow path gets fewer requests)
    warmup: int
    profile_seconds: float


# Many short segments at c=64: the machine's speed drifts by 2x within a minute, and the per-round differences
# of neighbouring segments see less of that drift than long segments do.
QUICK = Plan(rounds=8, c1_count=250, c64_count=150, stream_c1_count=120, stream_c64_count=64, relay_rounds=1,
             time_limit=5, warmup=200, profile_seconds=6)
FULL = Plan(rounds=16, c1_count=1500, c64_count=250, stream_c1_count=600, stream_c64_count=100, relay_rounds=3,
            time_limit=15, warmup=1000, profile_seconds=12)
SETTLE = 0.001  # seconds after each c=1 answer before Helios' CPU is read: its work after the last byte counts


# ---- checked answers ------------------------------------------------------------------------------

Check = Callable[[bytes, loadgen.Result], str | None]
_KEEP = 1 << 20  # bytes of a stream's end kept for the check (the relay's response.completed is ~180 KB)


def _text(tokens: int, stream: bool) -> str:
    """The provider imitation's answer: "tok0 tok1 ..." whole, " tok0" " tok1" ... streamed."""
    return "".join(f" tok{i}" for i in range(tokens)) if stream else " ".join(f"tok{i}" for i in range(tokens))


def _sse_data(body: bytes, start: int) -> bytes:
    """The payload of the ``data:`` line at or after ``start``."""
    at = body.index(b"data: ", start) + 6
    return body[at:body.index(b"\n\n", at)]


def chat_check(tokens: int, stream: bool) -> Check:
    text = _text(tokens, stream)
    events = tokens + 4  # role chunk, tokens, finish chunk, usage chunk, [DONE]

    def check(body: bytes, result: loadgen.Result) -> str | None:
        if not stream:
            doc = json.loads(body)
            choice = doc["choices"][0]
            if choice["message"]["content"] != text:
                return "wrong text"
            if choice["finish_reason"] != "stop" or doc["usage"]["completion_tokens"] != tokens:
                return "wrong finish_reason or usage"
            return None
        last = body.rfind(b"data: ")
        if body[last:last + 12] != b"data: [DONE]":
            return "stream did not end with [DONE]"
        usage = json.loads(_sse_data(body, body.rfind(b"data: ", 0, last)))
        if usage.get("choices") != [] or (usage.get("usage") or {}).get("completion_tokens") != tokens:
            return "no usage chunk before [DONE]"
        if result.events != events:
            return f"{result.events} events, expected {events}"
        return None

    return check


def responses_check(tokens: int, stream: bool, store: bool) -> Check:
    text = _text(tokens, stream)

    def response_problem(doc: dict[str, Any]) -> str | None:
        if doc.get("object") != "response" or doc.get("status") != "completed":
            return f"status {doc.get('status')!r}"
        if doc["output"][-1]["content"][0]["text"] != text:
            return "wrong text"
        if doc["usage"]["output_tokens"] != tokens or doc["store"] is not store:
            return "wrong usage or store"
        return None

    def check(body: bytes, result: loadgen.Result) -> str | None:
        if not stream:
            return response_problem(json.loads(body))
        last = body.rfind(b"\nevent: ") + 1
        if not last:
            return "no event"
        kind = body[last + 7:body.index(b"\n", last)]
        if kind != b"response.completed":
            return f"last event {kind.decode(errors='replace')}"
        event = json.loads(_sse_data(body, last))
        if event["sequence_number"] != result.events - 1:
            return f"last sequence_number {event['sequence_number']} after {result.events} events"
        return response_problem(event["response"])

    return check


class _Checked(loadgen._Client):
    """The load generator's connection, keeping the end of each answer and checking it when it is whole."""

    def __init__(self, check: Check) -> None:
        self.check = check
        self.keep = bytearray()
        super().__init__(False)

    def _reset(self) -> None:
        super()._reset()
        self.keep = bytearray()

    def data_received(self, data: bytes) -> None:
        if self.result is not None and self.length < 0:  # the head, or a chunked (SSE) body
            keep = self.keep
            keep += data
            if len(keep) > 2 * _KEEP:
                del keep[:-_KEEP]
        super().data_received(data)

    def _finish(self, error: str | None = None) -> None:
        result = self.result
        if result is not None and error is None and 200 <= result.status < 300:
            body = bytes(self.buffer) if self.length >= 0 else bytes(self.keep)
            try:
                error = self.check(body, result)
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                error = f"unreadable answer ({type(exc).__name__})"
        super()._finish(error)


async def closed_loop(port: int, payload: bytes, check: Check, *, concurrency: int, count: int,
                      time_limit: float) -> tuple[list[loadgen.Result], float]:
    """``loadgen.closed_loop`` with checked answers: ``count`` requests over ``concurrency`` connections."""
    loop = asyncio.get_running_loop()
    clock = time.perf_counter
    remaining = count
    results: list[loadgen.Result] = []
    deadline = clock() + time_limit

    async def worker() -> None:
        nonlocal remaining
        client: _Checked | None = None
        try:
            while remaining > 0 and clock() < deadline:
                remaining -= 1
                if client is None or client.closed:
                    _, client = await loop.create_connection(lambda: _Checked(check), "127.0.0.1", port)
                results.append(await client.request(payload))
        except OSError as exc:
            results.append(loadgen.Result(start=clock(), end=clock(), error=type(exc).__name__))
        finally:
            if client is not None:
                client.close()

    started = clock()
    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=time_limit + 30)
    except TimeoutError:
        for task in tasks:
            task.cancel()
    return results, clock() - started


def task_cpu_ns(pid: int) -> int:
    """On-CPU nanoseconds of every thread of ``pid`` (``/proc/<pid>/task/*/schedstat``): exact, unlike the
    10 ms ticks of utime+stime, so it can be read around one request."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as stat:
                total += int(stat.read().split(None, 1)[0])
        except (OSError, ValueError):
            continue  # a thread that ended meanwhile
    return total


async def paired(routes: list[Route], *, stream: bool, tokens: int, count: int,
                 time_limit: float) -> dict[str, Segment]:
    """c=1, interleaved request by request: one connection per path, one request on each in turn (the order
    reversed every other turn), so every path sees the same machine from moment to moment. The CPU of each
    request is the serving process' on-CPU time from before it is sent to ``SETTLE`` after it is answered."""
    loop = asyncio.get_running_loop()
    clock = time.perf_counter
    payloads = {r.name: r.payload(stream=stream, tokens=tokens) for r in routes}
    checks = {r.name: r.check(stream=stream, tokens=tokens) for r in routes}
    clients: dict[str, _Checked] = {}
    results: dict[str, list[loadgen.Result]] = {r.name: [] for r in routes}
    cpu = dict.fromkeys(payloads, 0)
    wall = dict.fromkeys(payloads, 0.0)
    client_cpu = dict.fromkeys(payloads, 0.0)
    deadline = clock() + time_limit
    try:
        for turn in range(count):
            if clock() > deadline:
                break
            for route in routes if turn % 2 == 0 else routes[::-1]:
                name = route.name
                client = clients.get(name)
                if client is None or client.closed:
                    _, client = await loop.create_connection(functools.partial(_Checked, checks[name]),
                                                             "127.0.0.1", route.port)
                    clients[name] = client
                own = time.process_time()
                before = task_cpu_ns(route.pid)
                result = await client.request(payloads[name])
                await asyncio.sleep(SETTLE)
                cpu[name] += task_cpu_ns(route.pid) - before
                client_cpu[name] += time.process_time() - own
                wall[name] += result.latency
                results[name].append(result)
    finally:
        for client in clients.values():
            client.close()
    return {name: (results[name], wall[name], cpu[name] / 1e9, client_cpu[name]) for name in results}


def speed_index(calls: int = 20_000) -> float:
    """Microseconds per JSON round trip of a small Response-like document in this process: how fast the
    machine is right now (it drifts), to compare runs by."""
    doc = {"id": "resp_0", "object": "response", "status": "completed", "output": [
        {"type": "message", "content": [{"type": "output_text", "text": " ".join(f"tok{i}" for i in range(16))}]}],
        "usage": {"input_tokens": 12, "output_tokens": 16, "total_tokens": 28}}
    started = time.perf_counter()
    for _ in range(calls):
        json.loads(json.dumps(doc))
    return (time.perf_counter() - started) / calls * 1e6


# ---- paths ----------------------------------------------------------------------------------------


@dataclass
class Route(run.Target):
    """A path: Chat Completions (to Helios or the provider) or Responses (``store`` None: left out)."""

    responses: bool = False
    store: bool | None = None

    @property
    def path(self) -> str:
        return "/v1/responses" if self.responses else "/v1/chat/completions"

    def body(self, *, stream: bool, tokens: int) -> bytes:
        doc: dict[str, Any]
        if self.responses:
            doc = {"model": self.model, "input": INPUT, "max_output_tokens": tokens}
            if self.store is not None:
                doc["store"] = self.store
            if stream:
                doc["stream"] = True
        else:
            doc = {"model": self.model, "messages": run.PROMPT, "max_tokens": tokens}
            if stream:
                doc.update(stream=True, stream_options={"include_usage": True})
        return json.dumps(doc).encode()

    def payload(self, *, stream: bool, tokens: int) -> bytes:
        return loadgen.http_request("127.0.0.1", self.port, self.path, self.body(stream=stream, tokens=tokens))

    def check(self, *, stream: bool, tokens: int) -> Check:
        if self.responses:
            return responses_check(tokens, stream, self.store is not False)
        return chat_check(tokens, stream)


Segment = tuple[list[loadgen.Result], float, float, float]  # results, wall s, Helios (or provider) CPU s, client CPU s


def segment(route: Route, *, stream: bool, tokens: int, concurrency: int, count: int,
            time_limit: float) -> Segment:
    payload = route.payload(stream=stream, tokens=tokens)
    check = route.check(stream=stream, tokens=tokens)
    client0 = time.process_time()
    results, wall, cpu = run.run_async(route, lambda: closed_loop(
        route.port, payload, check, concurrency=concurrency, count=count, time_limit=time_limit))
    return results, wall, cpu, time.process_time() - client0


def summarize(segments: list[Segment], *, stream: bool) -> dict[str, Any]:
    stats = run.summarize_async([(r, w, c) for r, w, c, _ in segments], stream=stream)
    wall = sum(s[1] for s in segments)
    stats["cpu_cores"] = sum(s[2] for s in segments) / wall if wall else None  # busy share of one core
    stats["client_cpu_cores"] = sum(s[3] for s in segments) / wall if wall else None
    stats["seconds"] = wall
    return stats


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _per_event(ms_per_request: float | None, stats: dict[str, Any]) -> float | None:
    events = stats.get("events_per_response")
    return None if ms_per_request is None or not events else 1e3 * ms_per_request / events


def _pm(mean: float | None, error: float | None) -> str:
    return "-" if mean is None else f"{mean:.2f} +- {_num(error, 2)}"


def _met(value: float | None, ok: bool) -> str:
    return "-" if value is None else ("yes" if ok else "NO")


# ---- the run --------------------------------------------------------------------------------------


class ResponsesBench:
    def __init__(self, plan: Plan, workdir: Path, mode: str) -> None:
        self.plan = plan
        self.workdir = workdir
        self.services: list[procs.Service] = []
        self.routes: dict[str, Route] = {}
        self.text: list[str] = []
        self.report: dict[str, Any] = {"mode": mode, "plan": plan.__dict__,
                                       "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "commit": run.git_commit(),
                                       "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(),
                                       "tokens": {"nonstream": TOKENS, "stream": STREAM_TOKENS,
                                                  "relay": RELAY_TOKENS, "relay_streams": RELAY_STREAMS},
                                       "scenarios": {}}

    def emit(self, block: str) -> None:
        if not self.text:
            block = (f"Helios commit {self.report['commit']}; {os.cpu_count()} CPUs; load average before "
                     f"{self.report['loadavg_before'][0]:.2f}. Client, provider imitation and Helios (one worker) "
                     "share these CPUs: latencies are noisy, CPU per request much less so.\n") + block
        print(block, flush=True)
        self.text.append(block)

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()

    def start(self) -> None:
        port = procs.free_port()
        imitation = procs.Service("provider", [run.PYTHON, "-m", "bench.provider", "--port", str(port),
                                               "--tokens", str(TOKENS), "--max-tokens", str(PROVIDER_MAX_TOKENS)],
                                  port, "/health", cwd=str(run.ROOT), log_path=self.workdir / "provider.log")
        imitation.start()
        self.services.append(imitation)
        helios = run.helios_service(self.workdir, imitation.port, 1, extra_config=HELIOS_CONFIG)
        helios.start()
        self.services.append(helios)
        self.helios = helios
        self.routes = {
            DIRECT: Route(DIRECT, imitation.port, "gpt-4o", imitation, imitation.pid),
            CHAT: Route(CHAT, helios.port, "m", helios, helios.pid),
            NO_STORE: Route(NO_STORE, helios.port, "m", helios, helios.pid, responses=True, store=False),
            STORE: Route(STORE, helios.port, "m", helios, helios.pid, responses=True),
        }
        rss_start = procs.rss_bytes(helios.pid)
        for route in self.routes.values():
            self.warm(route)
        self.report["helios"] = {"startup_s": helios.startup_seconds, "rss_after_start_mb": rss_start / run.MB,
                                 "rss_after_warmup_mb": procs.rss_bytes(helios.pid) / run.MB}

    def warm(self, route: Route) -> None:
        count = self.plan.warmup
        for stream, tokens, n in ((False, TOKENS, count), (True, STREAM_TOKENS, max(8, count // 4)),
                                  (True, RELAY_TOKENS, 2)):
            results = segment(route, stream=stream, tokens=tokens, concurrency=min(8, n), count=n, time_limit=60)[0]
            bad = [r for r in results if not r.ok]
            if bad or len(results) < n:
                first = bad[0] if bad else None
                raise RuntimeError(f"{route.name}: warm-up failed ({'stream' if stream else 'non-stream'}, "
                                   f"{tokens} tokens): {len(bad)} bad of {len(results)}"
                                   + (f", first: HTTP {first.status} {first.error}" if first else ""))

    # ---- scenarios ---------------------------------------------------------------------------------

    def run_paths(self, *, stream: bool, tokens: int, concurrency: int, count: int,
                  rounds: int) -> dict[str, dict[str, Any]]:
        self.speed()
        if concurrency == 1:
            found = loadgen.run(lambda: paired(list(self.routes.values()), stream=stream, tokens=tokens, count=count,
                                               time_limit=self.plan.time_limit * 4))
            stats = {name: summarize([one], stream=stream) for name, one in found.items()}
            for s in stats.values():
                s["cpu_cores"] = s["client_cpu_cores"] = None  # no wall time of its own: the paths took turns
            chat = found[CHAT][0]
            for name in (NO_STORE, STORE):
                pairs = [(mine, base) for mine, base in zip(found[name][0], chat, strict=False) if mine.ok and base.ok]
                stats[name]["paired_added_p50"] = 1e3 * statistics.median(
                    m.latency - b.latency for m, b in pairs) if pairs else None
                if stream:
                    stats[name]["paired_added_ttft_p50"] = 1e3 * statistics.median(
                        (m.first_event - m.start) - (b.first_event - b.start) for m, b in pairs) if pairs else None
            return stats
        # At c=64 the direct path only measures the client, which other tables show is not the limit.
        routes = [r for r in self.routes.values() if r.name != DIRECT or concurrency <= RELAY_STREAMS]
        # The order turns every round (A B C, B C A, C A B, ...), so a machine that speeds up or slows down
        # over the run favours no path; each round's CPU per request is kept for the per-round differences.
        runs: dict[str, list[Segment]] = {r.name: [] for r in routes}
        for turn in range(rounds):
            shift = turn % len(routes)
            for route in routes[shift:] + routes[:shift]:
                runs[route.name].append(segment(route, stream=stream, tokens=tokens, concurrency=concurrency,
                                                count=count, time_limit=self.plan.time_limit))
        out = {}
        for name, segments in runs.items():
            out[name] = summarize(segments, stream=stream)
            out[name]["cpu_ms_per_request_by_round"] = [
                1e3 * cpu / ok if (ok := sum(r.ok for r in results)) else None for results, _, cpu, _ in segments]
        return out

    def speed(self) -> None:
        self.report.setdefault("speed_index_us", []).append(round(speed_index(), 3))

    def added(self, stats: dict[str, dict[str, Any]], keys: tuple[str, ...]) -> dict[str, dict[str, Any]]:
        """Each Responses path's figures minus chat's (and the paired differences at c=1; the CPU ratio)."""
        chat = stats[CHAT]
        out: dict[str, dict[str, Any]] = {}
        for name in (NO_STORE, STORE):
            mine = stats[name]
            out[name] = {key: _sub(mine.get(key), chat.get(key)) for key in keys}
            out[name]["cpu_ratio"] = run.ratio(mine.get("cpu_per_1k"), chat.get("cpu_per_1k"))
            for key in ("paired_added_p50", "paired_added_ttft_p50"):
                if key in mine:
                    out[name][key] = mine[key]
            rounds = [m - c for m, c in zip(mine.get("cpu_ms_per_request_by_round") or (),
                                            chat.get("cpu_ms_per_request_by_round") or (), strict=False)
                      if m is not None and c is not None]
            if rounds:
                out[name]["cpu_by_round"] = rounds
                out[name]["paired_cpu"] = statistics.median(rounds)
                out[name]["cpu_by_round_mean"] = statistics.fmean(rounds)
                out[name]["cpu_by_round_se"] = (statistics.stdev(rounds) / len(rounds) ** 0.5
                                                if len(rounds) > 1 else None)
        return out

    def _how(self, concurrency: int) -> str:
        if concurrency == 1:
            return ("concurrency 1, the paths interleaved request by request; CPU per request read around each "
                    "request (schedstat)")
        return f"concurrency {concurrency}, the paths interleaved segment by segment ({self.plan.rounds} each)"

    def nonstream(self, concurrency: int) -> None:
        plan = self.plan
        count = plan.c1_count if concurrency == 1 else plan.c64_count
        stats = self.run_paths(stream=False, tokens=TOKENS, concurrency=concurrency, count=count, rounds=plan.rounds)
        added = self.added(stats, ("p50", "p99", "cpu_per_1k"))
        key = f"nonstream_c{concurrency}"
        self.report["scenarios"][key] = {**stats, "added_over_chat": added}
        rows = []
        for name, s in stats.items():
            a = added.get(name, {})
            rows.append([name, s["p50"], s["p99"], s["rps"], s["cpu_per_1k"], a.get("p50"), a.get("paired_added_p50"),
                         a.get("p99"), a.get("cpu_per_1k"), a.get("paired_cpu"), a.get("cpu_ratio"), s["cpu_cores"],
                         s["requests"], s["errors"]])
        block = run.table(f"Non-streaming, {TOKENS} tokens, {self._how(concurrency)}; added = Responses minus chat "
                          "through the same Helios worker (direct: chat straight to the provider)",
                          ["path", "p50 ms", "p99 ms", "req/s", "CPU ms/req", "added p50 ms", "added paired p50 ms",
                           "added p99 ms", "added CPU ms/req", "added CPU, median of rounds", "CPU / chat's",
                           "CPU cores", "requests", "errors"], rows)
        block += self._notes(stats)
        self.emit(block)

    def streaming(self, concurrency: int) -> None:
        plan = self.plan
        count = plan.stream_c1_count if concurrency == 1 else plan.stream_c64_count
        stats = self.run_paths(stream=True, tokens=STREAM_TOKENS, concurrency=concurrency, count=count,
                               rounds=plan.rounds)
        added = self.added(stats, ("ttft_p50", "ttft_p99", "p50", "p99", "cpu_per_1k"))
        key = f"stream_c{concurrency}"
        self.report["scenarios"][key] = {**stats, "added_over_chat": added}
        rows = []
        for name, s in stats.items():
            a = added.get(name, {})
            rows.append([name, s["ttft_p50"], s["ttft_p99"], s["p50"], s["p99"], s["rps"], s["events_per_response"],
                         s["cpu_per_1k"], a.get("ttft_p50"), a.get("paired_added_ttft_p50"), a.get("p50"),
                         a.get("paired_added_p50"), a.get("cpu_per_1k"), a.get("paired_cpu"), a.get("cpu_ratio"),
                         s["cpu_cores"], s["requests"], s["errors"]])
        block = run.table(f"Streaming, {STREAM_TOKENS} chunks, {self._how(concurrency)}: time to the first event "
                          "(TTFE) and to the whole response",
                          ["path", "TTFE p50 ms", "TTFE p99 ms", "total p50 ms", "total p99 ms", "req/s",
                           "events/resp", "CPU ms/req", "added TTFE p50", "added paired TTFE p50", "added total p50",
                           "added paired total p50", "added CPU ms/req", "added CPU, median of rounds",
                           "CPU / chat's", "CPU cores", "requests", "errors"], rows)
        block += self._notes(stats)
        self.emit(block)

    def relay(self) -> None:
        plan = self.plan
        stats = self.run_paths(stream=True, tokens=RELAY_TOKENS, concurrency=RELAY_STREAMS, count=RELAY_STREAMS,
                               rounds=plan.relay_rounds)
        for s in stats.values():
            cpu_per_event = (s["cpu_per_1k_events"] or 0) / 1000  # CPU s per event
            s["cpu_us_per_event"] = cpu_per_event * 1e6 if cpu_per_event else None
            s["events_per_cpu_s"] = 1 / cpu_per_event if cpu_per_event else None
        self.report["scenarios"]["relay"] = stats
        rows = [[name, s["events_per_s"], s["events_per_cpu_s"], s["cpu_us_per_event"], s["cpu_cores"],
                 s["client_cpu_cores"], s["events_per_response"], s["ttft_p50"], s["p50"], s["requests"], s["errors"]]
                for name, s in stats.items()]
        block = run.table(f"Relay: {RELAY_STREAMS} concurrent streams of {RELAY_TOKENS:,} chunks, one worker "
                          "(events/s counted by the client; events per CPU second is what a worker could do on a "
                          "core of its own)",
                          ["path", "events/s", "events/CPU s", "CPU us/event", "CPU cores", "client cores",
                           "events/resp", "TTFE p50 ms", "stream p50 ms", "streams", "errors"], rows)
        chat = stats[CHAT]
        for name in (NO_STORE, STORE):
            mine = stats[name]
            block += (f"\n{name}/chat: events/s {_num(run.ratio(mine['events_per_s'], chat['events_per_s']), 2)}x, "
                      f"CPU per event {_num(run.ratio(mine['cpu_us_per_event'], chat['cpu_us_per_event']), 2)}x")
        block += self._notes(stats)
        self.emit(block)

    def _notes(self, stats: dict[str, dict[str, Any]]) -> str:
        text = ("\nCPU: Helios' process (the provider's for direct), per request; CPU cores: that process' busy share "
                "of one core; the client used "
                + ", ".join(f"{name} {_num(s['client_cpu_cores'], 2)}" for name, s in stats.items()) + " cores")
        errors = {name: s["error_kinds"] for name, s in stats.items() if s["errors"]}
        if errors:
            text += f"\nERRORS: {errors}"
        return text

    def targets(self) -> None:
        sc = self.report["scenarios"]
        rows: list[list[Any]] = []

        def goal(figure: str, value: float | None, text: str, ok: Callable[[float], bool]) -> None:
            rows.append([figure, value, text, _met(value, value is not None and ok(value))])

        def info(figure: str, value: Any) -> None:
            rows.append([figure, value, "-", "-"])

        c1 = sc.get("nonstream_c1", {}).get("added_over_chat", {})
        c64 = sc.get("nonstream_c64", {}).get("added_over_chat", {})
        within = f"<= {ADDED_MS_GOAL}"
        for name in (NO_STORE, STORE):
            if name in c1:
                goal(f"non-stream c=1, {name}: added latency, paired p50 (ms)", c1[name].get("paired_added_p50"),
                     within, lambda v: v <= ADDED_MS_GOAL)
                info(f"non-stream c=1, {name}: p50 minus chat's p50 (ms)", c1[name]["p50"])
                info(f"non-stream c=1, {name}: added CPU per request (ms)", c1[name]["cpu_per_1k"])
            if name in c64:
                goal(f"non-stream c=64, {name}: added CPU per request, median of rounds (ms)",
                     c64[name].get("paired_cpu"), within, lambda v: v <= ADDED_MS_GOAL)
                info(f"non-stream c=64, {name}: added CPU per request, all rounds pooled (ms)",
                     c64[name]["cpu_per_1k"])
                info(f"non-stream c=64, {name}: per-round differences, mean +- standard error (ms)",
                     _pm(c64[name].get("cpu_by_round_mean"), c64[name].get("cpu_by_round_se")))
                info(f"non-stream c=64, {name}: CPU per request / chat's", c64[name]["cpu_ratio"])
        if CHAT in sc.get("nonstream_c64", {}):
            info("non-stream c=64, chat: CPU per request (ms), the base", sc["nonstream_c64"][CHAT]["cpu_per_1k"])
        for key in ("stream_c1", "stream_c64"):
            added = sc.get(key, {}).get("added_over_chat", {})
            for name in (NO_STORE, STORE):
                if name not in added:
                    continue
                if key == "stream_c1":
                    info(f"stream c=1, {name}: added TTFE, paired p50 (ms)", added[name].get("paired_added_ttft_p50"))
                    info(f"stream c=1, {name}: added total, paired p50 (ms)", added[name].get("paired_added_p50"))
                    info(f"stream c=1, {name}: added CPU per request (ms)", added[name]["cpu_per_1k"])
                else:
                    info(f"stream c=64, {name}: added CPU per request, median of rounds (ms)",
                         added[name].get("paired_cpu"))
                    info(f"stream c=64, {name}: added CPU per event (us)",
                         _per_event(added[name].get("paired_cpu"), sc[key][name]))
        relay = sc.get("relay", {})
        for name in (NO_STORE, STORE):
            if name in relay:
                goal(f"relay, {name}: events/s to the client, 1 worker", relay[name]["events_per_s"],
                     f">= {RELAY_GOAL:,.0f}", lambda v: v >= RELAY_GOAL)
                info(f"relay, {name}: events per Helios CPU second", relay[name]["events_per_cpu_s"])
        if CHAT in relay:
            info("relay, chat: chunks/s to the client, 1 worker", relay[CHAT]["events_per_s"])
            info("relay, chat: chunks per Helios CPU second", relay[CHAT]["events_per_cpu_s"])
        errors = sum(s["errors"] for scenario in sc.values() for name, s in scenario.items() if name in self.routes)
        rows.append(["errors (all scenarios)", errors, "0", "yes" if errors == 0 else "NO"])
        speeds = self.report.get("speed_index_us", [])
        if speeds:
            info("speed index: us per JSON round trip in the client, min / max over the run",
                 f"{min(speeds):.2f} / {max(speeds):.2f}")
        self.report["targets"] = rows
        self.emit(run.table("Targets (Responses over Chat, one Helios worker)", ["figure", "measured", "goal", "met"],
                            rows))

    # ---- profiles ----------------------------------------------------------------------------------

    def profile(self) -> None:
        pyspy = (shutil.which("py-spy") or next((str(p) for p in (Path(run.PYTHON).parent / "py-spy",
                                                                  run.LITELLM_VENV / "bin/py-spy") if p.exists()),
                                                None))
        if pyspy is None:
            self.emit("\npy-spy not found (pip install py-spy, or put it on PATH): no profiles")
            return
        plan = self.plan
        loads: list[tuple[str, Route, bool, int, int]] = [
            ("chat, non-streaming c=64", self.routes[CHAT], False, TOKENS, 64),
            ("responses store:true, non-streaming c=64", self.routes[STORE], False, TOKENS, 64),
            ("chat relay", self.routes[CHAT], True, RELAY_TOKENS, RELAY_STREAMS),
            ("responses store:false relay", self.routes[NO_STORE], True, RELAY_TOKENS, RELAY_STREAMS),
            ("responses store:true relay", self.routes[STORE], True, RELAY_TOKENS, RELAY_STREAMS),
        ]
        out: dict[str, Any] = {}
        for label, route, stream, tokens, concurrency in loads:
            raw = self.workdir / f"profile-{label.replace(' ', '_').replace(',', '').replace(':', '')}.txt"
            spy = subprocess.Popen([pyspy, "record", "--pid", str(self.helios.pid), "--duration",
                                    str(int(plan.profile_seconds)), "--rate", "250", "--format", "raw", "--output",
                                    str(raw), "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
            segment(route, stream=stream, tokens=tokens, concurrency=concurrency, count=10**6,
                    time_limit=plan.profile_seconds - 1.5)
            spy.wait(timeout=plan.profile_seconds + 60)
            found: dict[str, Any] = (run.summarize_profile(raw, top=40) if raw.exists()
                                     else {"error": "py-spy produced nothing"})
            found["raw"] = str(raw)
            out[label] = found
            self.emit(f"\npy-spy, Helios under {label}: {found.get('samples')} samples; top self time:")
            self.emit("\n".join(f"  {share:5.1f}%  {name}" for name, share in found.get("self", [])[:25]))
            self.emit("top inclusive:")
            self.emit("\n".join(f"  {share:5.1f}%  {name}" for name, share in found.get("inclusive", [])[:40]))
        self.report["profile"] = out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small counts: about a minute")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per scenario (the relay's too)")
    parser.add_argument("--profile", action="store_true", help="py-spy the worker under chat and Responses load")
    parser.add_argument("--profile-only", action="store_true", help="only the profiles, no scenarios")
    parser.add_argument("--keep-workdir", action="store_true", help="keep configs, logs and profiles (path printed)")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else FULL
    plan = Plan(**{**base.__dict__, **({"rounds": args.rounds, "relay_rounds": args.rounds} if args.rounds else {})})
    mode = "quick" if args.quick else "full"
    run.RESULTS.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="helios-bench-responses-"))
    began = time.perf_counter()
    bench = ResponsesBench(plan, workdir, mode)
    try:
        bench.start()
        if not args.profile_only:
            for concurrency in CONCURRENCIES:
                bench.nonstream(concurrency)
            for concurrency in CONCURRENCIES:
                bench.streaming(concurrency)
            bench.relay()
            bench.report["helios"]["rss_at_end_mb"] = procs.rss_bytes(bench.helios.pid) / run.MB
            bench.targets()
        if args.profile or args.profile_only:
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
    out = run.RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}-responses-{mode}.json"
    out.write_text(json.dumps(report, indent=1, default=str))
    out.with_suffix(".md").write_text("\n".join(bench.text) + "\n")
    print(f"\nfinished in {report['seconds']:.0f} s; results: {out.relative_to(run.ROOT)} (and .md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
