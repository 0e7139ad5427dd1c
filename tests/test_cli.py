"""The command line as an operator uses it: exit codes, one-line errors, the access matrix, explain, the demo."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.config import load
from gateway.devissuer import DevIssuer
from gateway.explain import explain
from tests.support.gateway import ROOT, GatewayProcess, config_text, free_port

EXAMPLE = str(ROOT / "config" / "gateway.yaml")


def gateway(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def test_check_ok_on_the_example() -> None:
    result = gateway("check", "-c", EXAMPLE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok: 4 routes, 2 upstreams, 2 issuers"


def test_check_reports_each_problem_with_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(EXAMPLE).read_text().replace("upstream: users\n    auth: {required: false}",
                                                     "upstream: billing\n    auth: {required: false}")
                   .replace("leeway: 30s", "leeway: soon"))
    result = gateway("check", "-c", str(bad))
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, result.stderr
    assert all(re.match(rf"^{re.escape(str(bad))}:\d+: [\w.\[\]]+: ", line) for line in lines), lines
    assert any("routes[0].upstream: unknown upstream 'billing'; known: orders, users" in line for line in lines)
    assert "Traceback" not in result.stderr


def test_check_loads_the_specs_example_and_warns_of_its_admin_issuer() -> None:
    spec = str(ROOT / "tests" / "support" / "spec_example.yaml")
    result = gateway("check", "-c", spec)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok: 1 routes, 1 upstreams, 1 issuers"
    assert result.stderr.strip().splitlines() == [
        f"{spec}: warning: admin.issuer: 'employees' is not a configured issuer; the admin API refuses every token "
        "(admin.issuer is 'employees' when unset)",
        f"{spec}: warning: routes[0].forward.scopes: read in token mode only; with identity: headers the upstream "
        "is told the token's own scopes"]


def test_debug_is_taken_before_or_after_the_command() -> None:
    for args in (("--debug", "check", "-c", EXAMPLE), ("check", "-c", EXAMPLE, "--debug")):
        result = gateway(*args)
        assert result.returncode == 0 and result.stdout.startswith("ok: "), (args, result.stderr)
    # Without --debug a failure is one line; with it, after the command as well, the traceback shows.
    env = {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}  # nothing listens there
    quiet = gateway("revoke", "jti", "x", "-c", EXAMPLE, env=env)
    loud = gateway("revoke", "jti", "x", "-c", EXAMPLE, "--debug", env=env)
    assert quiet.returncode == 1 and len(quiet.stderr.strip().splitlines()) == 1, quiet.stderr
    assert loud.returncode == 1 and "Traceback" in loud.stderr, loud.stderr


def test_usage_errors_exit_2_in_one_line() -> None:
    for args in (("bogus",), ("run", "--workers", "x"), ("run", "-c", EXAMPLE, "--workers", "100000000"),
                 ("run", "-c", EXAMPLE, "--workers", "0"), ("revoke", "token", "abc")):
        result = gateway(*args)
        assert result.returncode == 2, args
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_missing_file_exits_2() -> None:
    result = gateway("check", "-c", "/nonexistent/gateway.yaml")
    assert result.returncode == 2
    assert result.stderr.startswith("/nonexistent/gateway.yaml:1: (file): cannot read")


def test_routes_matrix_in_three_formats() -> None:
    table = gateway("routes", "-c", EXAMPLE)
    assert table.returncode == 0
    assert table.stdout.splitlines()[0].split()[:4] == ["ROUTE", "METHODS", "HOST", "PATH"]
    assert "orders-read" in table.stdout and "token(aud=orders-service" in table.stdout
    rows = json.loads(gateway("routes", "-c", EXAMPLE, "--format", "json").stdout)
    by_name = {r["route"]: r for r in rows}
    assert by_name["orders-read"]["scopes"] == ["orders:read"]
    assert by_name["orders-read"]["claims"] == {"tenant": "{path.tenant}"}
    assert by_name["health"]["auth"] == "public"
    # The config's own names too: name, auth_required, the forward mode apart from its audience and scopes.
    assert all(r["name"] == r["route"] for r in rows)
    assert by_name["health"]["auth_required"] is False and by_name["orders-read"]["auth_required"] is True
    assert by_name["orders-write"]["forward"] == "token"
    assert by_name["orders-write"]["forward_audience"] == "orders-service"
    assert by_name["orders-read"]["forward"] == "headers" and by_name["orders-read"]["forward_audience"] is None
    assert by_name["users"]["path_prefix"] == "/api/users/" and by_name["users"]["path"] == "/api/users/*"
    parsed = list(csv.DictReader(io.StringIO(gateway("routes", "-c", EXAMPLE, "--format", "csv").stdout)))
    assert [r["route"] for r in parsed] == ["health", "orders-read", "orders-write", "users"]


def test_routes_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    """`gateway routes | head -1`: the reader leaves before the matrix is written (more than a pipe holds):
    no error line, no traceback."""
    routes = "".join(f"  - name: r{i}\n    match:\n      path: /r{i}/{{id}}\n    upstream: orders\n"
                     f"    auth:\n      required: false\n" for i in range(600))
    cfg = tmp_path / "many.yaml"
    cfg.write_text(config_text("http://127.0.0.1:1", {"orders": ["http://127.0.0.1:2"]}, routes))
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "routes", "-c", str(cfg), "--format", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout is not None and proc.stderr is not None
    with proc.stdout, proc.stderr:
        assert proc.stdout.read(1) == b"["
        proc.stdout.close()
        err = proc.stderr.read()
    assert proc.wait(timeout=30) == 1
    assert err == b"", err


def test_explain_without_token() -> None:
    result = gateway("explain", "-c", EXAMPLE, "GET", "/api/tenants/acme/orders/9", "--host", "api.example.com")
    assert "route: orders-read" in result.stdout and "tenant=acme, id=9" in result.stdout
    assert "path sent: /tenants/acme/orders/9" in result.stdout
    nothing = gateway("explain", "-c", EXAMPLE, "GET", "/nowhere")
    assert nothing.returncode == 1 and "404 not_found" in nothing.stdout
    wrong = gateway("explain", "-c", EXAMPLE, "DELETE", "/health")
    assert "405 method_not_allowed" in wrong.stdout and "Allow: GET" in wrong.stdout


def test_explain_without_a_host_matches_host_bound_routes_and_names_their_host() -> None:
    """The SPEC's example route is bound to api.example.com: `explain GET PATH` (no --host) must still find
    it, say which host it needs, and a URL's host counts as --host; only a Host given and wrong misses."""
    bare = gateway("explain", "-c", EXAMPLE, "GET", "/api/tenants/acme/orders/9")
    assert "route: orders-read" in bare.stdout, bare.stdout
    assert "host api.example.com (not checked" in bare.stdout
    url = gateway("explain", "-c", EXAMPLE, "GET", "https://api.example.com/api/tenants/acme/orders/9?x=1")
    assert "route: orders-read" in url.stdout and "host api.example.com\n" in url.stdout, url.stdout
    assert "params: tenant=acme, id=9" in url.stdout
    other = gateway("explain", "-c", EXAMPLE, "GET", "http://other.example/api/tenants/acme/orders/9")
    assert other.returncode == 1 and "404 not_found" in other.stdout, other.stdout
    wrong = gateway("explain", "-c", EXAMPLE, "GET", "/api/tenants/acme/orders/9", "--host", "other.example")
    assert wrong.returncode == 1 and "404 not_found" in wrong.stdout


def test_explain_agrees_with_the_server_on_a_trailing_slash_and_a_bad_host() -> None:
    """`/x/` is not the route of `/x` (here no route claims it, as on the server: 404); a Host the server
    refuses before routing is explained as that 400, not as a route or a 404."""
    slash = gateway("explain", "-c", EXAMPLE, "GET", "https://api.example.com/api/tenants/acme/orders/9//")
    assert slash.returncode == 1 and "404 not_found" in slash.stdout and "route:" not in slash.stdout, slash.stdout
    for host in ("api.example.com..", "[api.example.com]"):
        bad = gateway("explain", "-c", EXAMPLE, "GET", "/api/tenants/acme/orders/9", "--host", host)
        assert bad.returncode == 1 and "400 invalid_request" in bad.stdout and "route:" not in bad.stdout, bad.stdout


@pytest.mark.timeout(60)
def test_demo_works_as_printed(tmp_path: Path) -> None:
    """Start `gateway demo`, run every curl line it prints, and check each answer."""
    ports = {name: free_port() for name in ("issuer", "orders", "users", "gw", "admin")}
    env = {**os.environ, "DEMO_ISSUER_PORT": str(ports["issuer"]), "DEMO_ORDERS_PORT": str(ports["orders"]),
           "DEMO_USERS_PORT": str(ports["users"]), "DEMO_LISTEN": f"127.0.0.1:{ports['gw']}",
           "DEMO_ADMIN_LISTEN": f"127.0.0.1:{ports['admin']}", "GATEWAY_KEY_STORE": str(tmp_path / "keys.json"),
           "PYTHONUNBUFFERED": "1"}
    env.pop("REDIS_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "demo"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if line.startswith("# more tokens"):
                break
        curls = [line for line in lines if line.startswith("curl ")]
        assert len(curls) >= 10, "\n".join(lines)
        statuses = []
        bodies = []
        for command in curls:
            out = subprocess.run(command + " --max-time 10", shell=True, capture_output=True, text=True, timeout=20)
            statuses.append(int(out.stdout.split()[1]))
            bodies.append(out.stdout)
        assert statuses[:9] == [200, 200, 401, 403, 404, 200, 201, 401, 200], statuses
        assert '"X-Auth-Subject": "alice"' in bodies[0] and '"Authorization"' not in bodies[0]
        assert '"Authorization": "Bearer ' in bodies[1]  # the internal token, token mode
        assert statuses[9:] == [200, 200, 200]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()
    assert proc.returncode == 0


async def test_explain_with_token_gives_each_rules_verdict(issuer: DevIssuer, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    routes = """\
  - name: orders
    match: {path: "/t/{tenant}/orders", methods: [GET]}
    upstream: svc
    auth: {scopes: [orders:read], roles: [clerk], claims: {tenant: "{path.tenant}"}}
"""
    path = tmp_path / "gw.yaml"
    path.write_text(config_text(issuer.url, {"svc": ["http://127.0.0.1:9"]}, routes))
    config = load(path)
    token = issuer.token({"scope": "orders:read", "roles": ["clerk"], "tenant_id": "acme"})
    assert await explain(config, "GET", "/t/acme/orders", "", token) == 0
    out = capsys.readouterr().out
    assert "PASS scopes" in out and "PASS roles" in out and "PASS claims.tenant" in out and "allowed" in out
    assert await explain(config, "GET", "/t/globex/orders", "", token) == 1
    out = capsys.readouterr().out
    assert "FAIL claims.tenant" in out and "403 insufficient_scope" in out
    assert await explain(config, "GET", "/t/acme/orders", "", issuer.token_alg_none()) == 1
    assert "refused (alg_not_allowed) -> 401 invalid_token" in capsys.readouterr().out


async def test_explain_says_when_an_unknown_kid_is_only_unfetched_keys(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """With the issuer unreachable, explain said `unknown_kid` as if the token's key were not the issuer's;
    it now says the keys could not be fetched."""
    gone = DevIssuer()
    await gone.start()
    token = gone.token({"scope": "orders:read"})
    path = tmp_path / "gw.yaml"
    path.write_text(config_text(gone.url, {"svc": ["http://127.0.0.1:9"]}, """\
  - name: orders
    match: {path: "/orders", methods: [GET]}
    upstream: svc
"""))
    await gone.stop()
    assert await explain(load(path), "GET", "/orders", "", token) == 1
    out = capsys.readouterr().out
    assert "token: refused (unknown_kid; but dev's keys could not be fetched" in out, out


async def test_run_raises_its_open_files_limit_to_the_hard_one(
        issuer: DevIssuer, gateway_processes: Any, tmp_path: Path) -> None:
    """Started with a soft RLIMIT_NOFILE of 256 (two sockets per proxied request: about 128 concurrent
    requests), `gateway run` raises it to the hard limit before serving, as HAProxy does by itself."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    want = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    assert want > 256
    port, admin_port = free_port(), free_port()
    routes = "  - name: open\n    match: {path_prefix: /}\n    upstream: up\n    auth: {required: false}\n"
    path = tmp_path / "gateway.yaml"
    path.write_text(config_text(issuer.url, {"up": ["http://127.0.0.1:9"]}, routes,
                                listen=f"127.0.0.1:{port}", admin_listen=f"127.0.0.1:{admin_port}"))
    gw = gateway_processes(GatewayProcess(path, port=port, admin_port=admin_port, open_files=256))
    await gw.wait_ready()
    limits = Path(f"/proc/{gw.proc.pid}/limits").read_text().splitlines()
    (line,) = [text for text in limits if text.startswith("Max open files")]
    assert line.split()[3] == str(want), line
