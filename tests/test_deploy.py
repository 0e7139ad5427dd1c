"""Deployment artefacts (Dockerfile, deploy/**) agree with the gateway: ports, paths, metrics, config."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
import pytest
import yaml

import gateway.metrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboard.json"
CONFIG_IN_IMAGE = "/etc/gateway/gateway.yaml"
ADMIN_PATHS = {"/healthz", "/readyz", "/metrics"}
METRIC_RE = re.compile(r"\bgateway_[a-z_]+")

# The environment the deploy configs read (${REDIS_URL}, ${GATEWAY_KEY_STORE}).
CONFIG_ENV = {"REDIS_URL": "redis://127.0.0.1:6379/0"}


# ----- helpers ---------------------------------------------------------------------------------


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _k8s() -> dict[tuple[str, str], dict[str, Any]]:
    """Every Kubernetes object under deploy/kubernetes by (kind, name)."""
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in _docs(path):
            if doc.get("kind") == "Kustomization":
                continue
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objects, f"{key} defined twice"
            objects[key] = doc
    return objects


def _gateway_yaml() -> str:
    return str(_k8s()[("ConfigMap", "gateway-config")]["data"]["gateway.yaml"])


def _gateway_cfg() -> dict[str, Any]:
    cfg = yaml.safe_load(_gateway_yaml())
    assert isinstance(cfg, dict)
    return cfg


def _listen_port(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


def _duration(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    assert m, text
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def _container(name: str = "gateway") -> dict[str, Any]:
    pod = _k8s()[("Deployment", "gateway")]["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == name)


def _port_number(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    return next(int(p["containerPort"]) for p in container["ports"] if p["name"] == port)


def _labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _exported_families() -> dict[str, set[str]]:
    """For each metric object in gateway.metrics, the exact sample names /metrics can carry."""
    families: dict[str, set[str]] = {}
    for obj in vars(gateway.metrics).values():
        if isinstance(obj, type) or not callable(getattr(obj, "describe", None)):
            continue
        for family in obj.describe():
            suffixes = {
                "counter": ("_total", "_created"),
                "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("_sum", "_count", "_created"),
            }.get(family.type, ("",))
            families[family.name] = {family.name + s for s in suffixes}
    assert len(families) >= 13, families  # the import found the metric objects
    return families


def _exported_sample_names() -> set[str]:
    return set().union(*_exported_families().values())


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("promtool missing in CI: .ci/run installs the Debian package `prometheus`")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return path


def _run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([_promtool(), *args], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert proc.returncode == 0, f"promtool {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def _dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def _dashboard_panels() -> Iterator[dict[str, Any]]:
    for panel in _dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in _dashboard_panels() for t in p.get("targets", [])]
    for var in _dashboard()["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


# ----- every file parses ------------------------------------------------------------------------


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_under_deploy_parses(path: Path) -> None:
    docs = _docs(path)
    assert docs, f"{path} is empty"
    assert all(isinstance(d, dict) for d in docs)


def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk - {"secret-signing-keys.example.yaml"}
    assert all("namespace" not in d["metadata"] for d in _k8s().values()), "manifests stay namespace-less"


# ----- Dockerfile -------------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, args = line.partition(" ")
            out.append((instr.upper(), args.strip()))
    return out


def test_dockerfile_slim_base_non_root_entrypoint_and_healthcheck() -> None:
    instructions = _dockerfile()
    froms = [a for i, a in instructions if i == "FROM"]
    assert froms and re.fullmatch(r"python:3\.11[\w.-]*-slim[\w.-]*( AS \w+)?", froms[-1], re.I), froms

    users = [a for i, a in instructions if i == "USER"]
    assert users, "no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), "the final USER must not be root"
    assert user == "10001", "Kubernetes runAsUser (10001) must be the image's user"

    entrypoint = json.loads(next(a for i, a in reversed(instructions) if i == "ENTRYPOINT"))
    assert entrypoint == ["gateway", "run", "-c", CONFIG_IN_IMAGE]

    health = next(a for i, a in instructions if i == "HEALTHCHECK")
    cmd = json.loads(health[health.index("CMD") + 3:].strip())
    assert cmd[0] == "python", "slim has no curl: the healthcheck uses python"
    assert "http://127.0.0.1:9090/healthz" in " ".join(cmd)

    exposed = {p for i, a in instructions if i == "EXPOSE" for p in a.split()}
    assert {"8080", "9090"} <= exposed
    env = " ".join(a for i, a in instructions if i == "ENV")
    assert "PYTHONUNBUFFERED=1" in env
    runs = " ".join(a for i, a in instructions if i == "RUN")
    assert re.search(r"pip install [^&]*\.(\s|$)", runs), "the project itself is pip-installed"
    copied = " ".join(a for i, a in instructions if i == "COPY")
    for needed in ("pyproject.toml", "README.md", "gateway/"):
        assert needed in copied


def test_healthcheck_command_is_valid_python() -> None:
    health = next(a for i, a in _dockerfile() if i == "HEALTHCHECK")
    cmd = json.loads(health[health.index("CMD") + 3:].strip())
    assert cmd[1] == "-c"
    compile(cmd[2], "<healthcheck>", "exec")


def test_dockerignore_keeps_the_context_small() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignored = {line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")}
    assert {".git", ".venv", "tests"} <= ignored
    assert not {"gateway", "pyproject.toml", "README.md"} & ignored


# ----- the ConfigMap's gateway.yaml is a valid config for the manifests ------------------------


def test_configmap_gateway_yaml_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.config import load

    for name, value in CONFIG_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("GATEWAY_KEY_STORE", str(tmp_path / "signing-keys.json"))
    path = tmp_path / "gateway.yaml"
    path.write_text(_gateway_yaml())
    cfg = load(path)
    assert (cfg.server.host, cfg.server.port) == ("0.0.0.0", 8080)
    assert (cfg.admin.host, cfg.admin.port) == ("0.0.0.0", 9090), "probes and Prometheus reach the admin port"
    assert cfg.revocation.backend == "redis"
    assert cfg.revocation.redis_url == CONFIG_ENV["REDIS_URL"], "redis_url comes from ${REDIS_URL}"
    assert cfg.internal_token is not None and cfg.internal_token.key_store == str(tmp_path / "signing-keys.json")
    assert len(cfg.routes) >= 2 and len(cfg.upstreams) >= 2 and len(cfg.issuers) >= 2


def test_configmap_gateway_yaml_passes_gateway_check(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(_gateway_yaml())
    env = {**os.environ, **CONFIG_ENV, "GATEWAY_KEY_STORE": str(tmp_path / "signing-keys.json")}
    proc = subprocess.run([sys.executable, "-m", "gateway", "check", "-c", str(path)],
                          capture_output=True, text=True, timeout=30, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("ok: "), proc.stdout


# ----- Kubernetes: every port, path and name agrees ---------------------------------------------


def test_deployment_ports_and_probes_match_the_gateway() -> None:
    cfg = _gateway_cfg()
    public, admin = _listen_port(cfg["server"]["listen"]), _listen_port(cfg["admin"]["listen"])
    assert (public, admin) == (8080, 9090)
    assert cfg["admin"]["listen"].startswith("0.0.0.0:")
    c = _container()
    assert {int(p["containerPort"]) for p in c["ports"]} == {public, admin}

    ready, live = c["readinessProbe"]["httpGet"], c["livenessProbe"]["httpGet"]
    assert ready["path"] == "/readyz" and _port_number(c, ready["port"]) == admin
    assert live["path"] == "/healthz" and _port_number(c, live["port"]) == admin
    for probe in (c.get("readinessProbe"), c.get("livenessProbe"), c.get("startupProbe")):
        if probe and "httpGet" in probe:
            assert probe["httpGet"]["path"] in ADMIN_PATHS


def test_deployment_replicas_resources_security_and_shutdown() -> None:
    deployment = _k8s()[("Deployment", "gateway")]
    assert deployment["spec"]["replicas"] == 3
    pod = deployment["spec"]["template"]["spec"]
    c = _container()
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind])

    security = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False

    # SIGTERM arrives after preStop; the pod must then have shutdown_grace to drain, plus a margin.
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    sleep = float(pre_stop[1])
    assert 3 <= sleep <= 15
    grace = _duration(_gateway_cfg()["server"].get("shutdown_grace", "20s"))
    assert pod["terminationGracePeriodSeconds"] > sleep + grace


def test_deployment_mounts_config_key_store_and_metrics_dir() -> None:
    pod = _k8s()[("Deployment", "gateway")]["spec"]["template"]["spec"]
    c = _container()
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in c["env"]}

    def file_source(path: str) -> tuple[dict[str, Any], str]:
        """The volume and the key within it that provide the file at `path` in the container."""
        for mount_path, mount in mounts.items():
            if path.startswith(mount_path.rstrip("/") + "/"):
                return volumes[mount["name"]], path[len(mount_path.rstrip("/")) + 1:]
        raise AssertionError(f"nothing mounted at {path}")

    config_volume, config_file = file_source(CONFIG_IN_IMAGE)
    assert config_volume["configMap"]["name"] == "gateway-config"
    items = {i["path"]: i["key"] for i in config_volume["configMap"].get("items", [])}
    assert items.get(config_file, config_file) == "gateway.yaml"

    key_volume, key_file = file_source(env["GATEWAY_KEY_STORE"])
    secret_name = key_volume["secret"]["secretName"]
    items = {i["path"]: i["key"] for i in key_volume["secret"].get("items", [])}
    example = _docs(K8S / "secret-signing-keys.example.yaml")[0]
    assert example["kind"] == "Secret" and example["metadata"]["name"] == secret_name
    assert items.get(key_file, key_file) in example["stringData"]

    assert env["REDIS_URL"], "REDIS_URL is set for ${REDIS_URL} in the config"
    redis = urlsplit(env["REDIS_URL"])
    service = _k8s()[("Service", redis.hostname or "")]
    assert redis.port in {p["port"] for p in service["spec"]["ports"]}
    redis_pod = _k8s()[("Deployment", redis.hostname or "")]["spec"]["template"]["metadata"]["labels"]
    assert _labels_match(service["spec"]["selector"], redis_pod)

    if int(_gateway_cfg()["server"].get("workers", 1)) > 1:
        # The worker supervisor makes a fresh multiprocess metrics directory under /tmp at each start;
        # a fixed PROMETHEUS_MULTIPROC_DIR would survive a container restart with stale gauge files.
        assert "PROMETHEUS_MULTIPROC_DIR" not in env
        assert "emptyDir" in volumes[mounts["/tmp"]["name"]], "a writable /tmp on the read-only root"


def test_services_select_the_pods_and_reach_the_right_ports() -> None:
    objects = _k8s()
    pod_labels = objects[("Deployment", "gateway")]["spec"]["template"]["metadata"]["labels"]
    c = _container()
    public, admin = objects[("Service", "gateway")], objects[("Service", "gateway-admin")]
    for service in (public, admin):
        assert _labels_match(service["spec"]["selector"], pod_labels)
    assert [(p["port"], _port_number(c, p["targetPort"])) for p in public["spec"]["ports"]] == [(80, 8080)]
    assert [(p["port"], _port_number(c, p["targetPort"])) for p in admin["spec"]["ports"]] == [(9090, 9090)]
    assert admin["spec"].get("type", "ClusterIP") == "ClusterIP", "the admin port is never public"


def test_hpa_pdb_and_servicemonitor_point_at_the_gateway() -> None:
    objects = _k8s()
    deployment = objects[("Deployment", "gateway")]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]

    hpa = objects[("HorizontalPodAutoscaler", "gateway")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"}
    assert hpa["spec"]["minReplicas"] == deployment["spec"]["replicas"] == 3
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"])

    pdb = objects[("PodDisruptionBudget", "gateway")]
    assert pdb["apiVersion"] == "policy/v1"
    assert _labels_match(pdb["spec"]["selector"]["matchLabels"], pod_labels)

    monitor = objects[("ServiceMonitor", "gateway")]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selected = [s for (kind, _), s in objects.items()
                if kind == "Service" and _labels_match(monitor["spec"]["selector"]["matchLabels"],
                                                       s["metadata"].get("labels", {}))]
    assert [s["metadata"]["name"] for s in selected] == ["gateway-admin"]
    port_names = {p["name"]: p for p in selected[0]["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names and endpoint["path"] in ADMIN_PATHS
        assert _port_number(_container(), port_names[endpoint["port"]]["targetPort"]) == 9090


def test_prometheus_scrape_job_targets_the_admin_port() -> None:
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "gateway")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    for sd in job["dns_sd_configs"]:
        assert sd["port"] == 9090
        assert all(name.split(".")[0] == "gateway-admin" for name in sd["names"])


# ----- Prometheus rules -------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    out = _run_promtool("check", "rules", "deploy/prometheus/alerts.yml")
    assert "SUCCESS" in out.stdout + out.stderr


def test_promtool_alert_unit_tests() -> None:
    _run_promtool("test", "rules", "deploy/prometheus/alerts_test.yml")


def test_promtool_check_config() -> None:
    _run_promtool("check", "config", "deploy/prometheus/prometheus.yml")


def test_alerts_cover_the_operational_failures_with_severity_and_text() -> None:
    rules = _alert_rules()
    exprs = {r["alert"]: r["expr"] for r in rules}
    assert re.search(r'gateway_requests_total\{status=~"5\.\."\}', exprs["GatewayHigh5xxRatio"])
    assert "gateway_auth_failures_total" in exprs["GatewayAuthFailureSpike"]
    assert re.search(r"gateway_circuit_state\)?\s*>=\s*1", exprs["GatewayCircuitBreakerOpen"])
    assert re.search(r"gateway_revocation_backend_up\s*==\s*0", exprs["GatewayRevocationBackendDown"])
    assert 'gateway_jwks_refresh_total{result="error"}' in exprs["GatewayJWKSRefreshFailing"]
    assert 'result="ok"' in exprs["GatewayJWKSRefreshFailing"]
    assert 'increase(gateway_config_reloads_total{result="error"}' in exprs["GatewayConfigReloadFailed"]
    for rule in rules:
        assert "for" in rule, rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_alert_expressions_name_only_exported_metrics() -> None:
    exported = _exported_sample_names()
    for rule in _alert_rules():
        names = set(METRIC_RE.findall(rule["expr"]))
        assert names, rule["alert"]
        assert names <= exported, f"{rule['alert']}: {names - exported}"


# ----- Grafana dashboard ------------------------------------------------------------------------


def test_dashboard_is_a_grafana_dashboard() -> None:
    dash = _dashboard()
    assert dash["schemaVersion"] >= 36 and dash["title"] and dash["uid"]
    panels = list(_dashboard_panels())
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 10
    for p in graphs:
        assert p["title"] and p.get("description"), p["id"]
        assert p["targets"] and all(t["expr"].strip() and t["refId"] for t in p["targets"]), p["title"]
        pos = p["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, p["title"]


def test_dashboard_queries_name_only_exported_metrics_and_show_them_all() -> None:
    exported = _exported_sample_names()
    used: set[str] = set()
    for expr in _dashboard_exprs():
        names = set(METRIC_RE.findall(expr))
        assert names <= exported, f"{expr}: {names - exported}"
        used |= names
    not_shown = {name for name, samples in _exported_families().items() if not samples & used}
    assert not not_shown, f"metrics without a panel: {not_shown}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query as a recording rule, Grafana's variables replaced by values."""
    substitutions = {"$__rate_interval": "5m", "$__interval": "1m", "$route": ".*"}
    rules = []
    for i, expr in enumerate(_dashboard_exprs()):
        if expr.startswith("label_values("):
            continue  # a Grafana templating function, not PromQL
        for var, value in substitutions.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    _run_promtool("check", "rules", str(path))


# ----- docker compose ---------------------------------------------------------------------------


def test_compose_wires_gateway_redis_and_sample_services(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.config import load

    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    gw = services["gateway"]
    assert gw["build"]["context"] == ".." and (DEPLOY / gw["build"]["context"] / gw["build"]["dockerfile"]).is_file()
    mounts = {v.split(":")[1]: v.split(":")[0] for v in gw["volumes"]}
    config_path = DEPLOY / mounts[CONFIG_IN_IMAGE]

    monkeypatch.setenv("GATEWAY_KEY_STORE", str(tmp_path / "signing-keys.json"))
    monkeypatch.setenv("REDIS_URL", gw["environment"]["REDIS_URL"])
    cfg = load(config_path)
    published = {int(p.split(":")[1]) for p in gw["ports"]}
    assert {cfg.server.port, cfg.admin.port} <= published
    assert cfg.admin.host == "0.0.0.0"
    assert urlsplit(cfg.revocation.redis_url).hostname in services
    for upstream in cfg.upstreams.values():
        for target in upstream.targets:
            host = urlsplit(target).hostname
            assert host in services, f"{target} is not a compose service"
            assert str(urlsplit(target).port) == services[host]["environment"]["PORT"]
    for issuer in cfg.issuers:
        host = urlsplit(issuer.issuer).hostname
        assert host in services and services[host]["environment"]["ISSUER_URL"] == issuer.issuer
    for name, service in services.items():
        for arg in service.get("entrypoint", []):
            if arg.startswith("/opt/compose/"):
                assert (DEPLOY / "compose" / arg.removeprefix("/opt/compose/")).is_file(), name


def _start_script(script: str, env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, str(DEPLOY / "compose" / script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HOST": "127.0.0.1", "PORT": "0", **env})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.match(r"listening on (http://127\.0\.0\.1:\d+)", line)
    if not m:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"{script} did not start: {line!r} {err}")
    return proc, m.group(1)


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)


def _get_json(url: str, headers: dict[str, str] | None = None) -> Any:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as resp:
        assert resp.status == 200
        return json.loads(resp.read())


def test_compose_sample_services_run_and_issue_verifiable_tokens() -> None:
    """The compose issuer and echo service really work: discovery, JWKS, a token that verifies."""
    # The issuer's `iss` is its in-network URL; here the test reaches it on 127.0.0.1 by path.
    issuer, issuer_base = _start_script("dev_issuer.py", {"ISSUER_URL": "http://issuer:9000/realms/dev"})
    try:
        echo, echo_base = _start_script("echo_service.py", {"SERVICE_NAME": "orders"})
        try:
            discovery = _get_json(f"{issuer_base}/realms/dev/.well-known/openid-configuration")
            assert discovery["issuer"] == "http://issuer:9000/realms/dev"
            jwks_path = urlsplit(discovery["jwks_uri"]).path
            jwks = _get_json(issuer_base + jwks_path)
            minted = _get_json(f"{issuer_base}/realms/dev/token?sub=alice&scope=orders:read&tenant_id=acme")
            token = minted["access_token"]
            kid = jwt.get_unverified_header(token)["kid"]
            jwk = next(k for k in jwks["keys"] if k["kid"] == kid)
            claims = jwt.decode(token, jwt.PyJWK(jwk).key, algorithms=["RS256"],
                                audience="https://api.example.com", issuer="http://issuer:9000/realms/dev")
            assert (claims["sub"], claims["scope"], claims["tenant_id"]) == ("alice", "orders:read", "acme")

            seen = _get_json(f"{echo_base}/tenants/acme/orders/42?x=1", headers={"X-Auth-Subject": "alice"})
            assert seen["service"] == "orders" and seen["path"] == "/tenants/acme/orders/42"
            assert seen["query"] == "x=1" and seen["headers"]["X-Auth-Subject"] == "alice"
        finally:
            _stop(echo)
    finally:
        _stop(issuer)


def test_readme_covers_rollout_scaling_keys_and_redis() -> None:
    text = (DEPLOY / "README.md").read_text()
    for needed in ("rollout", "HorizontalPodAutoscaler", "workers", "keys rotate", "Sentinel", "REDIS_URL",
                   "promtool"):
        assert needed in text, needed
    # Every command line the README shows for kubectl/promtool names files that exist.
    for line in text.splitlines():
        for word in shlex.split(line, comments=False, posix=True) if line.strip().startswith(
                ("kubectl apply", "promtool")) else []:
            if word.startswith("deploy/"):
                assert (ROOT / word).exists(), word
