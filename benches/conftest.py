"""Shared bench fixtures: the real model and a read-bandwidth baseline measured in the same run.

Benchmarks report; they never assert times (machines here are shared and noisy). Run with
`make bench` or `.venv/bin/python -m pytest benches -s --benchmark-json out.json`.
"""

from __future__ import annotations

import time

import numba
import numpy as np
import pytest

from engine.fetch import resolve_model

REPORT: dict[str, dict] = {}


@numba.njit(parallel=True, fastmath=True, cache=True)
def _sum_chunks(a, n_chunks):
    chunk = a.size // n_chunks
    parts = np.zeros(n_chunks, np.float32)
    for c in numba.prange(n_chunks):
        s = np.float32(0.0)
        for i in range(c * chunk, (c + 1) * chunk):
            s += a[i]
        parts[c] = s
    return parts.sum()


def l3_cache_bytes(default: int = 32 << 20) -> int:
    """The last-level cache's size as Linux reports it (some VMs report the host's: 300 MB)."""
    try:
        text = open("/sys/devices/system/cpu/cpu0/cache/index3/size").read().strip()
    except OSError:
        return default
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    return int(text.rstrip("KMGkmg")) * scale


def measure_read_bandwidth(n_bytes: int = 1 << 29, repeats: int = 5) -> float:
    """STREAM-like: GB/s of a parallel sum over ``n_bytes`` (best of N)."""
    a = np.ones(n_bytes // 4, dtype=np.float32)
    _sum_chunks(a, 256)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        _sum_chunks(a, 256)
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best / 1e9


@pytest.fixture(scope="session")
def read_bandwidth_gbs() -> float:
    """Memory: a buffer 4x the last-level cache (at least 512 MB), so the sum streams from DRAM."""
    n = max(1 << 29, 4 * l3_cache_bytes())
    gbs = measure_read_bandwidth(n)
    REPORT["read_bandwidth"] = {"GB/s": round(gbs, 2), "buffer_MB": n >> 20,
                                "l3_MB": l3_cache_bytes() >> 20}
    return gbs


@pytest.fixture(scope="session")
def model_path():
    return resolve_model("smollm2-135m")


def pytest_terminal_summary(terminalreporter):
    if not REPORT:
        return
    terminalreporter.write_sep("=", "wafer bench report")
    for name, row in REPORT.items():
        cells = "  ".join(f"{k}={v}" for k, v in row.items())
        terminalreporter.write_line(f"{name:28s} {cells}")
