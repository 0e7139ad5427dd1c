"""Bodies are streamed both ways, never buffered whole: 200 MB through a `gateway run` process, memory measured."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from gateway.devissuer import DevIssuer
from tests.support.gateway import GatewayProcess, config_text, free_port
from tests.support.upstreams import EchoUpstream

ROUTES = """\
  - name: upload
    match: {path: /upload, methods: [POST]}
    upstream: store
  - name: download
    match: {path_prefix: /_bytes/, methods: [GET]}
    upstream: store
"""
SIZE = 200 * 1024 * 1024


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


async def test_200mb_request_body_streams_with_bounded_memory(
        issuer: DevIssuer, echo_upstream: EchoUpstream, gateway_processes: Any, tmp_path: Path) -> None:
    port, admin = free_port(), free_port()
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(config_text(issuer.url, {"store": [echo_upstream.url]}, ROUTES,
                               listen=f"127.0.0.1:{port}", admin_listen=f"127.0.0.1:{admin}"))
    gw: GatewayProcess = gateway_processes(GatewayProcess(cfg, port=port, admin_port=admin))
    await gw.wait_ready()
    assert gw.proc is not None
    token = issuer.token({"sub": "alice"})
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/upload", data=b"warm-up", headers=headers) as r:  # pools and caches warm
            assert r.status == 200
        before = _rss_kib(gw.proc.pid, "VmRSS")
        chunk = bytes(range(256)) * 1024  # 256 KiB
        digest = hashlib.sha256()

        async def body() -> AsyncIterator[bytes]:
            for _ in range(SIZE // len(chunk)):
                digest.update(chunk)
                yield chunk
        async with s.post(gw.url + "/upload", data=body(), headers=headers,
                          timeout=aiohttp.ClientTimeout(total=120)) as r:
            assert r.status == 200
            reply = await r.json()
        assert reply["body_length"] == SIZE and reply["body_sha256"] == digest.hexdigest()
        # and the other way: 200 MB from the upstream, read in pieces by the client
        received = 0
        async with s.get(gw.url + f"/_bytes/{SIZE}", headers=headers,
                         timeout=aiohttp.ClientTimeout(total=120)) as r:
            assert r.status == 200
            async for piece in r.content.iter_chunked(1 << 20):
                received += len(piece)
        assert received == SIZE
        peak = _rss_kib(gw.proc.pid, "VmHWM")
    growth_mib = (peak - before) / 1024
    print(f"gateway RSS before {before / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB, growth {growth_mib:.1f} MiB")
    assert growth_mib < 48, f"gateway memory grew {growth_mib:.1f} MiB while streaming 2 x 200 MiB"
