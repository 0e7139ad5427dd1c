"""`--workers N`: N full gateway processes sharing the ports (SO_REUSEPORT), metrics aggregated on disk."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import FrameType

from gateway import metrics

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the kernel sends SIGTERM to a worker whose supervisor died, even by SIGKILL, so no orphan
    keeps serving (and holding the ports) with nobody to aggregate or restart it."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


_HELD = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def _worker_preexec() -> None:  # pragma: no cover - runs in the child between fork and exec
    # SIGHUP (reload) is forwarded to every worker, but a worker still starting has no handler yet and the
    # default action would kill it, and with it the group (exit 129). Ignored until its event loop
    # installs the reload handler (an ignored disposition survives exec; add_signal_handler replaces it).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)  # the supervisor holds them while spawning (supervise)
    if sys.platform == "linux":
        _die_with_parent()


def metrics_dir(env: dict[str, str]) -> tuple[str, bool]:
    """The workers' multiprocess directory, emptied of an earlier run's files, and whether it is ours
    to delete at the end (True when none was given)."""
    given = env.get(metrics.MULTIPROC_ENV)
    if given:
        metrics.reset_multiprocess_dir(given)
        return given, False
    return tempfile.mkdtemp(prefix="gateway-metrics-"), True


def _exit_code(rc: int) -> int:
    """A worker killed by signal N reads as 128+N, as a shell shows it; a clean but unasked exit is still
    a failure of the group."""
    if rc < 0:
        return 128 - rc
    return rc or 1


def supervise(config_path: str, workers: int) -> int:
    """Start the workers, pass SIGHUP/SIGTERM/SIGINT on to them, exit when they have all exited."""
    env = dict(os.environ)
    directory, own_dir = metrics_dir(env)
    env[metrics.MULTIPROC_ENV] = directory
    env[metrics.WORKER_ENV] = str(os.getpid())
    env[metrics.COUNT_ENV] = str(workers)
    cmd = [sys.executable, "-m", "gateway", "run", "-c", config_path, "--workers", "1", "--reuse-port"]
    procs: list[subprocess.Popen[bytes]] = []
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
        # A stop (or reload) that arrives while spawning waits until every worker exists: forwarded at
        # once, it would miss the workers not yet started, and the group would wait for them for ever.
        signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
        try:
            for index in range(workers):
                # Each worker in a process group of its own: a signal sent to the supervisor's group (Ctrl-C in
                # a terminal, `kill -- -PGID`) reaches the workers once, forwarded, not also directly; twice,
                # a worker would take the second for "cut the drain short" and cut every request in flight.
                procs.append(subprocess.Popen(cmd, env={**env, metrics.INDEX_ENV: str(index)},  # noqa: S603 - our argv
                                              preexec_fn=_worker_preexec, process_group=0))
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)
        while procs:
            for proc in list(procs):
                rc = proc.poll()
                if rc is None:
                    continue
                procs.remove(proc)
                # Its live gauges (inflight, breaker states, backend up) must not count any more.
                metrics.mark_process_dead(proc.pid, directory)
                if not stopping:
                    # A worker that exits unasked takes the group down: the orchestrator restarts it whole.
                    code = _exit_code(rc)
                    stopping = True
                    forward(signal.SIGTERM, None)
            time.sleep(0.1)
    finally:
        for proc in procs:  # only when the loop itself failed: leave no worker behind
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            metrics.mark_process_dead(proc.pid, directory)
        if own_dir:
            shutil.rmtree(directory, ignore_errors=True)
    return code
