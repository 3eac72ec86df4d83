"""Regenerate the committed Python stubs from protos/wafer.proto (`make protos`).

The proto is compiled with the repository root as include path, so the stubs import each other
as ``protos.wafer_pb2`` and the descriptor's file name is ``protos/wafer.proto``.

    python -m protos.generate            # rewrite protos/wafer_pb2*.py
    python -m protos.generate --out DIR  # write into DIR/protos/ instead (used by the test)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
ROOT = PROTO_DIR.parent
PROTO_FILES = ["protos/wafer.proto"]
GENERATED = ["wafer_pb2.py", "wafer_pb2.pyi", "wafer_pb2_grpc.py"]


def generate(out_root: Path) -> list[Path]:
    """Compile the protos into ``out_root/protos/``; return the generated files."""
    from grpc_tools import protoc  # dev dependency (grpcio-tools)

    (out_root / "protos").mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(ROOT / p) for p in PROTO_FILES],
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    return [out_root / "protos" / name for name in GENERATED]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: repo root)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
