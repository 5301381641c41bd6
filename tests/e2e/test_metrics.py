"""/metrics as Prometheus sees it: the series, their labels, bounded cardinality, several workers."""

from __future__ import annotations

import random
import string
from pathlib import Path

import httpx2
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.gateway import client, stream_payloads
from tests.support.fake_provider import FakeProvider, remote_model
from tests.support.fixtures import HeliosFactory
from tests.support.server import free_port

USER = [{"role": "user", "content": "hello there"}]
Series = frozenset[tuple[str, tuple[tuple[str, str], ...]]]


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(text: str, name: str, **labels: str) -> float:
    wanted = tuple(sorted(labels.items()))
    return sum(v for (n, lbl), v in _samples(text).items() if n == name and set(wanted) <= set(lbl))


def _series(text: str) -> Series:
    # Only our own series: vLLM's and the process collector's are not driven by client input.
    return frozenset(key for key in _samples(text) if key[0].startswith("helios_"))


def test_request_generation_and_upstream_series(helios: HeliosFactory, fake_provider: FakeProvider) -> None:
    gateway = helios({"models": [remote_model(fake_provider, "m", "gpt-4o"),
                                 remote_model(fake_provider, "m-paced", "slow-chunks-5"),
                                 remote_model(fake_provider, "broken", "error-500", max_retries=2)]})
    oa = client(gateway.base_url)
    oa.chat.completions.create(model="m", messages=USER)
    stream_payloads(oa, model="m", messages=USER)
    # Chunks 5 ms apart arrive one read each: every gap after the first chunk is an inter-token latency.
    stream_payloads(oa, model="m-paced", messages=USER, max_tokens=6)
    with pytest.raises(openai.InternalServerError):
        oa.chat.completions.create(model="broken", messages=USER)
    text = httpx2.get(f"{gateway.base_url}/metrics").text
    route = "/v1/chat/completions"
    assert _value(text, "helios_requests_total", model="m", route=route, status="200") == 2
    assert _value(text, "helios_requests_total", model="broken", route=route, status="502") == 1
    assert _value(text, "helios_request_duration_seconds_count", model="m", route=route) == 2
    assert _value(text, "helios_time_to_first_token_seconds_count", model="m") == 1
    assert _value(text, "helios_time_to_first_token_seconds_count", model="m-paced") == 1
    assert _value(text, "helios_inter_token_latency_seconds_count", model="m-paced") >= 5
    assert _value(text, "helios_inter_token_latency_seconds_sum", model="m-paced") >= 0.004 * 5
    assert _value(text, "helios_prompt_tokens_total", model="m") == 4  # the provider counts 2 words, twice
    assert _value(text, "helios_completion_tokens_total", model="m") > 0
    assert _value(text, "helios_finish_reasons_total", model="m", reason="stop") == 2
    assert _value(text, "helios_upstream_request_duration_seconds_count", model="m") == 2
    assert _value(text, "helios_upstream_errors_total", model="broken", kind="status_5xx") == 1
    assert _value(text, "helios_upstream_retries_total", model="broken") == 2
    assert _value(text, "helios_overhead_seconds_count", route=route) == 4
    assert _value(text, "helios_requests_in_flight", model="m") == 0
    assert _value(text, "helios_backend_ready", model="m") == 1
    assert _value(text, "helios_model_info", model="m", backend="openai", upstream_model="gpt-4o") == 1
    assert _value(text, "helios_build_info") == 1
    # Bucket boundaries are the LLM-sized ones, not prometheus-client's defaults.
    assert 'helios_time_to_first_token_seconds_bucket{le="60.0",model="m"}' in text
    assert 'helios_inter_token_latency_seconds_bucket{le="0.001",model="m"}' in text
    assert "sk-upstream-secret" not in text


def test_cardinality_is_bounded(helios: HeliosFactory, fake_provider: FakeProvider) -> None:
    gateway = helios({"models": [remote_model(fake_provider, "m", "gpt-4o")]})
    rng = random.Random(42)

    def word() -> str:
        return "".join(rng.choices(string.ascii_lowercase + string.digits, k=12))

    with httpx2.Client(base_url=gateway.base_url, timeout=10) as http:
        def probe() -> None:
            http.post("/v1/chat/completions", json={"model": word(), "messages": USER})
            http.get(f"/{word()}/{word()}")
            http.get(f"/v1/models/{word()}")
            http.post("/v1/chat/completions", content=b"{not json")

        probe()  # the fixed "unknown" series now exist...
        http.get("/metrics")  # ...and so do those of the scrape itself
        before = _series(http.get("/metrics").text)
        for _ in range(250):
            probe()  # 1,000 requests naming random models and paths
        after = _series(http.get("/metrics").text)
    assert after == before, f"new series: {sorted(after - before)[:5]}"
    labels = {dict(lbl).get("model") for _, lbl in after} | {dict(lbl).get("route") for _, lbl in after}
    assert "_unknown" in labels and "_unmatched" in labels and "/v1/models/<path:model>" in labels


def test_counters_add_up_across_two_workers(
    helios: HeliosFactory, fake_provider: FakeProvider, tmp_path: Path
) -> None:
    directory = tmp_path / "metrics"
    directory.mkdir()
    (directory / "counter_99999.db").write_bytes(b"stale data from a previous run")
    gateway = helios({"server": {"workers": 2},
                      "metrics": {"multiprocess_dir": str(directory)},
                      "models": [remote_model(fake_provider, "m", "gpt-4o")]})
    sent = 120
    pids: set[str] = set()
    for _ in range(sent):
        # A fresh connection each time, so the kernel spreads them over both workers.
        with httpx2.Client(base_url=gateway.base_url, timeout=10) as http:
            response = http.post("/v1/chat/completions", json={"model": "m", "messages": USER})
            assert response.status_code == 200
    for _ in range(5):
        text = httpx2.get(f"{gateway.base_url}/metrics").text
        assert _value(text, "helios_requests_total", model="m", route="/v1/chat/completions",
                      status="200") == sent
        assert _value(text, "helios_prompt_tokens_total", model="m") == 2 * sent
    assert not (directory / "counter_99999.db").exists(), "the multiprocess directory is emptied at start-up"
    pids = {p.name.rsplit("_", 1)[-1] for p in directory.glob("counter_*.db")}
    assert len(pids) == 2, f"expected files from two workers, got {pids}"


def test_openmetrics_separate_port_and_token(helios: HeliosFactory, fake_provider: FakeProvider) -> None:
    port = free_port()
    gateway = helios({"metrics": {"port": port, "bearer_token": "scrape-secret"},
                      "models": [remote_model(fake_provider, "m", "gpt-4o")]})
    client(gateway.base_url).chat.completions.create(model="m", messages=USER)
    assert httpx2.get(f"{gateway.base_url}/metrics").status_code == 404, "not on the API port any more"
    url = f"http://127.0.0.1:{port}/metrics"
    refused = httpx2.get(url)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert httpx2.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    auth = {"Authorization": "Bearer scrape-secret"}
    text = httpx2.get(url, headers=auth)
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
    assert _value(text.text, "helios_requests_total", model="m", status="200") == 1
    om = httpx2.get(url, headers={**auth, "Accept": "application/openmetrics-text;version=1.0.0"})
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert om.text.rstrip().endswith("# EOF")
    assert "scrape-secret" not in gateway.logs()


def test_same_port_token(helios: HeliosFactory, fake_provider: FakeProvider) -> None:
    gateway = helios({"metrics": {"bearer_token": "scrape-secret"},
                      "models": [remote_model(fake_provider, "m", "gpt-4o")]})
    assert httpx2.get(f"{gateway.base_url}/metrics").status_code == 401
    ok = httpx2.get(f"{gateway.base_url}/metrics", headers={"Authorization": "Bearer scrape-secret"})
    assert ok.status_code == 200 and "helios_build_info" in ok.text
