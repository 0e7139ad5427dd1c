"""`--workers N`: N full gateway processes sharing the ports (SO_REUSEPORT), metrics aggregated on disk."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import FrameType


def supervise(config_path: str, workers: int) -> int:
    """Start the workers, pass SIGHUP/SIGTERM/SIGINT on to them, exit when they have all exited."""
    env = dict(os.environ)
    own_dir = None
    if not env.get("PROMETHEUS_MULTIPROC_DIR"):
        own_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
        env["PROMETHEUS_MULTIPROC_DIR"] = own_dir
    cmd = [sys.executable, "-m", "gateway", "run", "-c", config_path, "--workers", "1", "--reuse-port"]
    procs = [subprocess.Popen(cmd, env=env) for _ in range(workers)]
    stopping = False

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    code = 0
    try:
        while procs:
            for proc in list(procs):
                rc = proc.poll()
                if rc is None:
                    continue
                procs.remove(proc)
                if not stopping and rc != 0:
                    # A worker that dies takes the group down: the orchestrator restarts it whole.
                    code = rc
                    stopping = True
                    forward(signal.SIGTERM, None)
            time.sleep(0.1)
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)
    return code
