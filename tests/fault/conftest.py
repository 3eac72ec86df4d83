"""The fault suite's shared server: the tiny synthetic model on loopback, three engines (a
roomy one, a narrow one for overload, one with admission by predicted wait), a retired name, and
the metrics endpoint; every test in tests/fault is marked ``fault``."""

from __future__ import annotations

import pytest

from engine.server.app import ServerOptions
from engine.server.registry import ModelEntry, Registry
from engine.server.testing import ServerThread
from faults import assert_invariants, take_baseline

CONTEXT = 2048


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/tests/fault/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.fault)


@pytest.fixture(scope="session")
def fault_model(tiny_gguf):
    return tiny_gguf("Q4_1", context_length=CONTEXT)


@pytest.fixture(scope="session")
def fault_server(fault_model):
    registry = Registry([
        ModelEntry(name="tiny", path=str(fault_model), max_batch=16, max_waiting=64),
        ModelEntry(name="tiny-narrow", path=str(fault_model), max_batch=4, max_waiting=8),
        ModelEntry(name="tiny-q", path=str(fault_model), max_batch=4, max_waiting=64, max_queue_ms=300),
        ModelEntry(name="tiny-retired", status="retired", successor="tiny"),
    ], default="tiny")
    with ServerThread(registry, ServerOptions(port=0, metrics_port=0, session_idle_timeout_s=60)) as srv:
        from engine.client import WaferClient

        with WaferClient(srv.address, timeout=30) as c:  # warm every engine and the loop
            for m in ("tiny", "tiny-narrow", "tiny-q"):
                list(c.generate("warm", model=m, max_tokens=2, temperature=0))
        yield srv


@pytest.fixture
def baseline(fault_server):
    """The server's state before a test; the test must leave it so (checked after it too)."""
    b = take_baseline(fault_server)
    yield b
    assert_invariants(fault_server, b)
