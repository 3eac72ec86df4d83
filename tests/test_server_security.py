"""TLS, mutual TLS and bearer tokens on the gRPC and metrics ports, with a CA, a server and a client
certificate made at test time (openssl), on loopback with a tiny synthetic model."""

from __future__ import annotations

import logging
import ssl
import subprocess
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from engine.cli.main import main as wafer
from engine.client import SessionError, WaferClient
from engine.server.app import ServerOptions
from engine.server.registry import ModelEntry, Registry
from engine.server.security import load_tokens, token_ok
from engine.server.testing import ServerThread
from serving import CONTEXT

TOKENS = ("tok-alpha-0123456789", "tok-beta-9876543210")
WRONG = "tok-wrong-5555555555"


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """ca.pem, server.pem/key (127.0.0.1, localhost), client.pem/key signed by the CA, and
    other-ca.pem/other.pem/key: a client certificate from a CA the server does not trust."""
    d = tmp_path_factory.mktemp("certs")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2",
                "-subj", f"/CN=wafer test {ca}", "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    for name, ca, ext in (("server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"),
                          ("client", "ca", "extendedKeyUsage=clientAuth"),
                          ("other", "other-ca", "extendedKeyUsage=clientAuth")):
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=wafer test {name}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    return {p.stem if p.suffix == ".pem" else p.stem + ".key": str(p) for p in d.iterdir()
            if p.suffix in (".pem", ".key")}


@pytest.fixture(scope="module")
def model_path(tiny_gguf):
    return tiny_gguf("Q4_1", context_length=CONTEXT)


def start(model_path, **options) -> ServerThread:
    registry = Registry([ModelEntry(name="tiny", path=str(model_path), max_batch=4)], default="tiny")
    return ServerThread(registry, ServerOptions(port=0, metrics_port=0, **options)).start()


@pytest.fixture(scope="module")
def tls_server(model_path, certs):
    """TLS (server certificate only) and bearer tokens."""
    srv = start(model_path, tls_cert=certs["server"], tls_key=certs["server.key"],
                auth_tokens=tuple(t.encode() for t in TOKENS))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def mtls_server(model_path, certs):
    srv = start(model_path, tls_cert=certs["server"], tls_key=certs["server.key"], tls_client_ca=certs["ca"])
    yield srv
    srv.stop()


def https(url: str, certs, token: str | None = None, client_cert: bool = False):
    ctx = ssl.create_default_context(cafile=certs["ca"])
    if client_cert:
        ctx.load_cert_chain(certs["client"], certs["client.key"])
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    return urllib.request.urlopen(req, timeout=10, context=ctx)


def metrics_url(srv, scheme="https"):
    return f"{scheme}://127.0.0.1:{srv.server.metrics_port}/metrics"


# ------------------------------------------------------------------ TLS


def test_tls_with_a_token_streams(tls_server, certs):
    with WaferClient(tls_server.address, tls_ca=certs["ca"], token=TOKENS[1], timeout=60) as c:
        text, done = c.complete("hello", max_tokens=3, temperature=0)
        assert done.usage["completion_tokens"] >= 1
        with c.session() as s:  # the bidirectional stream carries the token too
            _, done = s.say("hi", max_tokens=2, temperature=0)
            assert done.finish_reason in ("stop", "length")


def test_plaintext_to_the_tls_port_fails(tls_server):
    with WaferClient(tls_server.address, token=TOKENS[0], timeout=10) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.list_models()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_needs_a_client_certificate_the_ca_signed(mtls_server, certs):
    with WaferClient(mtls_server.address, tls_ca=certs["ca"], tls_cert=certs["client"],
                     tls_key=certs["client.key"], timeout=60) as c:
        assert [m.name for m in c.list_models()] == ["tiny"]
    for cert in (None, "other"):  # no client certificate; one from a CA the server does not trust
        kw = dict(tls_cert=certs[cert], tls_key=certs[cert + ".key"]) if cert else {}
        with WaferClient(mtls_server.address, tls_ca=certs["ca"], timeout=10, **kw) as c:
            with pytest.raises(grpc.RpcError) as e:
                c.list_models()
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_metrics_over_https_and_mtls(tls_server, mtls_server, certs):
    assert https(metrics_url(tls_server), certs, token=TOKENS[0]).status == 200
    with pytest.raises(OSError):  # plaintext HTTP to the HTTPS port (a reset, or an error)
        urllib.request.urlopen(metrics_url(tls_server, "http"), timeout=10).read()
    assert b"wafer_request_errors" in https(metrics_url(mtls_server), certs, client_cert=True).read()
    with pytest.raises(OSError):  # no client certificate (URLError, SSLError or a reset)
        https(metrics_url(mtls_server), certs).read()


# ------------------------------------------------------------------ bearer tokens


def test_bearer_token_missing_or_wrong_is_unauthenticated_and_never_logged(tls_server, certs, caplog):
    caplog.set_level(logging.DEBUG)
    for token in (None, WRONG, "", TOKENS[0] + "x", TOKENS[0][:-1]):
        with WaferClient(tls_server.address, tls_ca=certs["ca"], token=token, timeout=30) as c:
            with pytest.raises(grpc.RpcError) as e:
                list(c.generate("hi", max_tokens=2))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert e.value.details() == "missing or invalid bearer token"
            for call in (c.list_models, lambda: c.session()):
                with pytest.raises((grpc.RpcError, SessionError)) as e:
                    call()
            # health needs no token (load balancers); reflection does
            health = health_pb2_grpc.HealthStub(c.channel)
            r = health.Check(health_pb2.HealthCheckRequest(service="wafer.v1.Wafer"), timeout=10)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(c.channel)
            with pytest.raises(grpc.RpcError) as e:
                list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                               timeout=10))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for t in TOKENS + (WRONG,):
        assert t not in caplog.text
    assert "refused a call to /wafer.v1.Wafer/Generate" in caplog.text
    errors = https(metrics_url(tls_server), certs, token=TOKENS[0]).read().decode()
    assert 'wafer_request_errors_total{code="UNAUTHENTICATED",model_name="unknown"}' in errors


def test_metrics_need_the_token(tls_server, certs):
    with pytest.raises(urllib.error.HTTPError) as e:
        https(metrics_url(tls_server), certs)
    assert e.value.code == 401 and e.value.headers["WWW-Authenticate"].startswith("Bearer")
    with pytest.raises(urllib.error.HTTPError) as e:
        https(metrics_url(tls_server), certs, token=WRONG)
    assert e.value.code == 401
    assert b"wafer_time_to_first_token_seconds" in https(metrics_url(tls_server), certs, token=TOKENS[1]).read()


def test_cli_generate_with_tls_ca_and_token_file(tls_server, certs, tmp_path, capsys):
    token_file = tmp_path / "token"
    token_file.write_text(f"# the token\n{TOKENS[0]}\n")
    args = ["generate", "--server", tls_server.address, "--prompt", "hi", "--max-tokens", "2", "--json",
            "--tls-ca", certs["ca"]]
    assert wafer(args + ["--token-file", str(token_file)]) == 0
    assert '"finish_reason"' in capsys.readouterr().out
    assert wafer(args) == 2  # no token
    assert "UNAUTHENTICATED: missing or invalid bearer token" in capsys.readouterr().err


def test_token_parsing(tmp_path):
    f = tmp_path / "tokens"
    f.write_text("# comment\n  a1  \n\nb2\n")
    assert load_tokens(str(f), env={"WAFER_AUTH_TOKENS": "c3, d4 a1"}) == (b"a1", b"b2", b"c3", b"d4")
    assert load_tokens(None, env={}) == ()
    tokens = (b"a1", b"b2")
    assert token_ok("Bearer b2", tokens) and token_ok("bearer  a1", tokens)
    assert not token_ok("Bearer b", tokens) and not token_ok("b2", tokens) and not token_ok(None, tokens)
    assert not token_ok("Basic b2", tokens) and not token_ok("Bearer ", tokens)
