"""Configuration sources, authentication and process lifecycle, with the gateway as a real process."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

from tests.e2e.gateway import client, eventually, stream_payloads, validated_chunks
from tests.support.fake_provider import FakeProvider, remote_model
from tests.support.fixtures import HeliosFactory
from tests.support.forward_proxy import ForwardProxy
from tests.support.openapi import validate
from tests.support.server import run_cli
from tests.support.tls import make_private_ca

USER = [{"role": "user", "content": "hi"}]


def test_auth_required_when_keys_are_set(helios: HeliosFactory, fake_provider: FakeProvider) -> None:
    gateway = helios({"auth": {"api_keys": ["sk-team-a", "sk-team-b"]},
                      "models": [remote_model(fake_provider, "m", "gpt-4o")]})
    missing = httpx2.get(f"{gateway.base_url}/v1/models")
    assert missing.status_code == 401
    validate("ErrorResponse", missing.json())
    assert missing.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(gateway.base_url, api_key="sk-team-c").chat.completions.create(model="m", messages=USER)
    assert client(gateway.base_url, api_key="sk-team-b").chat.completions.create(model="m", messages=USER)
    # Probes stay open for orchestrators that cannot hold keys.
    assert httpx2.get(f"{gateway.base_url}/health").status_code == 200
    assert httpx2.get(f"{gateway.base_url}/ready").status_code == 200
    assert "sk-team" not in gateway.logs()


def test_env_overrides_toml_and_secrets_file_supplies_keys(
    helios: HeliosFactory, fake_provider: FakeProvider, tmp_path: Path
) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "helios_auth__api_keys").write_text('["sk-from-secret-file"]')
    key_file = tmp_path / "upstream.key"
    key_file.write_text("sk-upstream-from-file\n")
    model = remote_model(fake_provider, "m", "gpt-4o")
    del model["api_key"]
    model["api_key_file"] = str(key_file)
    gateway = helios(
        {"server": {"log_format": "json"}, "models": [model]},
        env={"HELIOS_SERVER__LOG_FORMAT": "text", "HELIOS_SECRETS_DIR": str(secrets)},
    )
    oa = client(gateway.base_url, api_key="sk-from-secret-file")
    oa.chat.completions.create(model="m", messages=USER)
    assert fake_provider.requests[-1].headers["authorization"] == "Bearer sk-upstream-from-file"
    with pytest.raises(openai.AuthenticationError):
        client(gateway.base_url, api_key="wrong").models.list()
    # log_format=text from the environment beat json from the TOML file.
    assert not gateway.logs().lstrip().startswith("{")
    assert "sk-from-secret-file" not in gateway.logs()


def test_print_config_masks_secrets(tmp_path: Path, fake_provider: FakeProvider) -> None:
    model = remote_model(fake_provider, "m", "gpt-4o")
    result = run_cli(["--print-config"], {"auth": {"api_keys": ["sk-very-secret"]}, "models": [model]},
                     env={"HELIOS_SERVER__PORT": "9123"})
    assert result.returncode == 0, result.stderr
    assert "sk-very-secret" not in result.stdout and "sk-upstream-secret" not in result.stdout
    assert "port = 9123" in result.stdout
    assert '"**********"' in result.stdout


@pytest.mark.parametrize(
    ("config", "env", "expected"),
    [
        ({"server": {"prot": 1}}, {}, "server.prot: unknown setting (source: config file"),
        ({"server": {"port": "high"}}, {}, "server.port: "),
        ({}, {"HELIOS_SERVER__PORT": "99999"}, "(source: environment variable HELIOS_SERVER__PORT)"),
        ({"models": [{"name": "a", "backend": "openai"}, {"name": "a", "backend": "openai"}]}, {},
         "model name 'a' is already used"),
        ({"models": [{"name": "a", "backend": "carrier-pigeon"}]}, {}, "unknown backend 'carrier-pigeon'"),
        ({"models": [{"name": "a", "backend": "openai", "api_key_file": "/nonexistent/key"}]}, {},
         "models[0]: cannot read api_key_file '/nonexistent/key'"),
        ({"endpoints": [{"method": "TRACE", "path": "/x"}]}, {}, "endpoints[0].method"),
        ({"endpoints": [{"method": "GET", "path": "/v1/models"}]}, {}, "collides with a built-in route"),
        ({"endpoints": [{"method": "POST", "path": "/health"}]}, {}, "collides with a built-in route"),
    ],
)
def test_bad_configuration_stops_startup_with_one_line(
    config: dict[str, Any], env: dict[str, str], expected: str
) -> None:
    result = run_cli([], config, env=env, timeout=20)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("helios-serve: configuration error: ")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr


def test_sigterm_drains_an_inflight_stream(helios: HeliosFactory, fake_provider: FakeProvider) -> None:
    gateway = helios({"server": {"graceful_timeout": 20},
                      "models": [remote_model(fake_provider, "slow", "slow-chunks-100")]})
    oa = client(gateway.base_url)
    result: dict[str, Any] = {}

    def consume() -> None:
        try:
            result["payloads"] = stream_payloads(oa, model="slow", messages=USER, max_tokens=20)
        except Exception as exc:  # reported by the assertion below
            result["error"] = exc

    reader = threading.Thread(target=consume)
    reader.start()
    eventually(lambda: any(s.model == "slow-chunks-100" for s in fake_provider.streams), 10, "the stream")
    time.sleep(0.3)
    started = time.monotonic()
    exit_code = gateway.terminate(signal.SIGTERM, timeout=30)
    reader.join(30)
    assert "error" not in result, result.get("error")
    chunks = validated_chunks(result["payloads"])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert exit_code == 0
    assert time.monotonic() - started >= 1.0, "the stream needed ~2 s; the process must have waited for it"
    # New connections were refused once draining began.
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(f"{gateway.base_url}/health", timeout=2)


def test_provider_calls_honour_the_proxy_environment(helios: HeliosFactory, fake_provider: FakeProvider) -> None:
    """An egress proxy named by HTTP(S)_PROXY carries the provider calls, streams included; NO_PROXY exempts."""
    inherited: dict[str, str | None] = {name: None for name in
                                        ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy",
                                         "https_proxy", "all_proxy", "no_proxy")}
    models = {"models": [remote_model(fake_provider, "m", "gpt-4o")]}
    with ForwardProxy() as proxy:
        proxied = helios(models, env={**inherited, "HTTP_PROXY": proxy.url})
        oa = client(proxied.base_url)
        assert oa.chat.completions.create(model="m", messages=USER).choices[0].message.content
        assert validated_chunks(stream_payloads(oa, model="m", messages=USER))
        assert proxy.targets == [f"{fake_provider.base_url}/chat/completions"] * 2

        direct = helios(models, env={**inherited, "HTTP_PROXY": proxy.url, "NO_PROXY": "127.0.0.1"})
        client(direct.base_url).chat.completions.create(model="m", messages=USER)
        assert len(proxy.targets) == 2, "NO_PROXY must keep the call off the proxy"


def test_tls_provider_with_a_private_ca(helios: HeliosFactory, tmp_path: Path) -> None:
    """An HTTPS provider whose certificate comes from a private CA: trusted through SSL_CERT_FILE, refused
    (502, not a timeout or a 500) without it."""
    ca = make_private_ca(tmp_path / "tls")
    with FakeProvider(ssl_context=ca.server_context()) as provider:
        assert provider.base_url.startswith("https://")
        models = {"models": [remote_model(provider, "m", "gpt-4o")]}
        trusting = helios(models, env={"SSL_CERT_FILE": str(ca.ca_file), "SSL_CERT_DIR": None})
        oa = client(trusting.base_url)
        assert oa.chat.completions.create(model="m", messages=USER).choices[0].message.content
        assert validated_chunks(stream_payloads(oa, model="m", messages=USER))
        assert provider.request_count() == 2

        untrusting = helios(models, env={"SSL_CERT_FILE": None, "SSL_CERT_DIR": None})
        with pytest.raises(openai.InternalServerError) as refused:
            client(untrusting.base_url).chat.completions.create(model="m", messages=USER)
        assert refused.value.status_code == 502
        error = refused.value.response.json()
        validate("ErrorResponse", error)
        assert error["error"]["code"] == "bad_gateway"
        assert "Certificate" in error["error"]["message"] or "SSL" in error["error"]["message"]
        assert provider.request_count() == 2, "no request may reach a provider whose certificate was refused"


def test_keep_alive_connections_carry_the_configured_number_of_requests(
    helios: HeliosFactory, fake_provider: FakeProvider
) -> None:
    gateway = helios({"server": {"keep_alive_max_requests": 3},
                      "models": [remote_model(fake_provider, "m", "gpt-4o")]})
    with httpx2.Client(base_url=gateway.base_url, timeout=30) as http:
        closes = [http.get("/v1/models").headers.get("connection") for _ in range(4)]
    # The third request on the connection is its last; the client then opens a new one.
    assert closes == [None, None, "close", None]
