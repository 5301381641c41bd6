"""Held streams: 1,000 concurrent streams open through one Helios worker against a slow provider, and the
appliance's memory per open stream.

    .venv/bin/python -m bench.held_streams [--quick] [--streams N] [--keep-workdir]

The provider imitation (``bench/provider.py --delay 0.1``) sends one chunk every 100 ms: 600 chunks (a minute)
per stream, 300 (thirty seconds) with ``--quick``. The client, raw asyncio streams on uvloop, opens every stream at
once and checks each one: status 200, every chunk's text in order, the finish chunk and ``[DONE]`` last.

Memory per open stream: Helios' RSS with every stream open (the highest of samples taken once all are open,
before the first ends) minus its RSS idle after a warm-up (a hundred concurrent short streams, so the code paths,
the provider connection pool and the allocator are warm), divided by the streams. Target: at most 50 KB per
stream. Also shown: Helios' CPU while holding them (chunks relayed per CPU second) and the open-files limit it
ran with. Results: ``bench/results/<timestamp>-held-streams-<mode>.json`` (and ``.md``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/held_streams.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.server import raise_open_files_limit
from bench import loadgen, procs, run

DELAY = 0.1  # seconds between chunks
GOAL_KB = 50.0
WARMUP_STREAMS = 100
WARMUP_TOKENS = 3
_END = b"\r\n0\r\n\r\n"
_CONTENT = re.compile(rb'"content":"( tok\d+)"')


@dataclass
class Plan:
    streams: int
    tokens: int  # chunks of text per stream: tokens * DELAY seconds


# Opening a thousand streams takes the worker several seconds on a shared 2-core machine (it relays the open
# ones meanwhile): quick streams last long enough for a window with all of them open.
QUICK = Plan(streams=1000, tokens=300)
FULL = Plan(streams=1000, tokens=600)


@dataclass
class Hold:
    """What the client saw of all the streams."""

    open: int = 0
    peak: int = 0
    all_open: asyncio.Event = field(default_factory=asyncio.Event)
    first_end: asyncio.Event = field(default_factory=asyncio.Event)
    errors: list[str] = field(default_factory=list)
    chunks: int = 0


def _request(port: int, tokens: int) -> bytes:
    body = json.dumps({"model": "m", "messages": run.PROMPT, "max_tokens": tokens, "stream": True}).encode()
    return loadgen.http_request("127.0.0.1", port, "/v1/chat/completions", body)


def _check(raw: bytes, tokens: int) -> str | None:
    """What is wrong with one whole chunked SSE body, or None."""
    texts = _CONTENT.findall(raw)
    if texts != [f" tok{i}".encode() for i in range(tokens)]:
        return f"{len(texts)} text chunks of {tokens}, or out of order"
    if b'"finish_reason":"stop"' not in raw:
        return "no finish chunk"
    if not raw.endswith(b"data: [DONE]\n\n" + _END):
        return "does not end with [DONE]"
    return None


async def _stream(port: int, request: bytes, tokens: int, hold: Hold, total: int) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        hold.errors.append(f"connect: {exc!r}")
        return
    try:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200 "):
            hold.errors.append(f"answered {head[:40]!r}")
            return
        hold.open += 1
        hold.peak = max(hold.peak, hold.open)
        if hold.peak >= total:
            hold.all_open.set()
        raw = bytearray()
        try:
            while not raw.endswith(_END):
                data = await reader.read(65536)
                if not data:
                    hold.errors.append(f"closed after {len(raw)} bytes")
                    return
                raw += data
        finally:
            hold.open -= 1
            hold.first_end.set()
        problem = _check(bytes(raw), tokens)
        if problem is not None:
            hold.errors.append(problem)
        else:
            hold.chunks += tokens
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        hold.errors.append(repr(exc))
    finally:
        writer.close()


async def _hold(port: int, pid: int, plan: Plan) -> dict[str, Any]:
    hold = Hold()
    request = _request(port, plan.tokens)
    started = time.perf_counter()
    cpu0 = procs.cpu_seconds(pid)
    tasks = [asyncio.create_task(_stream(port, request, plan.tokens, hold, plan.streams))
             for _ in range(plan.streams)]
    samples: list[int] = []
    opened_in = None
    done = asyncio.ensure_future(asyncio.gather(*tasks))
    try:
        await asyncio.wait_for(asyncio.shield(hold.all_open.wait()), timeout=plan.tokens * DELAY)
        opened_in = time.perf_counter() - started
        # Sample while every stream is open: until the first one ends (or the last tenth of a stream's life).
        stop = started + plan.tokens * DELAY * 0.9
        while not hold.first_end.is_set() and time.perf_counter() < stop:
            samples.append(procs.rss_bytes(pid))
            await asyncio.sleep(0.25)
    except TimeoutError:
        pass
    await asyncio.wait_for(done, timeout=plan.tokens * DELAY + 120)
    wall = time.perf_counter() - started
    cpu = procs.cpu_seconds(pid) - cpu0
    return {"peak_open": hold.peak, "opened_in_s": opened_in, "errors": len(hold.errors),
            "error_examples": hold.errors[:5], "chunks_checked": hold.chunks, "wall_s": wall,
            "helios_cpu_s": cpu, "rss_open_samples": samples, "rss_open_bytes": max(samples, default=None)}


async def _warm_up(port: int) -> None:
    hold = Hold()
    request = _request(port, WARMUP_TOKENS)
    await asyncio.gather(*(_stream(port, request, WARMUP_TOKENS, hold, WARMUP_STREAMS)
                           for _ in range(WARMUP_STREAMS)))
    if hold.errors:
        raise RuntimeError(f"warm-up streams failed: {hold.errors[:3]}")


def _open_files_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return " / ".join(line.split()[3:5])  # soft / hard
    return "?"


def measure(plan: Plan, workdir: Path) -> dict[str, Any]:
    limit = raise_open_files_limit()
    if limit != resource.RLIM_INFINITY and limit < plan.streams + 512:
        raise SystemExit(f"the open-files limit ({limit}) is too low for {plan.streams} streams")
    services: list[procs.Service] = []
    try:
        port = procs.free_port()
        provider = procs.Service("provider", [run.PYTHON, "-m", "bench.provider", "--port", str(port),
                                              "--tokens", str(plan.tokens), "--delay", str(DELAY)],
                                 port, "/health", cwd=str(run.ROOT), log_path=workdir / "provider.log")
        provider.start()
        services.append(provider)
        helios = run.helios_service(workdir, port, 1, extra_config="timeout = 600\n")
        helios.start()
        services.append(helios)
        loadgen.run(lambda: _warm_up(helios.port))
        time.sleep(1.0)
        idle = procs.rss_bytes(helios.pid)
        result = loadgen.run(lambda: _hold(helios.port, helios.pid, plan))
        result["rss_idle_bytes"] = idle
        result["rss_at_end_bytes"] = procs.rss_bytes(helios.pid)
        result["helios_open_files_limit"] = _open_files_limit(helios.pid)
        result["helios_alive"] = helios.proc is not None and helios.proc.poll() is None
        return result
    finally:
        for service in reversed(services):
            service.stop()


def report(plan: Plan, result: dict[str, Any], mode: str) -> tuple[dict[str, Any], str]:
    open_rss = result["rss_open_bytes"]
    per_stream_kb = None if open_rss is None else (open_rss - result["rss_idle_bytes"]) / plan.streams / 1024
    chunks = plan.streams * plan.tokens
    ok = (result["errors"] == 0 and result["peak_open"] == plan.streams and result["chunks_checked"] == chunks
          and result["helios_alive"])
    full = {"mode": mode, "plan": plan.__dict__, "delay_s": DELAY, "commit": run.git_commit(),
            "cpus": os.cpu_count(), "loadavg": os.getloadavg(), **result,
            "rss_per_open_stream_kb": per_stream_kb, "goal_kb": GOAL_KB, "all_streams_ok": ok}
    mb = run.MB
    lines = [
        f"Held streams ({mode}): {plan.streams} concurrent streams through one Helios worker, a chunk every "
        f"{DELAY * 1000:.0f} ms for {plan.tokens * DELAY:.0f} s each (commit {full['commit']}, {os.cpu_count()} "
        f"CPUs, load {full['loadavg'][0]:.2f}).",
        "",
        "| figure | value |",
        "|---|---|",
        f"| streams open at once | {result['peak_open']} of {plan.streams} "
        f"(all open {_num(result['opened_in_s'], 1)} s after the first was sent) |",
        f"| streams with every chunk in order, finish and [DONE] | "
        f"{result['chunks_checked'] // plan.tokens} of {plan.streams}; errors {result['errors']} |",
        f"| Helios RSS idle after warm-up | {result['rss_idle_bytes'] / mb:.1f} MB |",
        f"| Helios RSS with every stream open (highest sample) | "
        f"{'-' if open_rss is None else f'{open_rss / mb:.1f} MB'} |",
        f"| **RSS per open stream** | **{_num(per_stream_kb, 1)} KB** (goal <= {GOAL_KB:.0f} KB: "
        f"{'-' if per_stream_kb is None else 'met' if per_stream_kb <= GOAL_KB else 'NOT met'}) |",
        f"| Helios CPU over the run | {result['helios_cpu_s']:.1f} s for {chunks:,} chunks "
        f"({chunks / result['helios_cpu_s'] if result['helios_cpu_s'] else 0:,.0f} chunks per CPU second) |",
        f"| Helios open-files limit (soft / hard) | {result['helios_open_files_limit']} |",
    ]
    if result["error_examples"]:
        lines.append(f"\nerrors, e.g.: {result['error_examples']}")
    return full, "\n".join(lines)


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="thirty-second streams instead of a minute")
    parser.add_argument("--streams", type=int, help="concurrent streams (default 1000)")
    parser.add_argument("--keep-workdir", action="store_true", help="keep configs and logs (path printed)")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else FULL
    plan = Plan(streams=args.streams or base.streams, tokens=base.tokens)
    mode = "quick" if args.quick else "full"
    workdir = Path(tempfile.mkdtemp(prefix="helios-bench-held-"))
    try:
        result = measure(plan, workdir)
    finally:
        if args.keep_workdir:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    full, text = report(plan, result, mode)
    print(text, flush=True)
    run.RESULTS.mkdir(parents=True, exist_ok=True)
    out = run.RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}-held-streams-{mode}.json"
    out.write_text(json.dumps(full, indent=1, default=str))
    out.with_suffix(".md").write_text(text + "\n")
    print(f"\nresults: {out.relative_to(run.ROOT)} (and .md)")
    return 0 if full["all_streams_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
