"""Shared bench fixtures: the real model and a read-bandwidth baseline measured in the same run.

Benchmarks report; they never assert times (machines here are shared and noisy). Run with
`make bench` or `.venv/bin/python -m pytest benches -s --benchmark-json out.json`.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from engine.fetch import resolve_model

REPORT: dict[str, dict] = {}


class ReadPass:
    """A read of ``n_bytes`` by ``threads`` threads, each summing its slices with numpy (SIMD:
    the loads bound it, not the adds). A Numba loop did this before; it was not vectorized and
    measured 4.6 GB/s per thread of scalar adds, half of what decode itself reads."""

    def __init__(self, n_bytes: int, threads: int = 2):
        self.a = np.ones(n_bytes // 4, dtype=np.float32)
        self.slices = np.array_split(self.a, 8 * threads)  # several per thread: a slow one evens out
        self.pool = ThreadPoolExecutor(threads)

    def seconds(self) -> float:
        t = time.perf_counter()
        for _ in self.pool.map(np.add.reduce, self.slices):
            pass
        return time.perf_counter() - t

    def close(self) -> None:
        self.pool.shutdown()


def l3_cache_bytes(default: int = 32 << 20) -> int:
    """The last-level cache's size as Linux reports it (some VMs report the host's: 300 MB)."""
    try:
        text = open("/sys/devices/system/cpu/cpu0/cache/index3/size").read().strip()
    except OSError:
        return default
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    return int(text.rstrip("KMGkmg")) * scale


def measure_read_bandwidth(n_bytes: int = 1 << 29, repeats: int = 5, threads: int = 2) -> float:
    """STREAM-like: GB/s of a parallel read of ``n_bytes`` (best of N)."""
    r = ReadPass(n_bytes, threads)
    try:
        r.seconds()
        return r.a.nbytes / min(r.seconds() for _ in range(repeats)) / 1e9
    finally:
        r.close()


@pytest.fixture(scope="session")
def read_bandwidth_gbs() -> float:
    """Memory: a buffer 4x the last-level cache (at least 512 MB), so the read streams from DRAM."""
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
