"""Helpers shared by the tests of the gRPC server on loopback (tests/test_server_*.py), and
their fixtures: a test module imports ``model_path, server, client`` to get a tiny server of its
own (module scope)."""

from __future__ import annotations

import time
import urllib.request

import pytest

from engine.server.app import ServerOptions
from engine.client import Completion, Token, WaferClient
from engine.server.registry import ModelEntry, Registry
from engine.server.testing import ServerThread
from protos import wafer_pb2 as pb

CONTEXT = 1024


def tiny_server(model_path) -> ServerThread:
    """A server of the tiny model under several names: aliased, deprecated, retired, and one
    with a tight admission queue (its own engine: different limits)."""
    registry = Registry([
        ModelEntry(name="tiny", path=str(model_path), aliases=("tiny-latest",), max_batch=16),
        ModelEntry(name="tiny-2024", path=str(model_path), max_batch=16, status="deprecated",
                   sunset="2099-12-31", successor="tiny"),
        ModelEntry(name="tiny-2020", status="retired", successor="tiny"),
        ModelEntry(name="tiny-narrow", path=str(model_path), max_batch=1, max_waiting=2),
    ], default="tiny")
    return ServerThread(registry, ServerOptions(port=0, metrics_port=0, session_idle_timeout_s=60))


@pytest.fixture(scope="module")
def model_path(tiny_gguf):
    return tiny_gguf("Q4_1", context_length=CONTEXT)


@pytest.fixture(scope="module")
def server(model_path):
    with tiny_server(model_path) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with WaferClient(server.address, timeout=60) as c:
        yield c


def split(items):
    tokens = [i for i in items if isinstance(i, Token)]
    finals = [i for i in items if isinstance(i, Completion)]
    assert len(finals) == 1 and isinstance(items[-1], Completion), "exactly one final, last"
    return tokens, finals[0]


def wait_until(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def kv_used(server, name="tiny"):
    return server.runtime(name).scheduler.allocator.num_used


def scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def session_script(client, requests):
    """Send a whole script of SessionRequests then half-close (as grpcurl does); all responses."""
    return list(client.stub.Session(iter(requests), timeout=60))


def turn(tid, text, n=6):
    return pb.SessionRequest(turn=pb.Turn(turn_id=tid, text=text, sampling=pb.SamplingParams(
        max_tokens=n, temperature=0)))
