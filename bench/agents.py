"""Agent benchmark: a two-step tool loop (one calculator round, then the answer) through a Helios agent,
against the same two model calls made straight to the provider imitation (the floor), in one run.

    .venv/bin/python -m bench.agents [--quick] [--rounds N] [--workers N] [--no-stream] [--keep-workdir]

The provider imitation (``bench/provider.py``) serves the model ``tools-1``: given tools, it answers the first
call of a conversation with one ``calculator`` call (``6 * 7``) and the next, which carries the tool result,
in text. Helios serves it as the remote model ``m`` and an agent ``agent`` over ``m`` with the built-in
calculator, so every agent request is two model calls and one tool call. Four paths run interleaved
(A B C A B C ...) at concurrency 1 and 32, non-streaming and streaming, with the asyncio load generator:

- ``direct step 1`` / ``direct step 2``: the agent's first and second model call, the fields the loop sends
  (tools, the tool-call message, the tool result; ``model`` as the provider gets it), posted to the provider;
- ``agent``: the client's request to the agent;
- ``helios model call``: step 1 sent to the model ``m`` through Helios, no loop: what the gateway adds to one
  model call, for comparison with the agent's time per step.

Derived, per concurrency: the provider's time per agent request = step 1 + step 2 latency (p50 with p50, p99
with p99); the tool's time, the calculator timed in-process; the appliance's own time per step =
(agent latency - provider time - tool time) / 2; the direct pair's req/s = 1 / (1/rps1 + 1/rps2) (the
provider's direct req/s / 2); Helios' CPU per request (``procs.cpu_seconds``). At c=32 the latencies are
mostly queueing, so the per-step figure there says where the queue is, not what one step costs. Tables are
printed and written with the JSON to ``bench/results/<timestamp>-agents-<mode>.json`` (and ``.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/agents.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import loadgen, procs, provider, run

AGENT = "agent"
TOOL_ROUNDS = 1
STEPS = TOOL_ROUNDS + 1  # model calls per agent request
UPSTREAM = f"tools-{TOOL_ROUNDS}"  # the provider's tool-calling model: TOOL_ROUNDS calculator calls, then text
TOKENS = run.NONSTREAM_TOKENS
CONCURRENCIES = (1, 32)
AGENT_CONFIG = f"""
[[agents]]
name = "{AGENT}"
model = "m"
tools = ["calculator"]
"""
TOOL_RESULT = "42"  # the calculator's answer to provider.TOOL_ARGUMENTS
PATHS = ("direct step 1", "direct step 2", "agent", "helios model call")


@dataclass
class Plan:
    rounds: int
    c1_count: int  # requests per path per round at c=1
    c32_count: int  # requests per path per round at c=32
    time_limit: float  # seconds per segment (a slow path gets fewer requests)
    warmup: int
    tool_calls: int  # in-process calculator calls timed
    stream: bool = True


QUICK = Plan(rounds=2, c1_count=300, c32_count=1500, time_limit=8, warmup=200, tool_calls=5_000)
FULL = Plan(rounds=3, c1_count=1000, c32_count=4000, time_limit=15, warmup=1000, tool_calls=50_000)


@dataclass
class Leg(run.Target):
    """A path with its own request document: an agent request, or one of the loop's model calls."""

    doc: dict[str, Any] = field(default_factory=dict)
    include_usage: bool = False  # streamed model calls ask for usage, as the loop does

    def body(self, *, stream: bool, tokens: int) -> bytes:
        doc = {"max_tokens": tokens, **self.doc}
        if stream:
            doc["stream"] = True
            if self.include_usage:
                doc["stream_options"] = {"include_usage": True}
        return json.dumps(doc, ensure_ascii=False).encode()


def model_calls() -> tuple[dict[str, Any], dict[str, Any]]:
    """The agent's two model calls as its loop sends them (max_tokens and stream fields added per request)."""
    from app.agents.builtins import Calculator

    base = {"parallel_tool_calls": True, "tools": [Calculator().definition()], "model": UPSTREAM}
    user = run.PROMPT
    call = {"id": provider.tool_call_id(0), "type": "function",
            "function": {"name": provider.TOOL_NAME, "arguments": provider.TOOL_ARGUMENTS}}
    second = [*user, {"role": "assistant", "content": None, "tool_calls": [call]},
              {"role": "tool", "tool_call_id": call["id"], "content": TOOL_RESULT}]
    return {**base, "messages": user}, {**base, "messages": second}


def tool_time_us(calls: int) -> float:
    """Wall time of one calculator call in-process (what the loop awaits), in microseconds."""
    from app.agents.builtins import Calculator

    tool = Calculator()
    arguments = json.loads(provider.TOOL_ARGUMENTS)

    async def timed() -> float:
        result = await tool.call(arguments)
        if result.text != TOOL_RESULT:
            raise RuntimeError(f"calculator gave {result.text!r} for {provider.TOOL_ARGUMENTS}")
        for _ in range(min(calls, 500)):
            await tool.call(arguments)
        started = time.perf_counter()
        for _ in range(calls):
            await tool.call(arguments)
        return (time.perf_counter() - started) / calls * 1e6

    return loadgen.run(timed)


def post(port: int, body: bytes) -> dict[str, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        data: dict[str, Any] = json.load(response)
    return data


def _timeless(steps: str) -> str:
    return re.sub(r" in \d+ ms", "", steps)


def check_paths(legs: dict[str, Leg]) -> None:
    """One request per path, checked: the first model call is a calculator call, the second and the agent's
    answer are text, and the agent's steps show the calculator's result."""
    def choice(name: str) -> dict[str, Any]:
        leg = legs[name]
        found: dict[str, Any] = post(leg.port, leg.body(stream=False, tokens=TOKENS))["choices"][0]
        return found

    first, second, answer = choice(PATHS[0]), choice(PATHS[1]), choice(PATHS[2])
    agent = legs[PATHS[2]]
    request = urllib.request.Request(f"http://127.0.0.1:{agent.port}/v1/chat/completions",
                                     data=agent.body(stream=True, tokens=TOKENS),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        events = [line[6:] for line in response.read().decode().splitlines() if line.startswith("data: ")]
    deltas = [d for e in events[:-1] for c in json.loads(e)["choices"] if (d := c["delta"])]
    streamed = "".join(d.get("content") or "" for d in deltas)
    streamed_steps = "".join(d.get("reasoning_content") or "" for d in deltas)
    calls = first["message"].get("tool_calls") or [{}]
    steps = answer["message"].get("reasoning_content") or ""
    problems = [
        first["finish_reason"] != "tool_calls" and f"step 1 finished {first['finish_reason']!r}",
        calls[0].get("function", {}).get("name") != provider.TOOL_NAME and f"step 1 called {calls}",
        second["finish_reason"] != "stop" and f"step 2 finished {second['finish_reason']!r}",
        answer["finish_reason"] != "stop" and f"the agent finished {answer['finish_reason']!r}",
        not (answer["message"].get("content") or "").startswith("tok0") and f"the agent said {answer['message']}",
        f"← {provider.TOOL_NAME} in" not in steps and f"the agent's steps show no calculator result: {steps!r}",
        TOOL_RESULT not in steps and f"the calculator's result is not {TOOL_RESULT}: {steps!r}",
        events[-1:] != ["[DONE]"] and f"the agent's stream ends with {events[-1:]}",
        streamed.strip() != answer["message"].get("content") and f"the agent streamed {streamed!r}",
        _timeless(streamed_steps) != _timeless(steps) and f"the agent streamed steps {streamed_steps!r}",
    ]
    found = [p for p in problems if p]
    if found:
        raise RuntimeError("the agent loop is not the expected two steps: " + "; ".join(found))


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


_METRIC = re.compile(r'^(helios_agent_\w+)\{([^}]*)\} (\S+)$')


def agent_metrics(port: int) -> dict[str, float]:
    """The agent's step and tool metrics from /metrics, summed over label sets."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _METRIC.match(line)
        if match is None or f'agent="{AGENT}"' not in match.group(2):
            continue
        name, labels, value = match.groups()
        if not name.endswith(("_total", "_sum", "_count")):  # not buckets, not the _created timestamps
            continue
        if name.startswith("helios_agent_tool_calls"):
            outcome = re.search(r'outcome="(\w+)"', labels)
            name = f"{name}[{outcome.group(1) if outcome else '?'}]"
        out[name] = out.get(name, 0.0) + float(value)
    return out


# ---- the run --------------------------------------------------------------------------------------


class AgentBench:
    def __init__(self, plan: Plan, workdir: Path, mode: str) -> None:
        self.plan = plan
        self.workdir = workdir
        self.services: list[procs.Service] = []
        self.legs: dict[str, Leg] = {}
        self.text: list[str] = []
        self.report: dict[str, Any] = {"mode": mode, "plan": plan.__dict__,
                                       "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "commit": run.git_commit(),
                                       "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(), "scenarios": {}}

    def emit(self, block: str) -> None:
        if not self.text:
            block = (f"Helios commit {self.report['commit']}; {os.cpu_count()} CPUs; load average before "
                     f"{self.report['loadavg_before'][0]:.2f}. Client, provider imitation and Helios share these "
                     "CPUs: figures are noisy.\n") + block
        print(block, flush=True)
        self.text.append(block)

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()

    def start(self, workers: int) -> None:
        imitation = run.provider_service(self.workdir, TOKENS)
        imitation.start()
        self.services.append(imitation)
        helios = run.helios_service(self.workdir, imitation.port, workers, upstream_model=UPSTREAM,
                                    extra_config=AGENT_CONFIG)
        helios.start()
        self.services.append(helios)
        first, second = model_calls()
        self.legs = {
            PATHS[0]: Leg(PATHS[0], imitation.port, UPSTREAM, imitation, imitation.pid, doc=first,
                          include_usage=True),
            PATHS[1]: Leg(PATHS[1], imitation.port, UPSTREAM, imitation, imitation.pid, doc=second,
                          include_usage=True),
            PATHS[2]: Leg(PATHS[2], helios.port, AGENT, helios, helios.pid,
                          doc={"model": AGENT, "messages": run.PROMPT}),
            PATHS[3]: Leg(PATHS[3], helios.port, "m", helios, helios.pid, doc={**first, "model": "m"}),
        }
        check_paths(self.legs)
        rss_start = procs.rss_bytes(helios.pid)
        for leg in self.legs.values():
            run.warm(leg, self.plan.warmup)
        self.report["helios"] = {"workers": workers, "startup_s": helios.startup_seconds,
                                 "rss_after_start_mb": rss_start / run.MB,
                                 "rss_after_warmup_mb": procs.rss_bytes(helios.pid) / run.MB}

    def tool(self) -> float:
        tool_us = tool_time_us(self.plan.tool_calls)
        self.report["tool_us"] = tool_us
        self.emit(f"calculator({provider.TOOL_ARGUMENTS}) in-process: {tool_us:.1f} us per call "
                  f"({self.plan.tool_calls:,} calls)")
        return tool_us

    def scenario(self, concurrency: int, stream: bool, tool_us: float) -> dict[str, Any]:
        plan = self.plan
        count = plan.c1_count if concurrency == 1 else plan.c32_count

        def step(leg: run.Target) -> tuple[list[loadgen.Result], float, float]:
            payload = leg.payload(stream=stream, tokens=TOKENS)
            return run.run_async(leg, lambda: loadgen.closed_loop(
                "127.0.0.1", leg.port, payload, concurrency=concurrency, count=count, time_limit=plan.time_limit))

        runs = run.interleave(plan.rounds, list(self.legs.values()), step)
        stats = {name: run.summarize_async(r, stream=stream) for name, r in runs.items()}
        one, two, agent, call = (stats[name] for name in PATHS)
        tool_ms = TOOL_ROUNDS * tool_us / 1000
        provider_p50, provider_p99 = one["p50"] + two["p50"], one["p99"] + two["p99"]
        pair_rps = 1 / (1 / one["rps"] + 1 / two["rps"]) if one["rps"] and two["rps"] else 0.0
        cpu_ms = agent["cpu_per_1k"]  # CPU s per 1,000 requests = CPU ms per request
        derived = {
            "provider_ms_p50": provider_p50, "provider_ms_p99": provider_p99, "tool_ms": tool_ms,
            "appliance_ms_per_step_p50": (agent["p50"] - provider_p50 - tool_ms) / STEPS,
            "appliance_ms_per_step_p99": (agent["p99"] - provider_p99 - tool_ms) / STEPS,
            "gateway_added_ms_per_call_p50": call["p50"] - one["p50"],
            "gateway_added_ms_per_call_p99": call["p99"] - one["p99"],
            "gateway_call_cpu_ms": call["cpu_per_1k"],
            "direct_pair_rps": pair_rps, "agent_over_direct_pair": run.ratio(agent["rps"], pair_rps),
            "helios_cpu_ms_per_request": cpu_ms,
            "helios_cpu_ms_per_step": cpu_ms / STEPS if cpu_ms is not None else None,
            "helios_cpu_cores": cpu_ms / 1000 * agent["rps"] if cpu_ms is not None else None,
            # One worker does at most 1000 / cpu_ms agent requests/s; ``concurrency`` clients each waiting
            # STEPS provider calls of L ms ask for concurrency * 1000 / (STEPS * L): provider-bound above this L.
            "provider_bound_above_ms": concurrency * cpu_ms / STEPS if cpu_ms is not None else None,
        }
        key = f"{'stream' if stream else 'nonstream'}_c{concurrency}"
        self.report["scenarios"][key] = {**stats, "derived": derived}
        kind = "streaming (whole response)" if stream else "non-streaming"
        rows = [[name, s["p50"], s["p99"], s["rps"], s["cpu_per_1k"], s["requests"], s["errors"]]
                for name, s in stats.items()]
        block = run.table(f"Agent, {kind}, concurrency {concurrency}: {STEPS} model calls + {TOOL_ROUNDS} calculator "
                          "call per agent request; direct steps are those model calls straight to the provider",
                          ["path", "p50 ms", "p99 ms", "req/s", "CPU ms/req (own process)", "requests", "errors"],
                          rows)
        block += (f"\nprovider time per agent request (step 1 + step 2): p50 {provider_p50:.3f} ms, p99 "
                  f"{provider_p99:.3f} ms; tool {tool_ms * 1000:.1f} us"
                  f"\nappliance time per step = (agent - provider - tool) / {STEPS}: "
                  f"p50 {_num(derived['appliance_ms_per_step_p50'], 3)} ms, "
                  f"p99 {_num(derived['appliance_ms_per_step_p99'], 3)} ms"
                  f"{' (mostly queueing at this concurrency)' if concurrency > 1 else ''}; for comparison, "
                  f"Helios adds {derived['gateway_added_ms_per_call_p50']:.3f} ms p50 "
                  f"({derived['gateway_added_ms_per_call_p99']:.3f} ms p99) to one model call without the loop"
                  f"\nthroughput: agent {agent['rps']:,.0f} req/s vs direct pair {pair_rps:,.0f} req/s "
                  f"(provider direct req/s / 2) = {_num(derived['agent_over_direct_pair'])}x; Helios CPU "
                  f"{_num(cpu_ms, 3)} ms/request ({_num(derived['helios_cpu_ms_per_step'], 3)} ms/step), "
                  f"{_num(derived['helios_cpu_cores'])} cores busy; at this CPU cost one worker is the limit "
                  f"unless the provider takes over {_num(derived['provider_bound_above_ms'], 1)} ms per call")
        errors = {name: s["error_kinds"] for name, s in stats.items() if s["errors"]}
        if errors:
            block += f"\nERRORS: {errors}"
        self.emit(block)
        return derived

    def targets(self) -> None:
        sc = self.report["scenarios"]
        rows: list[list[Any]] = []
        c1 = sc.get("nonstream_c1", {}).get("derived")
        if c1:
            value = c1["appliance_ms_per_step_p50"]
            rows.append(["appliance time per step, c=1, p50 (ms)", value, "<= 1", "yes" if value <= 1 else "NO"])
            rows.append(["appliance time per step, c=1, p99 (ms)", c1["appliance_ms_per_step_p99"], "-", "-"])
        c32 = sc.get("nonstream_c32", {}).get("derived")
        if c32:
            value = c32["agent_over_direct_pair"]
            met = "-" if value is None else ("yes" if value >= 0.9 else "NO")
            rows.append(["c=32 agent req/s / (provider direct req/s / 2)", value,
                         ">= 0.9 (provider-bound)", met])
            rows.append(["c=32 agent req/s", sc["nonstream_c32"]["agent"]["rps"], "-", "-"])
            rows.append(["c=32 provider direct req/s / 2", c32["direct_pair_rps"], "-", "-"])
            rows.append(["c=32 Helios CPU per agent request (ms)", c32["helios_cpu_ms_per_request"], "-", "-"])
            rows.append(["c=32 Helios CPU cores busy", c32["helios_cpu_cores"], "-", "-"])
            rows.append(["c=32 provider-bound when a model call takes over (ms)", c32["provider_bound_above_ms"],
                         "-", "-"])
        for key in ("stream_c1", "stream_c32"):
            found = sc.get(key, {}).get("derived")
            if found:
                rows.append([f"streaming {key[7:]}: appliance time per step p50 (ms)",
                             found["appliance_ms_per_step_p50"], "-", "-"])
                rows.append([f"streaming {key[7:]}: agent / direct pair req/s", found["agent_over_direct_pair"],
                             "-", "-"])
        self.report["targets"] = rows
        self.emit(run.table("Targets (Helios agent, non-streaming unless said)",
                            ["figure", "measured", "goal", "met"], rows))

    def metrics(self) -> None:
        found = agent_metrics(self.legs[PATHS[2]].port)
        self.report["agent_metrics"] = found
        count = found.get("helios_agent_steps_count", 0.0)
        steps = found.get("helios_agent_steps_sum", 0.0) / count if count else float("nan")
        tool_count = found.get("helios_agent_tool_duration_seconds_count", 0.0)
        tool_mean = found.get("helios_agent_tool_duration_seconds_sum", 0.0) / tool_count if tool_count else 0.0
        outcomes = ", ".join(f"{name.split('[')[1].rstrip(']')}: {value:,.0f}" for name, value in found.items()
                             if name.startswith("helios_agent_tool_calls"))
        self.emit(f"\nHelios' own metrics: {count:,.0f} agent requests, {steps:.3f} model calls each (expected "
                  f"{STEPS}); calculator calls by outcome {outcomes}; "
                  f"mean tool call as the loop times it (argument parsing and schema check included) "
                  f"{tool_mean * 1e6:.1f} us")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small counts: under a minute")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per scenario")
    parser.add_argument("--workers", type=int, default=1, help="Helios workers (default 1)")
    parser.add_argument("--no-stream", action="store_true", help="non-streaming scenarios only")
    parser.add_argument("--keep-workdir", action="store_true", help="keep configs and logs (path printed)")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else FULL
    plan = Plan(**{**base.__dict__, **({"rounds": args.rounds} if args.rounds else {}),
                   "stream": not args.no_stream})
    mode = "quick" if args.quick else "full"
    run.RESULTS.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="helios-bench-agents-"))
    began = time.perf_counter()
    bench = AgentBench(plan, workdir, mode)
    try:
        bench.start(args.workers)
        tool_us = bench.tool()
        for stream in (False, True) if plan.stream else (False,):
            for concurrency in CONCURRENCIES:
                bench.scenario(concurrency, stream, tool_us)
        bench.metrics()
        bench.targets()
    finally:
        bench.stop()
        if args.keep_workdir:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report = bench.report
    report["seconds"] = time.perf_counter() - began
    report["loadavg_after"] = os.getloadavg()
    out = run.RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}-agents-{mode}.json"
    out.write_text(json.dumps(report, indent=1, default=str))
    out.with_suffix(".md").write_text("\n".join(bench.text) + "\n")
    print(f"\nfinished in {report['seconds']:.0f} s; results: {out.relative_to(run.ROOT)} (and .md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
