"""Which integer-dot kernel this CPU gets, decided once at import from LLVM's host features.

`vnni`: AVX512-VNNI's vpdpbusd (u8 x s8 -> i32, 64 bytes per instruction). `portable`: the same
integer arithmetic in plain LLVM vector IR (widen, multiply, add), which LLVM lowers for AVX2,
AVX-512 without VNNI, NEON, ...; integer sums are exact, so both give the same bits.
WAFER_ISA=portable forces the portable kernel (tests compare the two).
"""

from __future__ import annotations

import os

import llvmlite.binding as llvm


def host_features() -> set[str]:
    return {name for name, on in llvm.get_host_cpu_features().items() if on}


def int8_isa() -> str:
    forced = os.environ.get("WAFER_ISA", "").strip().lower()
    if forced in ("portable", "vnni"):
        return forced
    return "vnni" if {"avx512vnni", "avx512bw", "avx512vl", "avx512f"} <= host_features() else "portable"


ISA = int8_isa()
