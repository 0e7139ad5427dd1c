#!/usr/bin/env python3
"""Instructions per request of the gateway on each bench route, counted by valgrind (callgrind).

req/s on a shared 2-core VM moves by +-30 % between samples of the same build (the host's other
tenants are invisible to /proc/stat), so small changes to the hot path cannot be judged from it.
Instruction counts are repeatable: the same build and the same requests give the same count, whatever
else the machine does. This runs `gateway run` under callgrind, sends an exact number of requests per
route over a few keep-alive connections, and reads the count for just those requests (zeroed before,
dumped after). It measures the gateway process's user-space work only: the kernel's share (socket
calls) is not in it, so it complements bench/run.py and does not replace it.

    .venv/bin/python bench/instructions.py                      # public, headers, token: 2000 requests each
    .venv/bin/python bench/instructions.py --compare /tmp/other  # the same for another checkout (A/B)
    .venv/bin/python bench/instructions.py --as-worker           # as a `--workers N` worker (metrics in files)

Needs valgrind, nginx and redis-server (`apt-get install valgrind nginx redis-server`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402 - the bench's world (keys, nginx, redis, config) is shared

CONNECTIONS = 8


async def _client(port: int, path: str, token: str | None, count: int) -> None:
    """`count` GETs one after another on one keep-alive connection; each must answer 200."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\nUser-Agent: bench\r\n{auth}\r\n".encode()
    try:
        for _ in range(count):
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            m = re.search(rb"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)
            if status != 200 or m is None:
                raise RuntimeError(f"{path}: answered {head[:200]!r}")
            await reader.readexactly(int(m.group(1)))
    finally:
        writer.close()


def load(port: int, path: str, token: str | None, total: int) -> None:
    async def main() -> None:
        per = total // CONNECTIONS
        await asyncio.gather(*(_client(port, path, token, per) for _ in range(CONNECTIONS)))
    asyncio.run(main())


def callgrind(pid: int, *args: str) -> None:
    subprocess.run([bench.tool("callgrind_control"), *args, str(pid)], check=True, capture_output=True,
                   timeout=120)


def count_route(world: bench.World, pid: int, out: Path, route: str, requests: int) -> float:
    """Instructions per request: zero the counters, send `requests`, dump, read the dump's total."""
    token = world.token if route != "public" else None
    path = bench.PATHS[route]
    load(world.gateway_port, path, token, CONNECTIONS * 25)  # warm: caches, pools, this route's memos
    callgrind(pid, "--zero")
    load(world.gateway_port, path, token, requests)
    before = set(out.parent.glob(out.name + "*"))
    callgrind(pid, "--dump")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = set(out.parent.glob(out.name + "*")) - before
        for f in new:
            m = re.search(r"^(?:summary|totals): (\d+)", f.read_text(errors="replace"), re.MULTILINE)
            if m:
                return int(m.group(1)) / requests
        time.sleep(0.2)
    raise RuntimeError("callgrind wrote no dump")


def measure(world: bench.World, routes: list[str], requests: int, *, as_worker: bool = False) -> dict[str, float]:
    out = world.tmp / f"callgrind-{world.gateway_cfg.stem}.out"
    wrapper = ("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no",
               "--compress-strings=no", "--compress-pos=no")
    env = None
    if as_worker:  # what workers.supervise gives each of its children: metrics in files, aggregated on scrape
        metrics_dir = world.tmp / f"metrics-{world.gateway_cfg.stem}"
        metrics_dir.mkdir()
        env = {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "GATEWAY_SUPERVISOR_PID": str(os.getpid())}
    with bench.gateway(world, 1, None, wrapper=wrapper, ready_within=600, extra_env=env) as proc:
        return {route: count_route(world, proc.pid, out, route, requests) for route in routes}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--requests", type=int, default=2000, help="requests counted per route")
    p.add_argument("--routes", nargs="+", default=list(bench.PATHS), choices=list(bench.PATHS))
    p.add_argument("--compare", metavar="DIR", help="also count another checkout's gateway (A/B)")
    p.add_argument("--as-worker", action="store_true", help="count a `--workers N` worker: metrics "
                   "in files (PROMETHEUS_MULTIPROC_DIR), as the supervisor's children keep them")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (callgrind dumps, one per route "
                   "in --routes order, for callgrind_annotate)")
    args = p.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("bench: needs valgrind: apt-get install valgrind")
    bench.check_tools()
    tmp = Path(tempfile.mkdtemp(prefix="gateway-instr-"))
    procs = bench.Procs()
    world = bench.World(tmp=tmp, procs=procs)
    try:
        bench.start_world(world)
        trees = {"this checkout": world}
        if args.compare:
            other = dataclasses.replace(world, root=Path(args.compare).resolve())
            bench.write_gateway_config(other, "gateway-compare")
            trees[f"compare: {args.compare}"] = other
        results = {name: measure(w, args.routes, args.requests, as_worker=args.as_worker)
                   for name, w in trees.items()}
    finally:
        procs.stop_all()
        if args.keep_tmp:
            print(f"bench: temporary files kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nInstructions per request (callgrind, {args.requests} requests per route, "
          f"{CONNECTIONS} keep-alive connections{', as a --workers N worker' if args.as_worker else ''})\n")
    print("| tree | " + " | ".join(args.routes) + " | " +
          " | ".join(f"{r}/public" for r in args.routes if r != "public") + " |")
    print("|---|" + "---:|" * (2 * len(args.routes) - ("public" in args.routes)))
    for name, res in results.items():
        ratios = [f"{res[r] / res['public']:.3f}" for r in args.routes if r != "public" and "public" in res]
        print(f"| {name} | " + " | ".join(f"{res[r]:,.0f}" for r in args.routes) + " | " + " | ".join(ratios) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
