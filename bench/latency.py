#!/usr/bin/env python3
"""p50/p99 latency against offered load: upstream direct, upstream with wrk on the proxy core, the gateway's
public route and headers mode, HAProxy plain and HAProxy + jwt_verify, at several paced rates.

Issue 7 asks for the gateway's p99 at half its maximum rate within 2 ms of upstream direct. On a VM the
p99 of a request that crosses between the two cores depends on how fast the hypervisor wakes an idle
vCPU, and at a moderate rate on the proxy's CPU time per request: paced connections still arrive in
bursts, and a request waits behind the rest of its burst. This sweep measures the same rows at low and
at moderate rates, and each proxy with and without its token check (gateway public route, HAProxy
plain). Same world as bench/run.py (nginx, HAProxy, Redis, the bench config), one gateway worker
pinned to the proxy core; samples of every row are interleaved, medians reported.

    .venv-bench/bin/python bench/latency.py                          # rates 250 1000 2500, 5 samples x 3 s
    .venv-bench/bin/python bench/latency.py --rates 500 2500 --reps 3

Needs nginx, haproxy and wrk (`apt-get install nginx haproxy wrk`) and redis-server.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402 - the bench's world (keys, nginx, HAProxy, redis, config) is shared


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--rates", type=float, nargs="+", default=[250.0, 1000.0, 2500.0], help="offered req/s")
    p.add_argument("--reps", type=int, default=5, help="samples per row and rate")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per sample")
    args = p.parse_args()
    if args.reps < 1 or args.duration <= 0 or any(r <= 0 for r in args.rates):
        p.error("--reps, --duration and --rates must be positive")
    bench.check_tools()
    tmp = Path(tempfile.mkdtemp(prefix="gateway-latency-"))
    procs = bench.Procs()
    world = bench.World(tmp=tmp, procs=procs)
    headers = bench.PATHS["headers"]
    rows = [  # (label, url, token sent, wrk's core)
        ("upstream direct (nginx)", f"http://127.0.0.1:{{up}}{headers}", False, None),
        ("upstream, wrk on the proxy core", f"http://127.0.0.1:{{up}}{headers}", False, bench.PROXY_CORE),
        ("gateway public route", f"http://127.0.0.1:{{gw}}{bench.PATHS['public']}", False, None),
        ("gateway headers mode", f"http://127.0.0.1:{{gw}}{headers}", True, None),
        ("HAProxy plain", f"http://127.0.0.1:{{hpp}}{headers}", False, None),
        ("HAProxy + jwt_verify RS256", f"http://127.0.0.1:{{hp}}{headers}", True, None),
    ]
    results: dict[tuple[float, str], list[dict[str, float]]] = {}
    try:
        bench.start_world(world, haproxy=True)
        with bench.gateway(world, 1, None):
            ports = {"up": world.upstream_port, "gw": world.gateway_port, "hp": world.haproxy_jwt,
                     "hpp": world.haproxy_plain}
            for rate in args.rates:
                script = bench.paced_script(tmp, rate, 50)
                for rep in range(args.reps):
                    for label, url, token, core in rows:
                        s = bench.wrk(url.format(**ports), args.duration, token=world.token if token else None,
                                      script=script, core=core)
                        results.setdefault((rate, label), []).append(s)
                        print(f"  {rate:>6.0f} req/s {rep + 1}/{args.reps} {label:<32} {s['rps']:>7.0f} req/s  "
                              f"p50 {s['p50_ms']:.2f} ms  p99 {s['p99_ms']:.2f} ms", flush=True)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\np50 / p99 in ms, medians of {args.reps} paced samples of {args.duration:g} s "
          f"(`wrk -t1 -c50`, proxy on core {bench.PROXY_CORE}); p99 range in brackets\n")
    print("| offered req/s | " + " | ".join(label for label, *_ in rows) + " |")
    print("|---:|" + "---|" * len(rows))
    for rate in args.rates:
        cells = []
        for label, *_ in rows:
            ss = results[(rate, label)]
            p99 = [s["p99_ms"] for s in ss]
            cells.append(f"{statistics.median(s['p50_ms'] for s in ss):.2f} / {statistics.median(p99):.2f} "
                         f"({min(p99):.2f}–{max(p99):.2f})")
        print(f"| {rate:.0f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
