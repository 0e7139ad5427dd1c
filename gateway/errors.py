"""The one error tree: each error fixes its HTTP status, its error code and a stable reason id."""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any

# Reasons are a fixed set: they are metric labels (bounded cardinality) and log fields.
AUTH_REASONS = (
    "missing_token",
    "malformed",
    "bad_signature",
    "unknown_kid",
    "wrong_issuer",
    "wrong_audience",
    "expired",
    "not_yet_valid",
    "alg_not_allowed",
    "revoked",
    "insufficient_scope",
)


class GatewayError(Exception):
    """An error the client sees as a JSON body; `reason` is the precise cause for logs and metrics."""

    status: int = 500
    code: str = "internal_error"
    reason: str = "internal"
    description: str = "internal error"

    def __init__(
        self,
        description: str | None = None,
        *,
        reason: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if description is not None:
            self.description = description
        if reason is not None:
            self.reason = reason
        self.headers: dict[str, str] = dict(headers or {})
        super().__init__(self.description)


class BadRequest(GatewayError):
    status, code, reason, description = 400, "invalid_request", "bad_request", "malformed request"


class BadPath(BadRequest):
    reason, description = "bad_path", "the request path cannot be normalised safely"


class BadHost(BadRequest):
    reason, description = "bad_host", "the Host header is not a valid host"


class NotFound(GatewayError):
    status, code, reason, description = 404, "not_found", "no_route", "no route matches this request"


class MethodNotAllowed(GatewayError):
    status, code, reason = 405, "method_not_allowed", "method_not_allowed"
    description = "method not allowed on this path"

    def __init__(self, allow: tuple[str, ...]) -> None:
        super().__init__(headers={"Allow": ", ".join(allow)})
        self.allow = allow


class AuthError(GatewayError):
    """401/403 family; carries an RFC 6750 section 3 `WWW-Authenticate: Bearer` challenge."""

    issuer: str = ""  # the issuer name when known (metric label), else ""


class MissingToken(AuthError):
    # RFC 6750 s3.1: a request without any authentication gets no `error=` in the challenge.
    status, code, reason, description = 401, "invalid_request", "missing_token", "a bearer token is required"

    def __init__(self, description: str | None = None) -> None:
        super().__init__(description, headers={"WWW-Authenticate": 'Bearer realm="gateway"'})


class InvalidToken(AuthError):
    status, code, reason, description = 401, "invalid_token", "malformed", "the access token is invalid"

    def __init__(self, reason: str, *, issuer: str = "", principal: Any = None) -> None:
        super().__init__(
            reason=reason,
            headers={
                "WWW-Authenticate": 'Bearer realm="gateway", error="invalid_token", '
                'error_description="the access token is invalid"'
            },
        )
        self.issuer = issuer
        # A token whose signature verified but whose claims are refused: its Principal, for the access log.
        self.principal = principal


class InsufficientScope(AuthError):
    status, code, reason = 403, "insufficient_scope", "insufficient_scope"
    description = "the access token does not allow this request"

    def __init__(self, required_scopes: tuple[str, ...] = (), *, issuer: str = "") -> None:
        challenge = 'Bearer realm="gateway", error="insufficient_scope"'
        # RFC 6750 s3: `scope=` lists the scopes needed; always present on 403 so clients can tell.
        challenge += f', scope="{" ".join(required_scopes)}"'
        super().__init__(headers={"WWW-Authenticate": challenge})
        self.issuer = issuer


class HeaderTooLarge(GatewayError):
    status, code, reason = 431, "request_header_too_large", "header_too_large"
    description = "request header block too large"


class PayloadTooLarge(GatewayError):
    status, code, reason, description = 413, "payload_too_large", "payload_too_large", "request body too large"


class BackendUnavailable(GatewayError):
    status, code, reason = 503, "temporarily_unavailable", "revocation_backend_down"
    description = "the gateway cannot check this token right now; try again"

    def __init__(self, description: str | None = None) -> None:
        super().__init__(description, headers={"Retry-After": "1"})


class UpstreamUnavailable(GatewayError):
    status, code, reason, description = 503, "upstream_unavailable", "circuit_open", "no healthy upstream target"

    def __init__(self, retry_after: float = 1.0) -> None:
        super().__init__(headers={"Retry-After": str(max(1, int(retry_after + 0.999)))})


class UpstreamOverflow(UpstreamUnavailable):
    """Every target that could take the request already has `max_requests` in flight: shed at once,
    not queued, and no verdict on any target's breaker (the target did nothing wrong)."""

    reason, description = "upstream_overflow", "too many requests in flight to the upstream"


class BadGateway(GatewayError):
    status, code, reason, description = 502, "bad_gateway", "upstream_error", "the upstream failed to answer"


class UpstreamTimeout(GatewayError):
    status, code, reason, description = 504, "upstream_timeout", "upstream_timeout", "the upstream timed out"


class ConfigError(Exception):
    """Bad configuration: one line per problem, `FILE:LINE: path.to.key: message`."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class KeyStoreError(Exception):
    """The internal signing key store is unreadable, corrupt or cannot be written."""


class EncryptedKey(ssl.SSLError):
    """A TLS private key file that asks for a passphrase: OpenSSL would prompt on the terminal for it,
    blocking `check`, a start or a reload (the event loop) until someone typed one."""

    def __str__(self) -> str:
        return "the private key is encrypted; give a key file without a passphrase (none can be asked for)"


def no_passphrase() -> bytes:
    """`password=` for every load_cert_chain: an encrypted key is refused, never prompted for."""
    raise EncryptedKey()
