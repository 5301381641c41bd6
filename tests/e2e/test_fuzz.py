"""Property-based fuzzing of every POST route, with the appliance's own ``/openapi.json`` as the oracle.

Bodies are generated from the published request schemas (tests/support/fuzzing.py) with ``model`` pinned to
served names, so they reach the imitation provider and the embedded engine; each body is then broken at one
location. The document decides whether a body is valid, and the appliance must agree: a valid body is answered
(or refused for a reason the document states), an invalid one gets a 4xx OpenAI error naming the broken field,
and nothing is ever a 5xx or a traceback. Generation is derandomized so CI runs the same cases every time.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.engine import AGENT, EMBED, HERMES, PLAIN, REMOTE
from tests.support.fuzzing import OMIT, Document, Json, Path, bodies, mutated, parse_param, related, violations
from tests.support.openapi import validate
from tests.support.server import HeliosProcess

#: Served names each route is fuzzed on: the imitation provider and the engine (plain, with a tool parser,
#: an agent over it, the embedding model).
MODELS = {
    "/v1/chat/completions": (REMOTE, PLAIN, HERMES, AGENT),
    "/v1/completions": (REMOTE, PLAIN),
    "/v1/embeddings": (REMOTE, EMBED),
    "/v1/responses": (REMOTE, PLAIN),
}
#: Generated bodies per route; each is sent as generated and once more broken at one location.
EXAMPLES = {"/v1/chat/completions": 1000, "/v1/completions": 600, "/v1/embeddings": 500, "/v1/responses": 700}
ENGINE = frozenset({PLAIN, HERMES, AGENT, EMBED})
#: The engine generates on the CPU: its answers stay a few tokens long, one or two of them (the document's
#: full ranges go to the imitation provider, and tests/e2e/test_hostile_input.py sends the extremes). The
#: budget is always set, and never the location a mutation breaks: without one a random model writes until
#: its context is full.
_FEW = st.integers(1, 4)
ENGINE_BOUNDS: dict[Path, st.SearchStrategy[Json]] = {
    ("max_tokens",): _FEW, ("max_completion_tokens",): _FEW, ("max_output_tokens",): _FEW,
    ("n",): st.none() | st.integers(1, 2), ("best_of",): st.none() | st.integers(1, 2),
}
BUDGET = {"/v1/chat/completions": "max_tokens", "/v1/completions": "max_tokens", "/v1/responses": "max_output_tokens"}
#: Extras sent beside the documented fields: vLLM's, which the engine honours, with the types and ranges
#: vLLM takes, and one nobody knows.
_EXTRA_VALUES: dict[str, st.SearchStrategy[Json]] = {
    "top_k": st.integers(-1, 5), "min_p": st.floats(0, 1), "repetition_penalty": st.floats(0.5, 2),
    "ignore_eos": st.booleans(), "not_a_parameter": st.integers(0, 3)}
EXTRAS = st.fixed_dictionaries({}, optional=_EXTRA_VALUES)
EXTRAS_SENT = frozenset(_EXTRA_VALUES)


@dataclass
class Tally:
    """What the fuzzing sent, by outcome: the counts the README quotes."""

    sent: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    #: refusals by parameter, to see which rules the cases meet most
    by_param: Counter[str] = field(default_factory=Counter)

    def add(self, status: int, error: Json) -> None:
        self.sent += 1
        self.by_status[status] += 1
        if isinstance(error, dict) and isinstance(error.get("error"), dict):
            self.by_param[re.sub(r"\[\d+\]", "[]", str(error["error"].get("param")))] += 1


TALLY = Tally()


@pytest.fixture(scope="module")
def document(engine_gateway: HeliosProcess) -> Document:
    raw = httpx2.get(engine_gateway.url("/openapi.json"), timeout=10).raise_for_status().json()
    return Document(raw)


@pytest.fixture(scope="module")
def http(engine_gateway: HeliosProcess) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=engine_gateway.base_url, timeout=60, trust_env=False) as client:
        yield client


@pytest.fixture(scope="module")
def logs_since(engine_gateway: HeliosProcess) -> Iterator[int]:
    """The shared appliance's log length before this module: its own share is checked afterwards."""
    start = len(engine_gateway.logs())
    yield start
    tail = engine_gateway.logs()[start:]
    assert "Traceback" not in tail, tail[tail.index("Traceback") - 2000:][:6000]
    assert engine_gateway.is_running()


def test_document_covers_every_post_route(document: Document) -> None:
    """Every POST route with a JSON body is documented, so the fuzzing below reaches all of them."""
    assert document.post_routes() == sorted(MODELS)


def _body_strategy(document: Document, route: str) -> st.SearchStrategy[Json]:
    schema = document.request_schema(route)
    per_model = []
    for model in MODELS[route]:
        # Left out, so the bodies reach the model: translation refuses max_tool_calls whenever it is set, and a
        # made-up previous_response_id is a 404.
        overrides: dict[Path, st.SearchStrategy[Json]] = {("model",): st.just(model), ("max_tool_calls",): OMIT,
                                                         ("previous_response_id",): OMIT}
        if model in ENGINE:
            overrides.update(ENGINE_BOUNDS)
        generated = bodies(document, schema, overrides)
        if model in ENGINE:
            budget = BUDGET.get(route)
            if budget is not None:
                generated = st.tuples(generated, _FEW).map(
                    lambda pair, key=budget: {key: pair[1], **pair[0]} if isinstance(pair[0], dict) else pair[0])
        per_model.append(generated)
    generated = st.one_of(per_model)
    # Top-level extras ride on a fifth of the bodies: provider extras are part of the contract.
    return st.tuples(generated, st.one_of(st.just({}), st.just({}), st.just({}), st.just({}), EXTRAS)).map(
        lambda pair: {**pair[1], **pair[0]} if isinstance(pair[0], dict) else pair[0])


def _send(http: httpx2.Client, route: str, body: Json) -> tuple[int, Json, bytes]:
    content = json.dumps(body, ensure_ascii=False).encode()
    with http.stream("POST", route, content=content, headers={"Content-Type": "application/json"}) as response:
        raw = response.read()
    kind = response.headers.get("content-type", "")
    parsed = json.loads(raw) if kind.startswith("application/json") else None
    TALLY.add(response.status_code, parsed)
    return response.status_code, parsed, raw


def _named(error: Json, body: Json, wrong: list[Path]) -> bool:
    """Whether an error names one of the locations the document says are wrong."""
    detail = error["error"]
    param = detail.get("param")
    if isinstance(param, str) and param and any(related(parse_param(param), loc) for loc in wrong if loc):
        return True
    # A rule over several fields of one object (a cross-field rule) is told at that object, quoting the fields.
    quoted = set(re.findall(r"'([^']+)'", detail["message"]))
    for loc in wrong:
        target: Any = body
        for part in loc:
            inside = (isinstance(target, dict) and part in target) or (isinstance(target, list) and isinstance(
                part, int) and part < len(target))
            target = target[part] if inside else None
        if isinstance(target, dict) and (quoted & set(target) or (param and parse_param(param) == loc)):
            return True
        if not param and loc and loc[-1] in quoted:
            return True
    return False


#: What the Responses request's description says translation through Chat Completions refuses (every model
#: here is translated: the imitation provider is not OpenAI's host), as (code, param) patterns.
TRANSLATION_REFUSALS = (
    re.compile(r"^(unsupported_parameter|unsupported_item|unsupported_tool_type):"),
    re.compile(r"^[a-z_]*:input(\[\d+\]\.(type|content(\[\d+\](\.type|\.image_url|\.file_data)?)?|output\[\d+\]))?$"),
    re.compile(r"^[a-z_]*:tool_choice$"),
    # A namespace or custom tool whose own fields are wrong (names, its tools, a grammar).
    re.compile(r"^[a-z_]*:tools\[\d+\](\.tools\[\d+\])?\.(name|tools|type|format)$"),
)


#: What the request schemas' descriptions say an embedded model refuses: param patterns, each with a pattern
#: of its message (the reason).
ENGINE_REFUSALS = tuple((re.compile(param), re.compile(message)) for param, message in (
    (r"^(tools|tool_choice(\.function\.name)?)$", r"tool|parser"),
    (r"^messages\[\d+\]\.content\[\d+\]$", r"is not supported by this model"),
    (r"^messages$", r"cannot be rendered with this model's chat template"),
    (r"^logit_bias$", r"vocab|token"),
    (r"^(prompt|input)?$", r"out of vocabulary"),
    (r"^(logprobs|top_logprobs)$", r"at most \d+ is supported"),
    (r"^(echo|suffix|best_of|top_p)$", r"not supported|greater than 0"),
    (r"^dimensions$", r"does not support"),
    # vLLM's own check, unnamed (param null) but naming the field in its message.
    (r"^$", r"^n must be 1 when using greedy sampling"),
))
#: And what it says an agent refuses.
AGENT_REFUSALS = ((re.compile(r"^n$"), re.compile(r"one answer")),
                  (re.compile(r"^tools\[\d+\]\.function\.name$"), re.compile(r"is a tool of agent")))


def _documented_refusal(route: str, model: str, status: int, error: Json) -> bool:
    """Whether a refusal of a body valid per the document is one the document states."""
    detail = error["error"]
    param, code, message = detail.get("param") or "", detail.get("code") or "", detail["message"]
    if (status == 404 and code == "model_not_found") or (status == 400 and code == "context_length_exceeded"):
        return True
    if model in ENGINE and status == 400:
        # Unknown extras are refused, and vLLM's with values outside vLLM's types and ranges.
        if param in EXTRAS_SENT:
            return True
        refusals = ENGINE_REFUSALS + (AGENT_REFUSALS if model == AGENT else ())
        if any(p.match(param) and m.search(message) for p, m in refusals):
            return True
    if route == "/v1/responses":
        if status == 404 and param == "previous_response_id":
            return True
        if model in ENGINE and param == "verbosity":
            return True
        return status == 400 and any(p.match(f"{code}:{param}") for p in TRANSLATION_REFUSALS)
    return False


def _check(route: str, body: Json, wrong: list[Path], status: int, error: Json, raw: bytes) -> None:
    assert status < 500, (status, raw[:2000], body)
    if status < 400:
        assert not wrong, f"the document refuses at {wrong} yet {route} answered {status}: {body}"
        return
    assert error is not None, raw[:2000]
    validate("ErrorResponse", error)
    model = body.get("model") if isinstance(body, dict) else None
    if wrong:
        # A body wrong in one place may be refused first for another reason the document states.
        assert 400 <= status < 500 and (_named(error, body, wrong) or _documented_refusal(
            route, str(model), status, error)), (status, error, wrong, body)
    else:
        assert _documented_refusal(route, str(model), status, error), (
            f"a body valid per the document was refused by {route}: {error} for {body}")


def _fuzz(document: Document, http: httpx2.Client, route: str, examples: int) -> None:
    validator = document.validator(route)
    bodies_of_route = _body_strategy(document, route)

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def run(data: st.DataObject) -> None:
        body = data.draw(bodies_of_route, label="body")
        kept = frozenset(ENGINE_BOUNDS) if isinstance(body, dict) and body.get("model") in ENGINE else frozenset()
        for candidate in (body, data.draw(mutated(body, kept), label="broken")[1]):
            wrong = violations(validator, candidate)
            status, error, raw = _send(http, route, candidate)
            _check(route, candidate, wrong, status, error, raw)

    run()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("route", sorted(MODELS))
def test_route_agrees_with_document(route: str, document: Document, http: httpx2.Client, logs_since: int) -> None:
    _fuzz(document, http, route, EXAMPLES[route])


def test_fuzzing_sent_thousands(logs_since: int) -> None:
    """The count the README quotes, and proof the cases reached the backends rather than the validation."""
    if not TALLY.sent:
        pytest.skip("the fuzzing tests were not selected")
    print(f"fuzz: {TALLY.sent} requests, by status {sorted(TALLY.by_status.items())}; most refused: "
          f"{TALLY.by_param.most_common(8)}")
    assert TALLY.sent >= 2 * sum(EXAMPLES.values())
    assert TALLY.by_status.get(200, 0) >= TALLY.sent // 4

