"""`gateway run|check|routes|explain|revoke|keys|demo`: exit 0 ok, 2 bad configuration or usage, 1 otherwise."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import resource
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NoReturn

from gateway.config import default_key_store, line_of, load, warnings
from gateway.config_types import Config, InternalTokenConfig
from gateway.errors import BackendUnavailable, ConfigError, KeyStoreError, no_passphrase
from gateway.yamlreader import MAX_WORKERS

DEFAULT_CONFIG = "config/gateway.yaml"


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line on stderr, exit 2 (SPEC 2)
        raise UsageError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gateway", description="Edge API gateway")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="serve")
    run.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    run.add_argument("--workers", type=int, help="processes sharing the port (overrides server.workers)")
    run.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # set for worker processes
    check = sub.add_parser("check", help="validate a configuration file")
    check.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    routes = sub.add_parser("routes", help="the access matrix")
    routes.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    routes.add_argument("--format", choices=("table", "json", "csv"), default="table")
    explain = sub.add_parser("explain", help="which route matches a request, and each rule's verdict")
    explain.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    explain.add_argument("method")
    explain.add_argument("path")
    explain.add_argument("--token", help="a bearer token to evaluate against the route's rules")
    explain.add_argument("--host", default="", help="the Host the request would carry")
    revoke = sub.add_parser("revoke", help="revoke a token id, a subject or a session")
    revoke.add_argument("kind", choices=("jti", "subject", "session"))
    revoke.add_argument("value")
    revoke.add_argument("--issuer", help="issuer name (required for subject/session with several issuers)")
    revoke.add_argument("--exp", type=int, help="for jti: the token's exp (the key expires then)")
    revoke.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    keys = sub.add_parser("keys", help="the gateway's signing keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, parser_class=_Parser)
    rotate = keys_sub.add_parser("rotate", help="add a new signing key and make it current")
    rotate.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    demo = sub.add_parser("demo", help="a complete working system on this machine")
    demo.add_argument("--config", default=None, help=argparse.SUPPRESS)
    # `--debug` after the command too (`gateway check -c F --debug`); SUPPRESS: unset, it leaves the top's value.
    for command in (*sub.choices.values(), *keys_sub.choices.values()):
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args: Any = None
    try:
        args = _parser().parse_args(argv)
        logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return int(_COMMANDS[args.command](args))
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`gateway routes | head -1`): nothing to tell it. stdout is pointed at
        # /dev/null so that the interpreter's own flush at exit does not fail again and print.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:  # noqa: BLE001 - SPEC 2: one line, never a traceback unless --debug
        if args is not None and args.debug:
            raise
        print(f"gateway: error: {_one_line(exc)}", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _run_async(coro_fn: Callable[[], Coroutine[Any, Any, int]]) -> int:
    try:
        import uvloop
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro_fn())
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep working without it
        return asyncio.run(coro_fn())


def cmd_run(args: Any) -> int:
    # SIGHUP's default action would end the process before serve() or supervise() handles it (a reload
    # sent while starting); ignored until then. Workers inherit it (an ignored disposition survives exec).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    config = load(args.config)
    workers = args.workers if args.workers is not None else config.server.workers
    if not 1 <= workers <= MAX_WORKERS:
        raise UsageError(f"gateway run: --workers must be between 1 and {MAX_WORKERS}")
    if not args.reuse_port:  # a worker: the supervisor checked (and its siblings hold the ports)
        _check_references(config)  # as `gateway check` does: refused in one line before anything starts
        _check_ports(config)
        _warn(config)
        _raise_open_files_limit()  # before workers start: they inherit it
    if workers > 1:
        from gateway.workers import supervise
        return supervise(args.config, workers)
    from gateway.app import serve
    return _run_async(lambda: serve(args.config, reuse_port=args.reuse_port))


_OPEN_FILES_CAP = 1 << 20  # when the hard limit is unlimited: Linux refuses more than nr_open (2^20 by default)


def _raise_open_files_limit() -> None:
    """The soft limit on open files up to the hard one, as HAProxy and Go programs do by themselves.

    Each proxied request holds two sockets; a soft limit of 1024 (the common default outside
    containers) would refuse connections at about 500 concurrent requests while the hard limit allows
    far more. Never lowered, and only what the hard limit allows: no privilege is needed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = _OPEN_FILES_CAP if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError) as exc:  # a sandbox may refuse it: run with the limit we have
            print(f"gateway run: open files limit stays {soft} ({_one_line(exc)})", file=sys.stderr)


def _check_ports(config: Config) -> None:
    """Refuse to start, in one line, when a listener's address is taken, before anything else is started.

    The workers bind with SO_REUSEPORT, which lets any process of the same user join a port: a second
    `--workers` group would silently share the first one's traffic instead of failing. A probe bound
    without SO_REUSEPORT fails on any listener there (SO_REUSEADDR, as asyncio sets it, only lets it pass
    connections left in TIME_WAIT)."""
    for key, host, port in (("server.listen", config.server.host, config.server.port),
                            ("admin.listen", config.admin.host, config.admin.port)):
        if port == 0:
            continue
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            for family, kind, proto, _, address in addresses:
                with socket.socket(family, kind, proto) as probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:
                        probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    probe.bind(address)
        except OSError as exc:
            raise RuntimeError(f"cannot listen on {where} ({key}): {(exc.strerror or str(exc)).lower()}") from None


def cmd_check(args: Any) -> int:
    config = load(args.config)
    _check_references(config)
    _warn(config)
    print(f"ok: {len(config.routes)} routes, {len(config.upstreams)} upstreams, {len(config.issuers)} issuers")
    return 0


def _warn(config: Config) -> None:
    for line in warnings(config):
        print(line, file=sys.stderr)


def _check_references(config: Config) -> None:
    """What the file points at: TLS files must load as the listener and the upstream clients load them, and
    an existing key store must be readable and well formed."""
    problems: list[str] = []
    tls = config.server.tls
    if tls is not None and tls.cert_file is not None:
        problems += _tls_problems(config.path, ("server", "tls"), ssl.Purpose.CLIENT_AUTH, None, tls.cert_file,
                                  tls.key_file)
    for name, upstream in config.upstreams.items():
        if upstream.tls is not None:
            problems += _tls_problems(config.path, ("upstreams", name, "tls"), ssl.Purpose.SERVER_AUTH,
                                      upstream.tls.ca_file, upstream.tls.cert_file, upstream.tls.key_file)
    problems += _redis_url_problems(config)
    cfg = config.internal_token
    if cfg is not None:
        from gateway.keys import KeyStore
        try:
            if os.path.exists(cfg.key_store):
                KeyStore(cfg).load()
            else:
                _creatable(cfg.key_store)
        except KeyStoreError as exc:
            line = line_of(config.path, "internal_token", "key_store")
            problems.append(f"{config.path}:{line}: internal_token.key_store: {_one_line(exc)}")
    if problems:
        raise ConfigError(problems)


def _redis_url_problems(config: Config) -> list[str]:
    if config.revocation.backend != "redis":
        return []
    from gateway.revocation import redis_url_problem
    problem = redis_url_problem(config.revocation.redis_url)
    if not problem:
        return []
    return [f"{config.path}:{line_of(config.path, 'revocation', 'redis_url')}: revocation.redis_url: {problem}"]


def _creatable(path: str) -> None:
    """`run` creates an absent key store (and its directories): refused here when it could not, as `run`
    would refuse to start. The nearest existing ancestor must be a directory the gateway may write."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise KeyStoreError(f"key store {path}: cannot be created: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise KeyStoreError(f"key store {path}: cannot be created: directory {parent} is not writable")


def _tls_problems(filename: str, keys: tuple[str, ...], purpose: ssl.Purpose, ca_file: str | None,
                  cert_file: str | None, key_file: str | None) -> list[str]:
    """The files loaded into an SSLContext as app.py (listener) and upstream.py (client) load them; a
    problem names the line of the key (`keys`: the tls section's path) that gave the file."""
    def where(key: str) -> str:
        return f"{filename}:{line_of(filename, *keys, key)}: {'.'.join(keys)}.{key}"

    ctx = ssl.create_default_context(purpose)
    try:
        if ca_file:
            ctx.load_verify_locations(cafile=ca_file)
    except (ssl.SSLError, OSError) as exc:
        return [f"{where('ca_file')}: cannot load CA certificates from {ca_file}: {_ssl_reason(exc)}"]
    try:
        if cert_file:
            ctx.load_cert_chain(cert_file, key_file, password=no_passphrase)
    except (ssl.SSLError, OSError) as exc:
        return [f"{where('cert_file')}: cannot load a certificate and its key from {cert_file}"
                f"{f' and {key_file}' if key_file and key_file != cert_file else ''}: {_ssl_reason(exc)}"]
    return []


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):  # "[SSL] PEM lib (_ssl.c:3905)": OpenSSL's words without the C file
        return re.sub(r"\s*\(_ssl\.c:\d+\)$", "", _one_line(exc))
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else _one_line(exc)


def cmd_routes(args: Any) -> int:
    from gateway.matrix import render
    print(render(load(args.config), args.format))
    return 0


def cmd_explain(args: Any) -> int:
    from gateway.explain import explain
    config = load(args.config)
    return _run_async(lambda: explain(config, args.method.upper(), args.path, args.host, args.token))


def cmd_revoke(args: Any) -> int:
    config = load(args.config)
    names = [i.name for i in config.issuers]
    issuer = args.issuer
    if issuer is not None and issuer not in names:
        raise UsageError(f"gateway revoke: unknown issuer {issuer!r}; known: {', '.join(names)}")
    if issuer is None and args.kind != "jti":
        if len(names) != 1:
            raise UsageError(f"gateway revoke: --issuer is required with several issuers: {', '.join(names)}")
        issuer = names[0]
    if config.revocation.backend != "redis":
        raise UsageError("gateway revoke: revocation.backend is memory (one process only); revoke through "
                         "the running gateway's POST /admin/revocations instead")
    if problems := _redis_url_problems(config):
        raise ConfigError(problems)

    async def go() -> int:
        from gateway.revocation import RedisRevocationStore
        store = RedisRevocationStore(config.revocation)
        try:
            written = await store.revoke(args.kind, args.value, issuer, exp=args.exp)
        except ValueError as exc:  # the store's input rules: a usage problem, exit 2
            raise UsageError(f"gateway revoke: {exc}") from None
        except BackendUnavailable as exc:  # exit 1, saying why: refused, a password asked, a wrong database
            cause = exc.__cause__
            raise RuntimeError(f"{exc} ({_one_line(cause) if cause else 'no answer'})") from None
        finally:
            await store.close()
        print(json.dumps({"revoked": written}))
        return 0
    return _run_async(go)


def cmd_keys(args: Any) -> int:
    config = load(args.config)
    from gateway.keys import KeyStore
    # Without the section SPEC 3's defaults hold, as they would for the gateway once the section is added.
    store = KeyStore(config.internal_token or InternalTokenConfig(key_store=default_key_store()))
    store.load()
    previous = store.current().kid
    key = store.rotate()
    print(f"rotated: current key {key.kid} ({key.alg}); previous {previous} stays published until the tokens "
          f"it signed expire; store {store.path}")
    return 0


def cmd_demo(args: Any) -> int:
    from gateway.demo import run_demo
    return _run_async(lambda: run_demo(args.config))


_COMMANDS: dict[str, Callable[[Any], int]] = {
    "run": cmd_run, "check": cmd_check, "routes": cmd_routes, "explain": cmd_explain, "revoke": cmd_revoke,
    "keys": cmd_keys, "demo": cmd_demo,
}


