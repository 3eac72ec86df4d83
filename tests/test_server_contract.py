"""The wire contract at its edges, on loopback with a tiny synthetic model: requests that fail to
parse (invalid UTF-8 in a string field, a corrupt wire format) in every RPC and inside a Session;
CancelTurn + CloseSession (every turn gets one Final, `closed` names the last turn sent);
reflection under grpc.reflection.v1 and v1alpha."""

from __future__ import annotations

import concurrent.futures as cf
import logging

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos import wafer_pb2 as pb
from serving import CONTEXT, client, kv_used, model_path, scrape, server, session_script, turn, wait_until  # noqa: F401 (fixtures)

BAD_UTF8 = bytes.fromhex("fffe20616263 20c3".replace(" ", ""))  # the repro


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (payloads under 128 bytes)."""
    return bytes([number << 3 | 2, len(payload)]) + payload


# RPC -> (kind, request bytes that fail to parse, the message named, a valid request)
BAD = {
    "Generate": ("unary_stream", field(3, BAD_UTF8), "GenerateRequest",
                 pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=2))),
    "Tokenize": ("unary_unary", field(1, b"tiny") + field(3, BAD_UTF8), "TokenizeRequest",
                 pb.TokenizeRequest(text="hi")),
    "GetModel": ("unary_unary", field(1, BAD_UTF8), "GetModelRequest", pb.GetModelRequest(name="tiny")),
    "ListModels": ("unary_unary", b"\x0a\xff", "ListModelsRequest", pb.ListModelsRequest()),
}
REASON = {"Generate": "invalid UTF-8 in a string field", "Tokenize": "invalid UTF-8 in a string field",
          "GetModel": "invalid UTF-8 in a string field", "ListModels": "the wire format is corrupt"}


def raw_call(channel, method: str, kind: str):
    """A multicallable sending the request bytes as they are (identity serializer)."""
    return getattr(channel, kind)(f"/wafer.v1.Wafer/{method}", request_serializer=None,
                                  response_deserializer=None)


def quiet(caplog):
    """No ERROR, no traceback; at most one WARNING (rate-limited)."""
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert not [r for r in caplog.records if r.exc_info], caplog.text
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) <= 1, caplog.text
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("method", list(BAD))
def test_unparsable_request_is_invalid_argument_naming_the_message(method, client, server, caplog):
    caplog.set_level(logging.INFO)
    kind, data, name, good = BAD[method]
    key = 'wafer_request_errors_total{code="INVALID_ARGUMENT",model_name="unknown"}'
    before = scrape(server.metrics_url).get(key, 0)
    with grpc.insecure_channel(server.address) as ch:
        call = raw_call(ch, method, kind)
        for _ in range(3):  # repeated: still one WARNING line at most
            with pytest.raises(grpc.RpcError) as e:
                out = call(data, timeout=30)
                list(out) if kind == "unary_stream" else out
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert e.value.details() == f"request: {name} failed to parse: {REASON[method]}" + (
                " (proto3 strings must be UTF-8)" if "UTF-8" in REASON[method] else "")
        # the same channel and server go on serving
        ok = call(good.SerializeToString(), timeout=30)
        assert (list(ok) if kind == "unary_stream" else ok) is not None
    assert scrape(server.metrics_url)[key] - before == 3
    quiet(caplog)


def test_every_rpc_is_covered():
    assert set(BAD) | {"Session"} == set(pb.DESCRIPTOR.services_by_name["Wafer"].methods_by_name)


def session_raw(server, messages: list[bytes]):
    """A Session call sending raw message bytes, then half-closing: the parsed responses and the
    call (for its status)."""
    with grpc.insecure_channel(server.address) as ch:
        call = ch.stream_stream("/wafer.v1.Wafer/Session", request_serializer=None,
                                response_deserializer=pb.SessionResponse.FromString)(iter(messages), timeout=60)
        out = []
        try:
            out.extend(call)
        except grpc.RpcError as e:
            return out, e.code(), e.details()
        return out, call.code(), call.details()


def test_unparsable_session_message_is_a_turn_error_and_the_session_goes_on(server, caplog):
    caplog.set_level(logging.INFO)
    ser = lambda m: m.SerializeToString()  # noqa: E731
    bad_turn = field(2, field(1, b"t-bad") + field(3, BAD_UTF8))
    resps, code, _ = session_raw(server, [ser(pb.SessionRequest(open=pb.SessionOpen())), bad_turn,
                                          ser(turn("t1", "hello", 3)), bad_turn, ser(turn("t2", " more", 3))])
    kinds = [(r.turn_id, r.WhichOneof("kind")) for r in resps]
    assert kinds[0] == ("", "opened")
    errors = [r for r in resps if r.WhichOneof("kind") == "error"]
    assert [(r.turn_id, r.error.code) for r in errors] == [("", "INVALID_ARGUMENT")] * 2
    assert errors[0].error.message.startswith(
        "request: SessionRequest failed to parse: invalid UTF-8 in a string field")
    finals = [r.turn_id for r in resps if r.WhichOneof("kind") == "final"]
    assert finals == ["t1", "t2"]  # the valid turns after it were not dropped
    assert code == grpc.StatusCode.OK  # half-close after the turns
    quiet(caplog)


def test_unparsable_session_open_ends_the_call(server, caplog):
    caplog.set_level(logging.INFO)
    resps, code, details = session_raw(server, [field(1, field(1, BAD_UTF8))])
    assert resps == [] and code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("request: SessionRequest failed to parse: invalid UTF-8")
    quiet(caplog)


# ------------------------------------------------------------------ CancelTurn + CloseSession

OPEN = pb.SessionRequest(open=pb.SessionOpen())
CANCEL = pb.SessionRequest(cancel=pb.CancelTurn())
CLOSE = pb.SessionRequest(close=pb.CloseSession())


def ends(resps):
    """(turn_id, kind, finish_reason | closed reason) after `opened`."""
    out = []
    for r in resps[1:]:
        kind = r.WhichOneof("kind")
        if kind == "final":
            out.append((r.turn_id, "final", r.final.finish_reason))
        elif kind == "closed":
            out.append((r.turn_id, "closed", r.closed.reason))
        elif kind == "error":
            out.append((r.turn_id, "error", r.error.code))
    return out


def test_cancel_then_close_storm_every_turn_gets_its_final_then_closed(client, server):
    """20 sessions at once: turns t0 (running), t1, t2 (queued), CancelTurn, CloseSession at
    once: t0's Final "cancelled", then t1's and t2's, then `closed` naming t2, the last turn.
    t1 starts once t0 is cancelled and may finish its 4 tokens before the close is read (then
    its Final says so); t2 is still queued or running when the close cancels it."""
    script = [OPEN, turn("t0", "run", CONTEXT - 10), turn("t1", " more", 4), turn("t2", " again", 4),
              CANCEL, CLOSE]
    with cf.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: session_script(client, script), range(20)))
    for resps in results:
        assert resps[0].WhichOneof("kind") == "opened"
        got = ends(resps)
        assert [(t, kind) for t, kind, _ in got] == [("t0", "final"), ("t1", "final"), ("t2", "final"),
                                                     ("t2", "closed")]
        assert got[0][2] == "cancelled" and got[1][2] in ("cancelled", "length", "stop")
        assert got[2][2] in ("cancelled", "length", "stop") and got[3][2] == "client"
        assert resps[-1].WhichOneof("kind") == "closed"
        running = [r for r in resps if r.turn_id == "t0" and r.WhichOneof("kind") == "final"][0]
        assert running.final.usage.prompt_tokens > 0  # (t1 may start before the close arrives)
    assert wait_until(lambda: kv_used(server) == 0)


def test_close_after_finished_turns_names_the_last_turn_and_ignores_later_messages(client):
    script = [OPEN, turn("a", "one", 2), turn("b", " two", 2), CLOSE, turn("c", " three", 2), CANCEL]
    resps = session_script(client, script)
    assert [e[:2] for e in ends(resps)] == [("a", "final"), ("b", "final"), ("b", "closed")]
    assert resps[-1].closed.reason == "client"  # c, after close, was ignored


def test_close_while_running_sends_the_final_before_closed(client):
    """The sync client's close(): the running turn's final comes first (no CancelTurn needed)."""
    resps = session_script(client, [OPEN, turn("long", "run", CONTEXT - 10), CLOSE])
    assert ends(resps) == [("long", "final", "cancelled"), ("long", "closed", "client")]


# ------------------------------------------------------------------ reflection


def reflection_services(channel, service: str) -> list[str]:
    call = channel.stream_stream(f"/{service}/ServerReflectionInfo",
                                 request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                 response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    reqs = [reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="wafer.v1.Wafer"),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection")]
    listed, wafer, v1 = list(call(iter(reqs), timeout=30))
    assert wafer.WhichOneof("message_response") == "file_descriptor_response"
    assert v1.WhichOneof("message_response") == "file_descriptor_response"
    return [s.name for s in listed.list_services_response.service]


@pytest.mark.parametrize("service", ["grpc.reflection.v1.ServerReflection",
                                     "grpc.reflection.v1alpha.ServerReflection"])
def test_reflection_v1_and_v1alpha(server, service):
    with grpc.insecure_channel(server.address) as ch:
        names = reflection_services(ch, service)
    assert {"wafer.v1.Wafer", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= set(names)


def test_reflection_v1alpha_stub_still_works(server):
    with grpc.insecure_channel(server.address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        r = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                           timeout=30))
        assert "wafer.v1.Wafer" in [s.name for s in r.list_services_response.service]
