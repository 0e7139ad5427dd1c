"""YAML -> frozen config objects; ALL validation happens here, each problem as FILE:LINE: key: message."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from yarl import URL

from gateway import routes
from gateway.config_types import (
    AdminConfig,
    AuthConfig,
    BreakerConfig,
    ClaimRule,
    ClaimsMap,
    Config,
    ForwardConfig,
    InternalTokenConfig,
    IPNetwork,
    IssuerConfig,
    RetryConfig,
    RevocationConfig,
    RouteConfig,
    ServerConfig,
    TLSFiles,
    UpstreamConfig,
)
from gateway.errors import ConfigError
from gateway.yamlreader import Invalid, Node, Reader, parse_duration, path_is

__all__ = ["Config", "ConfigError", "load", "load_text", "parse_duration"]

# RFC 8725 s3.1-3.2: "none" and HMAC algorithms are refused outright (no shared secrets at the edge,
# and no HS/RS key confusion); what remains are algorithms PyJWT verifies with public keys.
ASYMMETRIC_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
INTERNAL_ALGS = ("ES256", "EdDSA", "RS256")
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT")
RETRY_CONDITIONS = ("connect_error", "timeout", "500", "502", "503", "504")
CLAIM_NAMES = ("subject", "scopes", "roles", "tenant", "session")
_BINDING = re.compile(r"^\{path\.([A-Za-z_][A-Za-z0-9_]*)\}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TOP = ("server", "admin", "issuers", "revocation", "internal_token", "upstreams", "routes")


def load(path: str | os.PathLike[str]) -> Config:
    """Read, validate and freeze a config file. Raises ConfigError listing every problem."""
    filename = os.fspath(path)
    try:
        text = Path(filename).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError([f"{filename}:1: (file): cannot read: {reason}"]) from None
    return load_text(text, filename)


def _redacted(url: str) -> str:
    """A URL for a message with its password hidden: `${REDIS_URL}` carries one, and messages reach logs.
    Up to the last `@`: a URL refused is often one whose password holds an unencoded `/`, `?` or `#` (a
    base64 secret pasted as it is), which ends the authority early for a parser but not for the eye."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/@]*:).*@", r"\1***@", url, flags=re.DOTALL)


def default_key_store() -> str:
    """internal_token.key_store when the file does not set it: GATEWAY_KEY_STORE, else SPEC 3's default."""
    return os.environ.get("GATEWAY_KEY_STORE") or InternalTokenConfig().key_store


def line_of(filename: str, *keys: str) -> int:
    """The line of `keys` (a path of mapping keys) in a config file that loaded, for messages about what a
    value refers to (a TLS file, the key store); the nearest enclosing key's line when a key is absent."""
    try:
        node: yaml.Node | None = yaml.compose(Path(filename).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, RecursionError, yaml.YAMLError):
        return 1
    line = 1
    for key in keys:
        if not isinstance(node, yaml.MappingNode):
            break
        found = next(((k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == key), None)
        if found is None:
            break
        line, node = found[0].start_mark.line + 1, found[1]
    return line


def load_text(text: str, filename: str = "<config>") -> Config:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise ConfigError([f"{filename}:1: (yaml): nested too deeply to read"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise ConfigError([f"{filename}:{line}: (yaml): {getattr(exc, 'problem', None) or exc}"]) from None
    r = Reader(filename)
    config = _Builder(r).config(root, filename)
    if r.problems:
        raise ConfigError(r.problems)
    assert config is not None
    return config


def warnings(config: Config) -> list[str]:
    """What loads but is probably not meant, as `FILE: warning: key: message` lines (`check` and `run` say them)."""
    out: list[str] = []
    admin = config.admin.issuer
    if admin not in {i.name for i in config.issuers}:
        # Accepted, as SPEC 3's own example writes it (`employees` beside a lone `customers` issuer): no token
        # can come from an issuer that is not configured, so the admin API refuses every one (fail closed).
        unset = " (admin.issuer is 'employees' when unset)" if admin == "employees" else ""
        out.append(f"{config.path}: warning: admin.issuer: {admin!r} is not a configured issuer; the admin API "
                   f"refuses every token{unset}")
    for i, route in enumerate(config.routes):
        if route.forward.scopes is not None and route.forward.identity != "token":
            # Accepted beside `identity: headers` (SPEC 3 writes it so), but it down-scopes nothing there.
            out.append(f"{config.path}: warning: routes[{i}].forward.scopes: read in token mode only; with identity: "
                       f"{route.forward.identity} the upstream is told the token's own scopes")
    return out


def _bad_url(url: str) -> bool:
    """True when yarl (as upstream.py parses targets at start) refuses the URL or finds no host/port."""
    try:
        u = URL(url)
        return not u.host or u.port is None or not 0 < u.port <= 65535
    except (ValueError, TypeError):
        return True


def _bad_port(url: str) -> bool:
    """True when the URL's port cannot be read (redis-py reads it with urllib at connect)."""
    try:
        _ = urlsplit(url).port
    except ValueError:
        return True
    return False


class _Builder:
    """The schema of SPEC section 3, one method per section."""

    def __init__(self, r: Reader) -> None:
        self.r = r

    def config(self, root: Node | None, filename: str) -> Config | None:
        r = self.r
        if root is None or (isinstance(root, yaml.ScalarNode) and root.tag.endswith(":null")):  # `~`, `null`
            r.error(None, "(file)", "empty configuration; issuers, upstreams and routes are required")
            return None
        if not isinstance(root, yaml.MappingNode):  # a list, a string: one problem, named as the file's
            got = "a list" if isinstance(root, yaml.SequenceNode) else repr(root.value)[:60]
            r.error(root, "(file)", f"expected a mapping of {', '.join(_TOP)}; got {got}")
            return None
        top = r.mapping(root, "", _TOP)
        for key in ("issuers", "upstreams", "routes"):
            if key not in top:
                r.error(root, key, "required")
        server = self.server(top.get("server"))
        issuers = self.issuers(top.get("issuers"))
        names = tuple(i.name for i in issuers)
        admin = self.admin(top.get("admin"))
        hosts = {server.host, admin.host}
        if server.port and server.port == admin.port and (len(hosts) == 1 or hosts & {"0.0.0.0", "::"}):
            r.error(top.get("admin"), "admin.listen", f"same address as server.listen ({admin.host}:{admin.port}); "
                                                      "the admin listener needs its own port")
        revocation = self.revocation(top.get("revocation"))
        # A revocation's key outlives its token by the longest leeway any issuer grants (see grace).
        revocation = dataclasses.replace(revocation, grace=max((i.leeway for i in issuers), default=0.0))
        internal = self.internal_token(top["internal_token"]) if "internal_token" in top else None
        upstreams = self.upstreams(top.get("upstreams"))
        route_list = self.routes(top.get("routes"), names, upstreams)
        if internal is None and any(route.forward.identity == "token" for route in route_list):
            # SPEC 3: every key but issuers, upstreams and routes has its default, and the section is needed
            # only by routes that forward a token; with such a route and no section, its defaults apply (the
            # key store: GATEWAY_KEY_STORE, else var/signing-keys.json, created if absent), as `{}` would.
            internal = self.internal_token(None)
        return Config(
            path=filename, issuers=issuers, upstreams=upstreams, routes=route_list, server=server,
            admin=admin, revocation=revocation, internal_token=internal,
        )

    # -- server / admin ---------------------------------------------------------------------------
    def server(self, node: Node | None) -> ServerConfig:
        r, d = self.r, ServerConfig()
        m = r.mapping(node, "server", ("listen", "workers", "max_header_bytes", "max_body_bytes",
                                       "trusted_proxies", "shutdown_grace", "tls"))
        host, port = r.field(r.listen, m.get("listen"), "server.listen", (d.host, d.port))
        proxies: list[IPNetwork] = []
        for i, cidr in enumerate(r.strs(m.get("trusted_proxies"), "server.trusted_proxies")):
            try:
                proxies.append(ipaddress.ip_network(cidr, strict=False))
            except ValueError:
                item = m["trusted_proxies"].value[i] if "trusted_proxies" in m else None
                r.error(item, f"server.trusted_proxies[{i}]", f"not a CIDR or IP address: {cidr!r}")
        tls = None
        if "tls" in m:
            t = r.mapping(m["tls"], "server.tls", ("cert_file", "key_file"))
            for k in ("cert_file", "key_file"):
                if k not in t:
                    r.error(m["tls"], f"server.tls.{k}", "required for TLS termination")
            tls = TLSFiles(cert_file=r.field(r.existing_file, t.get("cert_file"), "server.tls.cert_file", None),
                           key_file=r.field(r.existing_file, t.get("key_file"), "server.tls.key_file", None))
        return ServerConfig(
            host=host, port=port,
            workers=r.field(r.workers, m.get("workers"), "server.workers", d.workers),
            max_header_bytes=r.field(r.positive_int, m.get("max_header_bytes"), "server.max_header_bytes",
                                     d.max_header_bytes),
            max_body_bytes=r.field(r.int_, m.get("max_body_bytes"), "server.max_body_bytes", d.max_body_bytes),
            trusted_proxies=tuple(proxies),
            shutdown_grace=r.field(r.duration, m.get("shutdown_grace"), "server.shutdown_grace",
                                   d.shutdown_grace),
            tls=tls,
        )

    def admin(self, node: Node | None) -> AdminConfig:
        r, d = self.r, AdminConfig()
        m = r.mapping(node, "admin", ("listen", "issuer", "scope"))
        host, port = r.field(r.listen, m.get("listen"), "admin.listen", (d.host, d.port))
        # SPEC 3's default, `employees`, also when no issuer has that name: the admin API then refuses every
        # token (fail closed, habit 6). It used to take any issuer's token that carried admin.scope, so a
        # customer token given that scope could revoke other people's sessions.
        issuer = r.field(r.opt_str, m.get("issuer"), "admin.issuer", None) or d.issuer
        return AdminConfig(host=host, port=port, issuer=issuer,
                           scope=r.field(r.str_, m.get("scope"), "admin.scope", d.scope))

    # -- issuers ------------------------------------------------------------------------------------
    def issuers(self, node: Node | None) -> tuple[IssuerConfig, ...]:
        r = self.r
        if node is None:
            return ()
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            r.error(node, "issuers", "expected a non-empty list of issuers")
            return ()
        out: list[IssuerConfig] = []
        for i, item in enumerate(node.value):
            issuer = self.issuer(item, f"issuers[{i}]")
            if issuer is None:
                continue
            if any(o.name == issuer.name for o in out):
                r.error(item, f"issuers[{i}].name", f"duplicate issuer name {issuer.name!r}")
            elif issuer.issuer and any(o.issuer == issuer.issuer for o in out):
                r.error(item, f"issuers[{i}].issuer", f"issuer URL {issuer.issuer!r} is configured twice")
            out.append(issuer)
        return tuple(out)

    def issuer(self, node: Node, key: str) -> IssuerConfig | None:
        r = self.r
        m = r.mapping(node, key, ("name", "issuer", "jwks_uri", "audiences", "algorithms", "leeway",
                                  "jwks_refresh", "jwks_min_refetch", "claims"))
        for req in ("name", "issuer", "audiences"):
            if req not in m:
                r.error(node, f"{key}.{req}", "required")
        name = r.field(self._name, m.get("name"), f"{key}.name", "")
        url = r.field(self._url, m.get("issuer"), f"{key}.issuer", "")
        jwks_uri = r.field(self._opt_url, m.get("jwks_uri"), f"{key}.jwks_uri", None)
        audiences = r.strs(m.get("audiences"), f"{key}.audiences")
        if "audiences" in m and not audiences:
            r.error(m["audiences"], f"{key}.audiences", "at least one audience is required (RFC 7519 s4.1.3)")
        default_algs: tuple[str, ...] = ("RS256", "ES256")
        algs = r.field(self._algorithms, m.get("algorithms"), f"{key}.algorithms", default_algs)
        d = IssuerConfig(name="", issuer="", audiences=())
        c = r.mapping(m.get("claims"), f"{key}.claims", CLAIM_NAMES)
        dc = ClaimsMap()
        claims = ClaimsMap(**{n: r.field(r.str_, c.get(n), f"{key}.claims.{n}", getattr(dc, n))
                              for n in CLAIM_NAMES})
        if not name:
            return None  # an issuer with a bad URL keeps its name (its error is said): routes naming it say nothing
        return IssuerConfig(
            name=name, issuer=url, audiences=audiences, jwks_uri=jwks_uri, algorithms=algs,
            leeway=r.field(r.duration, m.get("leeway"), f"{key}.leeway", d.leeway),
            jwks_refresh=r.field(r.positive_duration, m.get("jwks_refresh"), f"{key}.jwks_refresh",
                                 d.jwks_refresh),
            jwks_min_refetch=r.field(r.duration, m.get("jwks_min_refetch"), f"{key}.jwks_min_refetch",
                                     d.jwks_min_refetch),
            claims=claims,
        )

    def _name(self, node: Node, key: str) -> str:
        value = self.r.str_(node, key)
        if not _NAME.match(value):
            raise Invalid(f"{value!r} is not a valid name (letters, digits, '_', '-', '.')")
        return value

    def _url(self, node: Node, key: str) -> str:
        value = self.r.str_(node, key)
        if not re.match(r"^https?://[^/\s]+", value):
            raise Invalid(f"expected an http(s) URL, got {value!r}")
        return value

    def _opt_url(self, node: Node, key: str) -> str | None:
        return None if self.r.scalar(node, key) is None else self._url(node, key)

    def _algorithms(self, node: Node, key: str) -> tuple[str, ...]:
        algs = self.r.str_list(node, key)
        if not algs:
            raise Invalid("at least one algorithm is required")
        for alg in algs:
            if alg.lower() == "none" or alg.upper().startswith("HS"):
                raise Invalid(f"{alg!r} is refused: unsigned and shared-secret (HMAC) tokens are never "
                              f"accepted at the edge (RFC 8725 s3.1); use one of: {', '.join(ASYMMETRIC_ALGS)}")
            if alg not in ASYMMETRIC_ALGS:
                raise Invalid(f"unknown algorithm {alg!r}; known: {', '.join(ASYMMETRIC_ALGS)}")
        return algs

    # -- revocation / internal token ----------------------------------------------------------------
    def revocation(self, node: Node | None) -> RevocationConfig:
        r, d = self.r, RevocationConfig()
        m = r.mapping(node, "revocation", ("backend", "redis_url", "key_prefix", "on_backend_error",
                                           "max_token_lifetime"))
        redis_url = r.field(r.str_, m.get("redis_url"), "revocation.redis_url", None)
        if redis_url is None:  # the default, with the same ${REDIS_URL:-...} substitution as in the file
            redis_url = os.environ.get("REDIS_URL") or d.redis_url
        if not re.match(r"^(redis|rediss|unix)://", redis_url) or _bad_port(redis_url):
            r.error(m.get("redis_url"), "revocation.redis_url",
                    f"expected a redis://, rediss:// or unix:// URL, got {_redacted(redis_url)!r}")
        return RevocationConfig(
            backend=r.field(r.choice(("redis", "memory")), m.get("backend"), "revocation.backend", d.backend),
            redis_url=redis_url,
            key_prefix=r.field(r.str_, m.get("key_prefix"), "revocation.key_prefix", d.key_prefix),
            on_backend_error=r.field(r.choice(("deny", "allow")), m.get("on_backend_error"),
                                     "revocation.on_backend_error", d.on_backend_error),
            max_token_lifetime=r.field(r.positive_duration, m.get("max_token_lifetime"),
                                       "revocation.max_token_lifetime", d.max_token_lifetime),
        )

    def internal_token(self, node: Node | None) -> InternalTokenConfig:
        r, d = self.r, InternalTokenConfig()
        m = r.mapping(node, "internal_token", ("issuer", "algorithm", "ttl", "key_store", "rotate_every"))
        key_store = r.field(r.str_, m.get("key_store"), "internal_token.key_store", None)
        if key_store is None:
            key_store = default_key_store()
        cfg = InternalTokenConfig(
            issuer=r.field(self._url, m.get("issuer"), "internal_token.issuer", d.issuer),
            algorithm=r.field(r.choice(INTERNAL_ALGS), m.get("algorithm"), "internal_token.algorithm",
                              d.algorithm),
            ttl=r.field(r.positive_duration, m.get("ttl"), "internal_token.ttl", d.ttl),
            key_store=key_store,
            rotate_every=r.field(r.positive_duration, m.get("rotate_every"), "internal_token.rotate_every",
                                 d.rotate_every),
        )
        try:
            if path_is(key_store, Path.is_dir):
                raise Invalid(f"{key_store} is a directory; expected the path of a JSON key store file")
        except Invalid as exc:
            r.error(m.get("key_store", node), "internal_token.key_store", str(exc))
        return cfg

    # -- upstreams ----------------------------------------------------------------------------------
    def upstreams(self, node: Node | None) -> dict[str, UpstreamConfig]:
        r = self.r
        if node is None:
            return {}
        if not isinstance(node, yaml.MappingNode) or not node.value:
            r.error(node, "upstreams", "expected a mapping of upstream name to its targets")
            return {}
        out: dict[str, UpstreamConfig] = {}
        for k_node, v_node in node.value:
            name = str(k_node.value)
            key = f"upstreams.{name}"
            if not _NAME.match(name):
                r.error(k_node, key, "not a valid upstream name (letters, digits, '_', '-', '.')")
                continue
            if name in out:
                r.error(k_node, key, "duplicate upstream")
                continue
            out[name] = self.upstream(name, v_node, key)
        return out

    def upstream(self, name: str, node: Node, key: str) -> UpstreamConfig:
        r = self.r
        m = r.mapping(node, key, ("targets", "timeouts", "retries", "circuit_breaker", "tls", "max_requests"))
        targets: list[str] = []
        if "targets" not in m:
            r.error(node, f"{key}.targets", "required: a list of http(s)://host:port URLs")
        for i, target in enumerate(r.strs(m.get("targets"), f"{key}.targets")):
            if not re.match(r"^https?://[^/\s?#]+(/[^\s?#]*)?$", target) or _bad_url(target):
                r.error(m["targets"].value[i], f"{key}.targets[{i}]",
                        f"expected http(s)://host:port, got {_redacted(target)!r}")
            elif "@" in urlsplit(target).netloc:
                # Never sent (the client builds each request's head itself), and the target is a metric
                # label on /metrics and a field of every access-log line: the password would be published.
                r.error(m["targets"].value[i], f"{key}.targets[{i}]",
                        f"a target cannot carry credentials (they are not sent, and the target URL is a metric "
                        f"label and a log field); got {_redacted(target)!r}")
            targets.append(target.rstrip("/"))
        if "targets" in m and isinstance(m["targets"], yaml.SequenceNode) and not m["targets"].value:
            r.error(m["targets"], f"{key}.targets", "at least one target is required")
        d = UpstreamConfig(name=name, targets=())
        t = r.mapping(m.get("timeouts"), f"{key}.timeouts", ("connect", "read"))
        rt = r.mapping(m.get("retries"), f"{key}.retries", ("attempts", "retry_on"))
        dr = RetryConfig()
        retry_on = tuple(sorted(dr.retry_on))
        if "retry_on" in rt:
            node_list = rt["retry_on"]
            if not isinstance(node_list, yaml.SequenceNode):
                r.error(node_list, f"{key}.retries.retry_on", "expected a list of conditions")
            else:  # status codes may be written as numbers: 502, not "502"
                retry_on = tuple(str(r.field(r.scalar, n, f"{key}.retries.retry_on[{i}]", ""))
                                 for i, n in enumerate(node_list.value))
        for cond in retry_on:
            if cond not in RETRY_CONDITIONS:
                r.error(rt.get("retry_on"), f"{key}.retries.retry_on",
                        f"unknown condition {cond!r}; known: {', '.join(RETRY_CONDITIONS)}")
        b = r.mapping(m.get("circuit_breaker"), f"{key}.circuit_breaker",
                      ("failures", "window", "open_for", "half_open_requests"))
        db, bk = BreakerConfig(), f"{key}.circuit_breaker"
        tls = None
        if "tls" in m:
            tm = r.mapping(m["tls"], f"{key}.tls", ("ca_file", "cert_file", "key_file"))
            tls = TLSFiles(**{k: r.field(r.existing_file, tm.get(k), f"{key}.tls.{k}", None)
                              for k in ("ca_file", "cert_file", "key_file")})
            if ("cert_file" in tm) != ("key_file" in tm):
                r.error(m["tls"], f"{key}.tls", "cert_file and key_file go together (the client certificate)")
        return UpstreamConfig(
            name=name, targets=tuple(targets),
            connect_timeout=r.field(r.positive_duration, t.get("connect"), f"{key}.timeouts.connect",
                                    d.connect_timeout),
            read_timeout=r.field(r.positive_duration, t.get("read"), f"{key}.timeouts.read", d.read_timeout),
            retries=RetryConfig(
                attempts=r.field(r.positive_int, rt.get("attempts"), f"{key}.retries.attempts", dr.attempts),
                retry_on=frozenset(retry_on)),
            circuit_breaker=BreakerConfig(
                failures=r.field(r.positive_int, b.get("failures"), f"{bk}.failures", db.failures),
                window=r.field(r.positive_duration, b.get("window"), f"{bk}.window", db.window),
                open_for=r.field(r.positive_duration, b.get("open_for"), f"{bk}.open_for", db.open_for),
                half_open_requests=r.field(r.positive_int, b.get("half_open_requests"),
                                           f"{bk}.half_open_requests", db.half_open_requests)),
            tls=tls,
            max_requests=r.field(r.int_, m.get("max_requests"), f"{key}.max_requests", d.max_requests),
        )

    # -- routes -------------------------------------------------------------------------------------
    def routes(self, node: Node | None, issuers: tuple[str, ...],
               upstreams: dict[str, UpstreamConfig]) -> tuple[RouteConfig, ...]:
        r = self.r
        if node is None:
            return ()
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            r.error(node, "routes", "expected a non-empty list of routes")
            return ()
        out: list[RouteConfig] = []
        nodes: list[Node] = []
        names: set[str] = set()
        for i, item in enumerate(node.value):
            route = _RouteBuilder(r, item, f"routes[{i}]", issuers, upstreams).build()
            if route is None:
                continue
            if route.name in names:
                r.error(item, f"routes[{i}].name", f"duplicate route name {route.name!r}")
            names.add(route.name)
            out.append(route)
            nodes.append(item)
        for later, earlier in routes.find_shadowed(out):
            r.error(nodes[later], f"routes[{later}]",
                    f"route {out[later].name!r} can never match: route {out[earlier].name!r} "
                    f"(line {out[earlier].line}) matches every request it would; put it first or narrow it")
        return tuple(out)


class _RouteBuilder:
    def __init__(self, r: Reader, node: Node, key: str, issuers: tuple[str, ...],
                 upstreams: dict[str, UpstreamConfig]) -> None:
        self.r, self.node, self.key = r, node, key
        self.issuers, self.upstreams = issuers, upstreams

    def build(self) -> RouteConfig | None:
        r, key = self.r, self.key
        m = r.mapping(self.node, key, ("name", "match", "upstream", "rewrite", "auth", "forward"))
        for req in ("name", "match", "upstream"):
            if req not in m:
                r.error(self.node, f"{key}.{req}", "required")
        name = r.field(r.str_, m.get("name"), f"{key}.name", "")
        upstream = r.field(r.str_, m.get("upstream"), f"{key}.upstream", "")
        if upstream and upstream not in self.upstreams:
            known = ", ".join(self.upstreams) or "none defined"
            r.error(m["upstream"], f"{key}.upstream", f"unknown upstream {upstream!r}; known: {known}")
        mm = r.mapping(m.get("match"), f"{key}.match",
                       ("path", "path_prefix", "methods", "host", "websocket"))
        path = r.field(self._template, mm.get("path"), f"{key}.match.path", None)
        prefix = r.field(self._prefix, mm.get("path_prefix"), f"{key}.match.path_prefix", None)
        if "match" in m and ("path" in mm) == ("path_prefix" in mm):
            r.error(m["match"], f"{key}.match", "exactly one of path or path_prefix is required")
        methods = r.field(self._methods, mm.get("methods"), f"{key}.match.methods", None)
        host = r.field(r.opt_str, mm.get("host"), f"{key}.match.host", None)
        rw = r.mapping(m.get("rewrite"), f"{key}.rewrite", ("strip_prefix",))
        strip = r.field(self._prefix, rw.get("strip_prefix"), f"{key}.rewrite.strip_prefix", None)
        match_path = path or prefix or "/"
        if strip and not (match_path + "/").startswith(strip.rstrip("/") + "/"):
            r.error(rw["strip_prefix"], f"{key}.rewrite.strip_prefix",
                    f"{strip!r} is not a prefix of the matched path {match_path!r}")
        params = routes.template_params(path) if path else ()
        auth = self.auth(m.get("auth"), params)
        forward = self.forward(m.get("forward"), auth, upstream)
        if not name:
            return None
        return RouteConfig(
            name=name, upstream=upstream, path=path, path_prefix=prefix, methods=methods,
            host=host.lower() if host else None,
            websocket=r.field(r.bool_, mm.get("websocket"), f"{key}.match.websocket", False),
            strip_prefix=strip, auth=auth, forward=forward, line=self.node.start_mark.line + 1,
        )

    def _template(self, node: Node, key: str) -> str:
        value = self.r.str_(node, key)
        problem = routes.check_template(value)
        if problem:
            raise Invalid(problem)
        return value

    def _prefix(self, node: Node, key: str) -> str:
        value = self.r.str_(node, key)
        # The route table's own check (normal form, no dot segments with ';', no encoded '/'), so that
        # what `gateway check` accepts is what the server can compile; escapes are refused outright.
        problem = routes.check_prefix(value) or ("a prefix is written without %-escapes" if "%" in value else None)
        if problem:
            raise Invalid(f"expected a plain normalised path prefix starting with '/': {problem}")
        return value

    def _methods(self, node: Node, key: str) -> tuple[str, ...] | None:
        methods = self.r.str_list(node, key)
        if not methods:
            raise Invalid("expected a non-empty list of methods (leave the key out for any method)")
        for meth in methods:
            if meth.upper() not in HTTP_METHODS:
                raise Invalid(f"unknown method {meth!r}; known: {', '.join(HTTP_METHODS)}")
        return tuple(dict.fromkeys(m.upper() for m in methods))

    def auth(self, node: Node | None, params: tuple[str, ...]) -> AuthConfig:
        r, key = self.r, f"{self.key}.auth"
        m = r.mapping(node, key, ("required", "issuers", "scopes", "any_scopes", "roles", "claims"))
        required = r.field(r.bool_, m.get("required"), f"{key}.required", True)
        issuers = r.strs(m.get("issuers"), f"{key}.issuers")
        for i, name in enumerate(issuers):
            if name not in self.issuers:
                r.error(m["issuers"].value[i], f"{key}.issuers[{i}]",
                        f"unknown issuer {name!r}; known: {', '.join(self.issuers) or 'none defined'}")
        claims = self.claims(m.get("claims"), f"{key}.claims", params)
        cfg = AuthConfig(
            required=required, issuers=issuers or (self.issuers if required else ()),
            scopes=r.strs(m.get("scopes"), f"{key}.scopes"),
            any_scopes=r.strs(m.get("any_scopes"), f"{key}.any_scopes"),
            roles=r.strs(m.get("roles"), f"{key}.roles"), claims=claims,
        )
        if not required:
            # An empty list (SPEC 3's `any_scopes: []`) demands nothing: only a rule that would demand
            # something is refused, since the operator must believe it protects the route.
            demands = {"issuers": issuers, "scopes": cfg.scopes, "any_scopes": cfg.any_scopes, "roles": cfg.roles,
                       "claims": claims}
            for rule, values in demands.items():
                if rule in m and values:
                    r.error(m[rule], f"{key}.{rule}", "a public route (required: false) cannot have rules; "
                                                      "remove it or set required: true")
        return cfg

    def claims(self, node: Node | None, key: str, params: tuple[str, ...]) -> tuple[ClaimRule, ...]:
        r = self.r
        if node is None:
            return ()
        if not isinstance(node, yaml.MappingNode):
            r.error(node, key, "expected a mapping of claim to required value(s)")
            return ()
        rules: list[ClaimRule] = []
        for k_node, v_node in node.value:
            claim, ck = str(k_node.value), f"{key}.{k_node.value}"
            if any(rule.claim == claim for rule in rules):
                r.error(k_node, ck, "duplicate key")  # as Reader.mapping() says for every other mapping
                continue
            before = len(r.problems)
            if isinstance(v_node, yaml.SequenceNode):
                # Each item read as one value is (`[2, 3]` as `3` is, not as strings only); a bad item is
                # its own problem, said once.
                raw: Any = tuple(r.field(self.claim_value, item, f"{ck}[{i}]", None)
                                 for i, item in enumerate(v_node.value))
            else:
                raw = r.field(self.claim_value, v_node, ck, None) if isinstance(v_node, yaml.ScalarNode) \
                    else r.strs(v_node, ck)
            if len(r.problems) > before:
                continue
            values = (raw,) if not isinstance(raw, tuple) else raw
            if not values or any(v is None or isinstance(v, (dict, list)) for v in values):
                r.error(v_node, ck, "expected a value or a list of values")
                continue
            strs = tuple(str(v).lower() if isinstance(v, bool) else str(v) for v in values)
            for v in strs:
                bound = _BINDING.match(v)
                if bound and bound.group(1) not in params:
                    r.error(v_node, ck, f"path parameter {bound.group(1)!r} is not defined by the route's "
                                        f"path; defined: {', '.join(params) or 'none'}")
                elif v.startswith("{") and not bound:
                    r.error(v_node, ck, f"{v!r}: a binding is written \"{{path.NAME}}\"")
            rules.append(ClaimRule(claim=claim, values=strs))
        return tuple(rules)

    def claim_value(self, node: Node, key: str) -> Any:
        """One value of a claim rule, as YAML types it (compared as text later). A plain scalar whose text
        YAML changes is refused: `010` is 8 and `no` is false, so the rule would admit tokens carrying
        8 or false and refuse the ones meant (department 010, Norway)."""
        value = self.r.scalar(node, key)
        plain = isinstance(node, yaml.ScalarNode) and node.style is None  # a quoted one is text as written
        if plain and isinstance(value, (bool, int, float, datetime.date)):
            reads = str(value).lower() if isinstance(value, bool) else str(value)
            written = self.r.written(node)
            if (written.lower() if isinstance(value, bool) else written) != reads:
                raise Invalid(f"{written!r} reads as {reads} in YAML; quote it to compare the text {written!r}, "
                              f"or write {reads}")
        return value

    def forward(self, node: Node | None, auth: AuthConfig, upstream: str) -> ForwardConfig:
        r, key = self.r, f"{self.key}.forward"
        m = r.mapping(node, key, ("identity", "audience", "scopes"))
        identity = r.field(r.choice(("headers", "token", "none")), m.get("identity"), f"{key}.identity",
                           "headers" if auth.required else "none")
        scopes = r.field(r.str_list, m.get("scopes"), f"{key}.scopes", None) if "scopes" in m else None
        if not auth.required:
            identity = "none"  # SPEC 3: a public route has no token, so none is forwarded, whatever is written
        # `audience` and `scopes` are read in token mode only; SPEC 3 writes them beside `identity: headers`.
        return ForwardConfig(identity=identity,
                             audience=r.field(r.str_, m.get("audience"), f"{key}.audience", upstream or None),
                             scopes=scopes)
