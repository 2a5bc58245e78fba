"""The deployment files, checked without Docker, a cluster or the network.

``docker-compose.yml`` against the Compose Specification schema vendored by check-jsonschema, the
Kubernetes manifests with kubernetes-validate (strict) and the KEDA ScaledObjects against a small
schema written here, the Grafana dashboard's PromQL against the metric names the workers export,
and all of them against the application itself: every command they run must parse as a real
``tierq`` command and every ``--tier`` must name a tier of the default tier table.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import typer.main
import yaml
from check_jsonschema.builtin_schemas import get_builtin_schema

from tierq.contract.tiers import TierTable, load_tier_table
from tierq.ops.cli import cli

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DASHBOARD = DEPLOY / "grafana" / "tierq-dashboard.json"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"

#: the oldest Kubernetes minor the manifests must be valid for, and the newest schemas shipped
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
KEDA_API = "keda.sh/v1alpha1"
KEDA_KINDS = {"ScaledObject", "ScaledJob", "TriggerAuthentication", "ClusterTriggerAuthentication"}

#: every subcommand the deployment files may run
EXPECTED_COMMANDS = {"worker", "submit", "result", "tiers", "sim", "demo", "flower", "stats", "api"}
TIER_NAMES = ("fast", "standard", "slow")
METRICS_PORT = 9808
API_PORT = 8080

#: the metric names the workers export (histograms by base name)
METRIC_NAMES = {
    "celery_task_succeeded_total",
    "celery_task_failed_total",
    "celery_task_retried_total",
    "celery_task_runtime",
    "celery_queue_length",
    "tierq_queue_wait_seconds",
    "tierq_ttft_seconds",
    "tierq_job_duration_seconds",
    "tierq_output_tokens_per_second",
    "tierq_tokens_total",
    "tierq_cost_usd_total",
}
METRIC_RE = re.compile(r"\b(?:celery|tierq)_[a-z_]+")
HISTOGRAM_SUFFIX_RE = re.compile(r"_(?:bucket|sum|count)$")

# ---------------------------------------------------------------------------------------------
# helpers


@cache
def tier_table() -> TierTable:
    return load_tier_table(None)


@cache
def cli_commands() -> dict[str, Any]:
    """The ``tierq`` subcommands (click commands; typer may vendor its own click)."""
    group = typer.main.get_command(cli)
    commands = getattr(group, "commands", None)
    assert isinstance(commands, dict), "tierq.ops.cli:cli is not a command group"
    return dict(commands)


def check_tierq_argv(argv: list[str]) -> tuple[str, dict[str, Any]]:
    """Assert ``argv`` is ``tierq <real subcommand> <options that parse>``; return the subcommand
    and its parsed parameters."""
    assert argv[:1] == ["tierq"], f"not a tierq command: {argv}"
    assert len(argv) >= 2, f"no subcommand: {argv}"
    sub = argv[1]
    assert sub in EXPECTED_COMMANDS, f"unexpected subcommand {sub!r} in {argv}"
    commands = cli_commands()
    assert sub in commands, f"`tierq {sub}` is not a command of tierq.ops.cli: {sorted(commands)}"
    error = None
    try:
        ctx = commands[sub].make_context(f"tierq {sub}", list(argv[2:]))
    except Exception as exc:  # click's UsageError / BadParameter (from typer's click)
        error = exc.format_message() if hasattr(exc, "format_message") else repr(exc)
    assert error is None, f"`{shlex.join(argv)}` does not parse: {error}"
    with ctx:
        params = dict(ctx.params)
    for tier in params.get("tier") or ():
        assert tier in tier_table().tiers, f"{argv}: unknown tier {tier!r}"
    return sub, params


def parse_duration(value: str | int | float) -> float:
    """Seconds in a Compose duration (``90s``, ``1m30s``, ``31m``, ``1h``)."""
    if isinstance(value, int | float):
        return float(value)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|ns|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"not a duration: {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def deadline(tier: str) -> float:
    return tier_table().tiers[tier].deadline_s


@cache
def dockerfile_instructions() -> tuple[tuple[str, str], ...]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines = [
        ln for ln in DOCKERFILE.read_text(encoding="utf-8").splitlines() if not ln.lstrip().startswith("#")
    ]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    found = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, rest = line.strip().partition(" ")
            found.append((instruction.upper(), rest.strip()))
    return tuple(found)


def dockerfile(instruction: str) -> list[str]:
    return [rest for instr, rest in dockerfile_instructions() if instr == instruction]


@cache
def dockerfile_entrypoint() -> tuple[str, ...]:
    entrypoints = dockerfile("ENTRYPOINT")
    assert entrypoints, "Dockerfile has no ENTRYPOINT"
    return tuple(json.loads(entrypoints[-1]))


@cache
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def our_image_services() -> dict[str, dict[str, Any]]:
    """Compose services that run the project's image (built from the Dockerfile)."""
    return {name: svc for name, svc in compose()["services"].items() if "build" in svc}


def compose_argv(svc: dict[str, Any]) -> list[str]:
    def as_list(value: Any) -> list[str]:
        if value is None:
            return []
        return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]

    entrypoint = as_list(svc["entrypoint"]) if "entrypoint" in svc else list(dockerfile_entrypoint())
    return entrypoint + as_list(svc.get("command"))


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


@cache
def k8s_docs() -> tuple[tuple[str, dict[str, Any]], ...]:
    """(path relative to deploy/k8s, document) of every manifest, subfolders included."""
    paths = sorted(p for p in K8S.rglob("*") if p.suffix in {".yaml", ".yml"})
    assert paths, "no manifests under deploy/k8s"
    return tuple((str(p.relative_to(K8S)), doc) for p in paths for doc in load_yaml_docs(p))


def k8s_objects(kind: str, *, top_level_only: bool = False) -> dict[str, dict[str, Any]]:
    found = {}
    for path, doc in k8s_docs():
        if doc.get("kind") == kind and (not top_level_only or "/" not in path):
            found[doc["metadata"]["name"]] = doc
    return found


def worker_deployments() -> dict[str, dict[str, Any]]:
    """tier -> the Deployment running ``tierq worker`` for it."""
    found = {}
    for dep in k8s_objects("Deployment").values():
        for container in dep["spec"]["template"]["spec"]["containers"]:
            argv = [*container.get("command", []), *container.get("args", [])]
            if argv[:2] == ["tierq", "worker"]:
                found[argv[argv.index("--tier") + 1]] = dep
    return found


def container_env_names(dep: dict[str, Any]) -> set[str]:
    """Env var names a Deployment's first container gets, ConfigMap envFrom included."""
    container = dep["spec"]["template"]["spec"]["containers"][0]
    names = {e["name"] for e in container.get("env", [])}
    configmaps = k8s_objects("ConfigMap")
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            names |= set(configmaps[source["configMapRef"]["name"]]["data"])
    return names


def promql_exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in {"expr", "definition"} and isinstance(value, str):
                yield value
            elif key == "query" and isinstance(value, str | dict):
                yield value if isinstance(value, str) else value.get("query", "")
            else:
                yield from promql_exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from promql_exprs(item)


# ---------------------------------------------------------------------------------------------
# the application side of the contract


def test_cli_has_the_expected_commands() -> None:
    missing = EXPECTED_COMMANDS - set(cli_commands())
    assert not missing, f"the deployment files may run commands the CLI lacks: {sorted(missing)}"


def test_tier_table_has_the_deployed_tiers() -> None:
    tiers = tier_table().tiers
    assert set(TIER_NAMES) <= set(tiers)
    assert {t: tiers[t].queue for t in TIER_NAMES} == {t: f"tierq.{t}" for t in TIER_NAMES}


def test_exported_metric_names_match_the_dashboard_list(redis_url: str) -> None:
    from prometheus_client.metrics import MetricWrapperBase

    import tierq.observe.metrics as metrics

    exported = set()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            for family in value.describe():
                exported.add(family.name + "_total" if family.type == "counter" else family.name)
    # the queue depth is read from Redis at scrape time: collect it once, as a scrape does
    depth = metrics.QueueDepthCollector(redis_url, {"fast": "tierq.fast"})
    exported |= {family.name for family in depth.collect()}
    missing = METRIC_NAMES - exported
    assert not missing, f"the dashboard's metrics that no worker exports: {sorted(missing)}"


# ---------------------------------------------------------------------------------------------
# Dockerfile and .dockerignore


def test_dockerfile() -> None:
    args = dict(a.split("=", 1) for a in dockerfile("ARG") if "=" in a)
    froms = [f.split()[0] for f in dockerfile("FROM")]
    images = {args.get(f[2:-1], f) if f.startswith("${") else f for f in froms}
    assert images == {"python:3.11-slim"}
    assert dockerfile_entrypoint()[:1] == ("tierq",)
    env = " ".join(dockerfile("ENV")).split()
    assert "PYTHONUNBUFFERED=1" in env
    users = dockerfile("USER")
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    runs = " ".join(dockerfile("RUN"))
    installs = re.search(r"pip install (--\S+ )*'?\.(\[[a-z,]+\])?'?(\s|$)", runs)
    assert installs, "the project is not installed with pip"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    packages = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    copied = {src for c in dockerfile("COPY") if not c.startswith("--from") for src in c.split()[:-1]}
    for needed in ["pyproject.toml", "uv.lock", "README.md", *packages]:
        assert needed in copied, f"the Dockerfile does not copy {needed}"
    # no secret baked in
    for assignment in [*env, *dockerfile("ARG")]:
        name = assignment.split("=", 1)[0]
        assert not re.search(r"API_KEY|SECRET|PASSWORD|BASIC_AUTH|TOKEN", name, flags=re.I), name


def test_dockerignore_keeps_the_build_inputs() -> None:
    patterns = [
        ln.strip().rstrip("/")
        for ln in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    for excluded in (".venv", ".git", ".pytest_cache", "**/__pycache__", ".env"):
        assert excluded in patterns
    needs = (
        "pyproject.toml",
        "uv.lock",
        "README.md",
        "tierq",
        "tierq/ops/cli.py",
        "tierq/sim/catalogue.toml",
    )
    for needed in needs:
        hits = [p for p in patterns if not p.startswith("!") and fnmatch.fnmatch(needed, p)]
        assert not hits, f".dockerignore drops {needed} ({hits})"


# ---------------------------------------------------------------------------------------------
# docker-compose.yml


def test_compose_validates_against_the_compose_spec() -> None:
    schema = get_builtin_schema("vendor.compose-spec")
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)
    # the validation is not vacuous: an unknown service key is refused
    broken = json.loads(json.dumps(compose()))
    broken["services"]["redis"]["stop_grace"] = "1s"
    assert not validator.is_valid(broken)


def test_compose_has_the_services() -> None:
    doc = compose()
    assert "version" not in doc
    services = doc["services"]
    core = {"redis", "simulator", "worker-fast", "worker-standard", "worker-slow", "flower", "api"}
    assert core <= set(services)
    for name in core:
        assert "profiles" not in services[name], f"{name} must start by default"
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
    assert set(our_image_services()) == core - {"redis"}
    images = {svc["image"] for svc in our_image_services().values()}
    assert len(images) == 1, f"one image for every service: {images}"


def test_compose_redis() -> None:
    redis = compose()["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    command = redis["command"] if isinstance(redis["command"], list) else shlex.split(redis["command"])
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert any(str(v).endswith(":/data") for v in redis["volumes"])
    assert redis["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]


@pytest.mark.parametrize(
    "name", sorted(["simulator", "worker-fast", "worker-standard", "worker-slow", "flower", "api"])
)
def test_compose_service_runs_a_real_command(name: str) -> None:
    svc = compose()["services"][name]
    sub, params = check_tierq_argv(compose_argv(svc))
    expected = {"simulator": "sim", "flower": "flower", "api": "api"}.get(name, "worker")
    assert sub == expected
    if sub == "worker":
        assert params["tier"] == [name.removeprefix("worker-")]
        assert params["name"] is None, "the node name must stay <tier>@%h for the health check"
    if sub in {"sim", "flower", "api"}:
        assert params["address" if sub == "flower" else "host"] == "0.0.0.0"
    if sub == "api":
        assert params["port"] == API_PORT and not params["insecure_no_auth"]


@pytest.mark.parametrize("tier", TIER_NAMES)
def test_compose_worker(tier: str) -> None:
    svc = compose()["services"][f"worker-{tier}"]
    assert parse_duration(svc["stop_grace_period"]) > deadline(tier)
    assert svc.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    env = svc["environment"]
    assert env["TIERQ_BROKER_URL"] == "redis://redis:6379/0"
    assert env["TIERQ_METRICS_PORT"] == str(METRICS_PORT)
    assert env["TIERQ_LOG_FORMAT"] == "json"
    # the key is passed through from the environment, never written down
    assert env["ANTHROPIC_API_KEY"] is None
    assert re.fullmatch(r"\$\{\w+:-http://simulator:8765\}", env["ANTHROPIC_BASE_URL"])
    hc = svc["healthcheck"]
    assert hc["test"][0] == "CMD-SHELL"
    raw = hc["test"][1]
    assert "$$HOSTNAME" in raw, "escape $HOSTNAME as $$HOSTNAME, or compose substitutes it"
    argv = shlex.split(raw.replace("$$", "$"))
    assert argv[:5] == ["celery", "-A", "tierq.celery.app", "inspect", "ping"]
    assert argv[argv.index("-d") + 1] == f"{tier}@$HOSTNAME"
    assert parse_duration(hc["interval"]) >= 30, "the ping is costly: check rarely"
    assert parse_duration(hc["start_period"]) > 0


def test_compose_flower_requires_basic_auth() -> None:
    flower = compose()["services"]["flower"]
    auth = flower["environment"]["TIERQ_FLOWER_BASIC_AUTH"]
    assert re.fullmatch(r"\$\{TIERQ_FLOWER_BASIC_AUTH:\?[^}]+\}", auth), auth
    assert any(str(p).split(":")[-1] == "5555" for p in flower["ports"])
    # /metrics and /healthcheck skip auth: publish on loopback only
    assert all(str(p).startswith("127.0.0.1:") for p in flower["ports"])


def test_compose_api_requires_tokens() -> None:
    api = compose()["services"]["api"]
    tokens = api["environment"]["TIERQ_API_TOKENS"]
    assert re.fullmatch(r"\$\{TIERQ_API_TOKENS:\?[^}]+\}", tokens), tokens
    assert api["environment"]["TIERQ_BROKER_URL"] == "redis://redis:6379/0"
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert [str(p) for p in api["ports"]] == [f"127.0.0.1:{API_PORT}:{API_PORT}"]
    assert f"127.0.0.1:{API_PORT}/healthz" in api["healthcheck"]["test"][-1]


def test_compose_no_literal_secrets() -> None:
    for name, svc in compose()["services"].items():
        env = svc.get("environment") or {}
        assert isinstance(env, dict), f"{name}: use the mapping form for environment"
        for key, value in env.items():
            if re.search(r"API_KEY|BASIC_AUTH|TOKENS", key):
                assert value is None or str(value).startswith("${"), f"{name}: {key} is written down"


def test_compose_monitoring_files_exist() -> None:
    services = compose()["services"]
    mounts = [v for name in ("prometheus", "grafana") for v in services[name]["volumes"]]
    sources = [m.split(":")[0] for m in mounts if m.startswith("./")]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"compose mounts missing {source}"
    assert "./deploy/prometheus/prometheus.yml" in sources
    assert "./deploy/grafana/tierq-dashboard.json" in sources


# ---------------------------------------------------------------------------------------------
# Kubernetes


def is_keda(doc: dict[str, Any]) -> bool:
    return doc["apiVersion"] == KEDA_API and doc["kind"] in KEDA_KINDS


#: every manifest but the KEDA kinds (checked against SCALED_OBJECT_SCHEMA below)
CORE_DOCS = [(path, doc) for path, doc in k8s_docs() if not is_keda(doc)]


@pytest.mark.parametrize(
    "doc", [d for _, d in CORE_DOCS], ids=[f"{p}:{d['kind']}/{d['metadata']['name']}" for p, d in CORE_DOCS]
)
def test_k8s_manifest_validates(doc: dict[str, Any]) -> None:
    if doc["kind"] != "Namespace":
        assert doc["metadata"]["namespace"] == "tierq"
    for version in K8S_VERSIONS:
        error = None
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            error = f"Kubernetes {version}: {list(exc.absolute_path)}: {exc.message[:500]}"
        assert error is None, error


def test_k8s_validation_is_strict() -> None:
    dep = json.loads(json.dumps(next(iter(k8s_objects("Deployment").values()))))
    dep["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSIONS[0], strict=True)


def test_k8s_namespace_config_and_secret() -> None:
    assert "tierq" in k8s_objects("Namespace")
    config = k8s_objects("ConfigMap")["tierq-config"]["data"]
    assert config["TIERQ_BROKER_URL"].startswith("redis://")
    assert config["TIERQ_LOG_FORMAT"] == "json"
    assert config["TIERQ_METRICS_PORT"] == str(METRICS_PORT)
    secret = k8s_objects("Secret")["tierq-secrets"]
    assert set(secret["stringData"]) == {"ANTHROPIC_API_KEY", "TIERQ_FLOWER_BASIC_AUTH", "TIERQ_API_TOKENS"}
    assert all("REPLACE_ME" in v for v in secret["stringData"].values()), "placeholders only"
    # the template is not applied by `kubectl apply -f deploy/k8s/`, which would overwrite the real one
    assert not k8s_objects("Secret", top_level_only=True)
    assert not [d for p, d in k8s_docs() if "/" not in p and is_keda(d)]


@pytest.mark.parametrize("tier", TIER_NAMES)
def test_k8s_worker_deployment(tier: str) -> None:
    dep = worker_deployments()[tier]
    assert dep["metadata"]["name"] == f"tierq-worker-{tier}"
    pod = dep["spec"]["template"]
    spec = pod["spec"]
    assert spec["terminationGracePeriodSeconds"] > deadline(tier)
    (container,) = spec["containers"]
    sub, params = check_tierq_argv([*container["command"], *container["args"]])
    assert sub == "worker" and params["tier"] == [tier] and params["name"] is None
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
    assert {"name": "metrics", "containerPort": METRICS_PORT}.items() <= container["ports"][0].items()
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert {"TIERQ_BROKER_URL", "TIERQ_METRICS_PORT", "TIERQ_LOG_FORMAT"} <= container_env_names(dep)
    (key,) = [e for e in container["env"] if e["name"] == "ANTHROPIC_API_KEY"]
    assert key["valueFrom"]["secretKeyRef"] == {"name": "tierq-secrets", "key": "ANTHROPIC_API_KEY"}
    probes = [container[p] for p in ("startupProbe", "readinessProbe") if p in container]
    assert probes, "a startup or readiness probe is needed"
    for probe in probes:
        argv = probe["exec"]["command"]
        assert argv[:2] == ["sh", "-c"]
        ping = shlex.split(argv[2])
        assert ping[:5] == ["celery", "-A", "tierq.celery.app", "inspect", "ping"]
        assert ping[ping.index("-d") + 1] == f"{tier}@$HOSTNAME"
        assert probe["timeoutSeconds"] > float(ping[ping.index("--timeout") + 1])
    if "readinessProbe" in container:
        assert container["readinessProbe"]["periodSeconds"] >= 60
    if "livenessProbe" in container:
        assert container["livenessProbe"].get("periodSeconds", 10) >= 300, "no frequent liveness loop"


def test_k8s_every_deployment_outlives_its_deadline() -> None:
    for tier, dep in worker_deployments().items():
        assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > deadline(tier)
    assert set(worker_deployments()) == set(TIER_NAMES)


def test_k8s_flower() -> None:
    dep = k8s_objects("Deployment")["tierq-flower"]
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    sub, params = check_tierq_argv([*container["command"], *container["args"]])
    assert sub == "flower" and params["port"] == 5555 and not params["unauthenticated"]
    assert params["address"] == "0.0.0.0"
    (auth,) = [e for e in container["env"] if e["name"] == "TIERQ_FLOWER_BASIC_AUTH"]
    assert auth["valueFrom"]["secretKeyRef"] == {"name": "tierq-secrets", "key": "TIERQ_FLOWER_BASIC_AUTH"}
    service = k8s_objects("Service")["tierq-flower"]
    # /metrics and /healthcheck skip Flower's auth: the Service stays internal
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert service["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_k8s_api() -> None:
    dep = k8s_objects("Deployment")["tierq-api"]
    pod = dep["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    sub, params = check_tierq_argv([*container["command"], *container["args"]])
    assert sub == "api" and params["port"] == API_PORT and params["host"] == "0.0.0.0"
    assert not params["insecure_no_auth"]
    (tokens,) = [e for e in container["env"] if e["name"] == "TIERQ_API_TOKENS"]
    assert tokens["valueFrom"]["secretKeyRef"] == {"name": "tierq-secrets", "key": "TIERQ_API_TOKENS"}
    assert "TIERQ_BROKER_URL" in {e["name"] for e in container["env"]}
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert "httpGet" not in container["livenessProbe"], "a Redis outage must not restart the API"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(API_PORT)
    service = k8s_objects("Service")["tierq-api"]
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()


SCALED_OBJECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": KEDA_API},
        "kind": {"const": "ScaledObject"},
        "metadata": {
            "type": "object",
            "required": ["name", "namespace"],
            "properties": {"name": {"type": "string", "minLength": 1}, "namespace": {"const": "tierq"}},
        },
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers", "minReplicaCount", "maxReplicaCount"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string"},
                        "kind": {"const": "Deployment"},
                        "apiVersion": {"const": "apps/v1"},
                    },
                },
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "advanced": {"type": "object"},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": {"enum": ["redis", "rabbitmq"]},
                            # KEDA wants every metadata value as a string
                            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                        },
                        "allOf": [
                            {
                                "if": {"properties": {"type": {"const": "redis"}}},
                                "then": {
                                    "properties": {
                                        "metadata": {
                                            "required": ["listName", "listLength"],
                                            "properties": {"listLength": {"pattern": r"^[1-9]\d*$"}},
                                            "oneOf": [
                                                {"required": ["address"]},
                                                {"required": ["addressFromEnv"]},
                                            ],
                                        }
                                    }
                                },
                            },
                            {
                                "if": {"properties": {"type": {"const": "rabbitmq"}}},
                                "then": {
                                    "properties": {
                                        "metadata": {
                                            "required": ["queueName", "mode", "value", "hostFromEnv"],
                                            "properties": {
                                                "mode": {"const": "QueueLength"},
                                                "value": {"pattern": r"^[1-9]\d*$"},
                                            },
                                        }
                                    }
                                },
                            },
                        ],
                    },
                },
            },
            "additionalProperties": False,
        },
    },
}


def scaled_object_files() -> dict[str, list[dict[str, Any]]]:
    files: dict[str, list[dict[str, Any]]] = {}
    for path, doc in k8s_docs():
        if doc["kind"] == "ScaledObject":
            files.setdefault(path, []).append(doc)
    return files


def test_keda_scaled_objects() -> None:
    files = scaled_object_files()
    trigger_types = {d["spec"]["triggers"][0]["type"]: path for path, docs in files.items() for d in docs}
    assert set(trigger_types) == {"redis", "rabbitmq"}, "a Redis set and the RabbitMQ variant"
    deployments = k8s_objects("Deployment")
    queues = {t.queue: name for name, t in tier_table().tiers.items()}
    validator = jsonschema.Draft202012Validator(SCALED_OBJECT_SCHEMA)
    for path, docs in files.items():
        targets = []
        for so in docs:
            errors = list(validator.iter_errors(so))
            assert not errors, f"{path}: " + "; ".join(
                f"{list(e.absolute_path)}: {e.message}" for e in errors
            )
            spec = so["spec"]
            target = spec["scaleTargetRef"]["name"]
            assert target in deployments, f"{path}: no Deployment {target}"
            targets.append(target)
            tier = next(t for t, d in worker_deployments().items() if d["metadata"]["name"] == target)
            env = container_env_names(deployments[target])
            for trigger in spec["triggers"]:
                meta = trigger["metadata"]
                queue = meta["listName"] if trigger["type"] == "redis" else meta["queueName"]
                assert queues.get(queue) == tier, f"{path}: {target} scales on {queue!r}"
                for key, value in meta.items():
                    if key.endswith("FromEnv"):
                        assert value in env, f"{path}: {key}={value} is not in {target}'s env"
            assert spec["minReplicaCount"] <= spec["maxReplicaCount"]
            if tier == "fast":
                assert spec["minReplicaCount"] >= 1, "the fast tier never waits on a cold start"
        assert sorted(targets) == sorted(f"tierq-worker-{t}" for t in TIER_NAMES), path


# ---------------------------------------------------------------------------------------------
# Grafana and Prometheus


@cache
def dashboard() -> dict[str, Any]:
    doc = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def all_panels() -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def test_dashboard_shape() -> None:
    dash = dashboard()
    assert dash["schemaVersion"] >= 36 and dash["uid"] and dash["title"]
    panels = [p for p in all_panels() if p["type"] != "row"]
    assert len(panels) >= 8
    assert {p["type"] for p in panels} <= {"timeseries", "stat"}
    assert len({p["id"] for p in all_panels()}) == len(all_panels())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    datasource_vars = {
        n for n, v in variables.items() if v["type"] == "datasource" and v["query"] == "prometheus"
    }
    assert datasource_vars, "a templated Prometheus datasource"
    for panel in panels:
        assert panel["targets"], panel["title"]
        for node in [panel, *panel["targets"]]:
            uid = node["datasource"]["uid"]
            assert re.fullmatch(r"\$\{(\w+)\}", uid) and uid[2:-1] in datasource_vars, panel["title"]


def test_dashboard_uses_only_exported_metrics() -> None:
    exprs = list(promql_exprs(dashboard()))
    assert exprs
    used = set()
    for expr in exprs:
        used |= {HISTOGRAM_SUFFIX_RE.sub("", m) for m in METRIC_RE.findall(expr)}
    assert used <= METRIC_NAMES, f"unknown metrics: {sorted(used - METRIC_NAMES)}"
    # the per-tier panels the operators need
    joined = "\n".join(exprs)
    for needed in (
        r"histogram_quantile\(0\.95, sum by \(le, tier\) \(rate\(tierq_ttft_seconds_bucket",
        r"histogram_quantile\(0\.5, sum by \(le, tier\) \(rate\(tierq_ttft_seconds_bucket",
        r"histogram_quantile\(0\.95, sum by \(le, tier\) \(rate\(tierq_job_duration_seconds_bucket",
        r"histogram_quantile\(0\.95, sum by \(le, tier\) \(rate\(tierq_queue_wait_seconds_bucket",
        r"by \(tier\) \(celery_queue_length",
        r"rate\(celery_task_succeeded_total",
        r"rate\(celery_task_failed_total",
        r"rate\(tierq_tokens_total",
        r"rate\(tierq_cost_usd_total[^\n]*\* 3600",
    ):
        assert re.search(needed, joined), needed


def test_grafana_provisioning_matches_compose() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text(encoding="utf-8"))[
        "datasources"
    ]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "tierq.yml").read_text(encoding="utf-8"))[
        "providers"
    ]
    mounts = compose()["services"]["grafana"]["volumes"]
    (dash_mount,) = [m for m in mounts if m.startswith("./deploy/grafana/tierq-dashboard.json:")]
    target = dash_mount.split(":")[1]
    assert str(Path(target).parent) == provider["options"]["path"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


def test_prometheus_scrapes_the_workers() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    targets: set[str] = set()
    for job in config["scrape_configs"]:
        assert job["job_name"]
        for static in job.get("static_configs", []):
            targets |= set(static["targets"])
        for dns in job.get("dns_sd_configs", []):
            targets |= {f"{name}:{dns['port']}" for name in dns["names"]}
    workers = {f"worker-{t}:{METRICS_PORT}" for t in TIER_NAMES}
    assert workers <= targets
    services = set(compose()["services"])
    for target in targets:
        assert target.rsplit(":", 1)[0] in services, f"{target} is not a compose service"


def test_the_configuration_table_lists_every_setting() -> None:
    from pydantic import AliasChoices

    from tierq.core.settings import Settings

    table = (ROOT / "docs" / "running.md").read_text(encoding="utf-8").split("## Configuration", 1)[1]
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        names = alias.choices if isinstance(alias, AliasChoices) else [f"TIERQ_{name.upper()}"]
        assert any(f"`{env}`" in table for env in names), f"docs/running.md lacks {names[0]}"
