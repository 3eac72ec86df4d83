"""Who may talk to the server: TLS (server certificate; mutual TLS with a client CA) and bearer
tokens, for the gRPC port and the metrics port alike. Off by default (the server binds loopback).

- ``server_credentials(cert, key, client_ca)``: gRPC TLS credentials; mTLS when ``client_ca``.
- ``load_tokens(file, env)``: the accepted tokens, one per line of ``--auth-token-file`` and/or
  comma/space separated in ``WAFER_AUTH_TOKENS``.
- ``BearerAuth``: a grpc.aio server interceptor; a call whose metadata lacks ``authorization:
  Bearer <token>`` with an accepted token ends with UNAUTHENTICATED "missing or invalid bearer
  token" before its request is even parsed. Tokens are compared with ``hmac.compare_digest``
  against every accepted token, and never logged. Health checks need no token (load balancers
  and orchestrators probe without one; the answer is only SERVING / NOT_SERVING); reflection
  does (it is the API's surface).
- ``metrics_app(app, tokens)``: the same check around the Prometheus WSGI app (401 with
  ``WWW-Authenticate: Bearer``); ``ssl_context`` for serving it over HTTPS.
"""

from __future__ import annotations

import hmac
import logging
import os
import ssl

import grpc

from engine.server.parse import RateLimitedLog

log = logging.getLogger("wafer.server.auth")

TOKENS_ENV = "WAFER_AUTH_TOKENS"
UNAUTHENTICATED_MESSAGE = "missing or invalid bearer token"
OPEN_SERVICES = ("/grpc.health.v1.Health/",)  # methods under these prefixes need no token


def read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise OSError(f"cannot read the {what} {path}: {e.strerror or e}") from None


def server_credentials(cert: str, key: str, client_ca: str | None = None) -> grpc.ServerCredentials:
    """TLS with the server's certificate chain and key (PEM files); with ``client_ca``, clients
    must present a certificate that CA signed (mutual TLS)."""
    ca = read_file(client_ca, "TLS client CA") if client_ca else None
    return grpc.ssl_server_credentials([(read_file(key, "TLS key"), read_file(cert, "TLS certificate"))],
                                       root_certificates=ca, require_client_auth=ca is not None)


def ssl_context(cert: str, key: str, client_ca: str | None = None) -> ssl.SSLContext:
    """The same for an HTTPS server (the metrics endpoint)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise OSError(f"cannot load the TLS certificate {cert} and key {key}: {e}") from None
    if client_ca:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def load_tokens(path: str | None = None, env: dict | None = None) -> tuple[bytes, ...]:
    """The accepted bearer tokens: the file's non-empty lines (``#`` starts a comment line) and
    the environment variable's comma- or space-separated words. Empty: no check."""
    env = os.environ if env is None else env
    tokens = []
    if path:
        for line in read_file(path, "auth token file").decode().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                tokens.append(line)
    tokens += env.get(TOKENS_ENV, "").replace(",", " ").split()
    for t in tokens:
        if any(c.isspace() for c in t) or not t.isprintable():
            raise ValueError("a bearer token must be printable characters without spaces")
    return tuple(dict.fromkeys(t.encode() for t in tokens))


def token_ok(authorization: str | bytes | None, tokens: tuple[bytes, ...]) -> bool:
    """Whether an ``authorization`` value is ``Bearer <one of tokens>``; constant time in the
    token's contents (each accepted token is compared, whichever matches)."""
    if not authorization:
        return False
    if isinstance(authorization, str):
        authorization = authorization.encode("utf-8", "replace")
    scheme, _, presented = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    presented = presented.strip()
    ok = False
    for t in tokens:
        ok |= hmac.compare_digest(presented, t)
    return ok


def _deny_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape that refuses the call without parsing its request."""

    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

    async def stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        yield  # pragma: no cover - an async generator, as gRPC wants for streamed responses

    skip = lambda data: None  # noqa: E731 - the request is not read
    if handler.response_streaming:
        kind = "stream_stream" if handler.request_streaming else "unary_stream"
    else:
        kind = "stream_unary" if handler.request_streaming else "unary_unary"
    make = getattr(grpc, f"{kind}_rpc_method_handler")
    return make(stream if handler.response_streaming else unary, request_deserializer=skip,
                response_serializer=handler.response_serializer)


class BearerAuth(grpc.aio.ServerInterceptor):
    """Refuses calls without an accepted bearer token (UNAUTHENTICATED); health checks pass."""

    def __init__(self, tokens: tuple[bytes, ...], on_denied=None):
        if not tokens:
            raise ValueError("BearerAuth needs at least one token")
        self.tokens = tokens
        self.on_denied = on_denied  # called with the method name (the server counts it)
        self._warn = RateLimitedLog(log)

    async def intercept_service(self, continuation, details):
        method = details.method
        handler = await continuation(details)
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler
        value = None
        for k, v in details.invocation_metadata or ():
            if k == "authorization":
                value = v
                break
        if token_ok(value, self.tokens):
            return handler
        self._warn("refused a call to %s: %s bearer token", method,
                   "no" if value is None else "a wrong or malformed")
        if self.on_denied is not None:
            self.on_denied(method)
        return _deny_handler(handler)


def metrics_app(app, tokens: tuple[bytes, ...]):
    """A WSGI app answering 401 unless the request carries an accepted bearer token."""

    def guarded(environ, start_response):
        if token_ok(environ.get("HTTP_AUTHORIZATION"), tokens):
            return app(environ, start_response)
        body = f"{UNAUTHENTICATED_MESSAGE}\n".encode()
        start_response("401 Unauthorized", [("Content-Type", "text/plain; charset=utf-8"),
                                             ("Content-Length", str(len(body))),
                                             ("WWW-Authenticate", 'Bearer realm="wafer metrics"')])
        return [body]

    return guarded
