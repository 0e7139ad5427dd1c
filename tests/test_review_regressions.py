"""Review of the day's fixes: holes found in them, each with the case that showed it, against real parts."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from gateway.devissuer import DevIssuer
from tests.support.gateway import ROOT, GatewayProcess, eventually
from tests.test_resilience_e2e import MakeUpstream, process_ports, public_routes, upstream_yaml
from tests.test_resilience_e2e import gateway_yaml as full_yaml

# -- --workers N: a signal to the supervisor's whole process group --------------------------------------------


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_a_stop_signal_to_the_whole_process_group_drains_each_worker_once(
        issuer: DevIssuer, make_upstream: MakeUpstream, tmp_path: Path, sig: signal.Signals) -> None:
    # Ctrl-C in a terminal (or `kill -- -PGID`) signals every process of the group: each worker got the
    # signal directly and again from the supervisor, took the second for "cut the drain short" and cut
    # the requests in flight (exit 0, but every client's answer lost).
    slow = await make_upstream()
    slow.set_mode("slow", delay=1.5)
    ports = process_ports()
    path = tmp_path / "gateway.yaml"
    path.write_text(full_yaml(issuer.url, [upstream_yaml("slow", slow.url)], public_routes("slow"), **ports))
    port, admin_port = (int(ports[k].rsplit(":", 1)[1]) for k in ("listen", "admin_listen"))
    gw = GatewayProcess(path, port=port, admin_port=admin_port)
    with gw.out.open("wb") as out, gw.err.open("wb") as err:
        # A session (and so a process group) of its own: the group signal must not reach pytest.
        gw.proc = subprocess.Popen(  # noqa: S603 - our argv
            [sys.executable, "-m", "gateway", "run", "-c", str(path), "--workers", "2"], stdout=out, stderr=err,
            cwd=ROOT, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        await gw.wait_ready()
        workers = _children(gw.proc.pid)
        assert len(workers) == 2
        assert all(os.getpgid(w) != os.getpgid(gw.proc.pid) for w in workers)
        async with aiohttp.ClientSession() as session:
            requests = [asyncio.ensure_future(session.get(gw.url + f"/slow/{i}")) for i in range(4)]
            await eventually(lambda: asyncio.sleep(0, slow.hits == 4), timeout=3)
            os.killpg(gw.proc.pid, sig)
            for request in requests:
                async with await request as r:
                    assert r.status == 200
        assert await asyncio.to_thread(gw.proc.wait, 10) == 0
        assert "while draining" not in gw.err.read_text()
    finally:
        if gw.proc.poll() is None:
            os.killpg(gw.proc.pid, signal.SIGKILL)
            gw.proc.wait()
