"""The committed gRPC stubs are exactly what protoc generates from protos/wafer.proto."""

from __future__ import annotations

from pathlib import Path

from protos import generate


def test_stubs_up_to_date(tmp_path: Path) -> None:
    fresh = generate.generate(tmp_path)
    stale = []
    for path in fresh:
        committed = generate.PROTO_DIR / path.name
        if not committed.exists() or committed.read_bytes() != path.read_bytes():
            stale.append(path.name)
    assert not stale, f"stale generated stubs {stale}: run `make protos` and commit them"


def test_service_shape() -> None:
    from protos import wafer_pb2

    service = wafer_pb2.DESCRIPTOR.services_by_name["Wafer"]
    assert service.full_name == "wafer.v1.Wafer"
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {"Generate", "Session", "ListModels", "GetModel", "Tokenize"}
    assert methods["Generate"].server_streaming and not methods["Generate"].client_streaming
    assert methods["Session"].server_streaming and methods["Session"].client_streaming
