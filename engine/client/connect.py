"""Channels to a `wafer serve`: plaintext (the default), TLS (a CA to trust, else the system's
roots), mutual TLS (a client certificate and key), and a bearer token sent with every call as
``authorization: Bearer <token>`` (over plaintext too, e.g. on loopback).

    WaferClient("host:50051", tls_ca="ca.pem", token=open("token").read().strip())
"""

from __future__ import annotations

import os

import grpc

from engine.client.wire import CHANNEL_OPTIONS
from protos import wafer_pb2 as pb

TOKEN_ENV = "WAFER_TOKEN"  # the CLI's token when --token-file is not given


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def credentials(tls: bool = False, tls_ca: str | None = None, tls_cert: str | None = None,
                tls_key: str | None = None) -> grpc.ChannelCredentials | None:
    """TLS channel credentials, or None for plaintext (no TLS argument given)."""
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("a client certificate (tls_cert) goes with its key (tls_key)")
    if not (tls or tls_ca or tls_cert):
        return None
    return grpc.ssl_channel_credentials(root_certificates=_read(tls_ca), private_key=_read(tls_key),
                                        certificate_chain=_read(tls_cert))


def channel(target: str, aio: bool = False, **tls_kw):
    creds = credentials(**tls_kw)
    mod = grpc.aio if aio else grpc
    if creds is None:
        return mod.insecure_channel(target, options=CHANNEL_OPTIONS)
    return mod.secure_channel(target, creds, options=CHANNEL_OPTIONS)


class _WithMetadata:
    """A stub's multicallable whose calls (and .with_call / .future) also carry ``md``."""

    def __init__(self, call, md: tuple):
        self._call = call
        self._md = md

    def _wrap(self, fn):
        def call(*args, metadata=None, **kw):
            return fn(*args, metadata=tuple(metadata or ()) + self._md, **kw)
        return call

    def __call__(self, *args, **kw):
        return self._wrap(self._call)(*args, **kw)

    def __getattr__(self, name):
        return self._wrap(getattr(self._call, name))


def authorize(stub, token: str | None):
    """``stub`` (a WaferStub) with every call carrying the bearer token; as is without one."""
    if token:
        md = (("authorization", f"Bearer {token}"),)
        for name in pb.DESCRIPTOR.services_by_name["Wafer"].methods_by_name:
            setattr(stub, name, _WithMetadata(getattr(stub, name), md))
    return stub


def read_token(path: str | None = None, env: dict | None = None) -> str | None:
    """The first non-empty line of ``path``, else $WAFER_TOKEN, else None."""
    if path:
        with open(path) as f:
            for line in f:
                if line.strip() and not line.lstrip().startswith("#"):
                    return line.strip()
        raise ValueError(f"{path} holds no token")
    return (os.environ if env is None else env).get(TOKEN_ENV) or None
