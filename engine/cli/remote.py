"""The flags that reach a secured `wafer serve` (TLS, mutual TLS, a bearer token), shared by the
commands that talk to a server (generate --server, chat, bench)."""

from __future__ import annotations


def add_connection_arguments(p) -> None:
    g = p.add_argument_group("connection (a server started with --tls-cert / --auth-token-file)")
    g.add_argument("--tls", action="store_true", help="TLS, trusting the system's CA certificates")
    g.add_argument("--tls-ca", metavar="FILE", help="TLS, trusting this PEM CA (e.g. a self-signed one)")
    g.add_argument("--tls-cert", metavar="FILE", help="mutual TLS: this client's PEM certificate (with --tls-key)")
    g.add_argument("--tls-key", metavar="FILE", help="mutual TLS: its PEM private key")
    g.add_argument("--token-file", metavar="FILE",
                   help="send `authorization: Bearer <its first line>` (default: $WAFER_TOKEN, if set)")


def client_kwargs(args) -> dict:
    """WaferClient / AsyncWaferClient keyword arguments from those flags; ValueError or OSError
    for a flag that cannot be used (the caller reports it)."""
    from engine.client.connect import read_token

    if bool(getattr(args, "tls_cert", None)) != bool(getattr(args, "tls_key", None)):
        raise ValueError("--tls-cert and --tls-key go together")
    return dict(tls=bool(getattr(args, "tls", False)), tls_ca=getattr(args, "tls_ca", None),
                tls_cert=getattr(args, "tls_cert", None), tls_key=getattr(args, "tls_key", None),
                token=read_token(getattr(args, "token_file", None)))
