"""Property-based fuzzing of every request field (hypothesis), and raw bytes on the wire.

Every call gets OK or a status among ALLOWED (never UNKNOWN, INTERNAL or a hang), health stays
SERVING, and the server's invariants hold afterwards (tests/fault/faults.py). Bounded: ~50
examples per RPC, derandomized (the same examples every run), a deadline on every call."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from faults import assert_invariants, take_baseline
from protos import wafer_pb2 as pb
from protos import wafer_pb2_grpc as pb_grpc

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE,
           grpc.StatusCode.FAILED_PRECONDITION}  # the last: the registry's retired model
CALL_TIMEOUT_S = 20.0
FUZZ = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

I32 = st.one_of(st.integers(-2**31, 2**31 - 1), st.sampled_from([0, 1, -1, 2**31 - 1, -2**31, 255, 256, 320]))
SMALL = st.one_of(st.integers(-3, 40), st.sampled_from([2**31 - 1, -2**31]))
F32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
TEXT = st.one_of(st.text(max_size=40), st.sampled_from(["", "\n", "\x00", "<|im_end|>", "\U0010ffff" * 3]),
                 st.text(max_size=3).map(lambda s: s * 3000))
MODEL = st.one_of(st.sampled_from(["", "tiny", "tiny-narrow", "tiny-q", "tiny-retired", "TINY"]), st.text(max_size=80))


def opt(strategy):
    return st.one_of(st.none(), strategy)


@st.composite
def sampling(draw):
    kw = {k: v for k, v in dict(
        temperature=draw(opt(F32)), top_p=draw(opt(F32)), repetition_penalty=draw(opt(F32)),
        seed=draw(opt(st.integers(0, 2**64 - 1))), max_tokens=draw(opt(SMALL)),
    ).items() if v is not None}
    return pb.SamplingParams(
        top_k=draw(I32), min_p=draw(st.one_of(st.just(0.0), F32)),
        stop=draw(st.lists(TEXT, max_size=20)), stop_token_ids=draw(st.lists(I32, max_size=5)),
        logprobs=draw(st.one_of(st.integers(-2, 22), I32)), **kw)


def messages():
    role = st.one_of(st.sampled_from(["system", "user", "assistant"]), TEXT)
    return st.builds(pb.Messages, messages=st.lists(st.builds(pb.ChatMessage, role=role, content=TEXT), max_size=4))


def token_ids():
    return st.builds(pb.TokenIds, ids=st.lists(st.one_of(I32, st.integers(0, 319)), max_size=40))


@st.composite
def generate_requests(draw):
    req = pb.GenerateRequest(model=draw(MODEL), sampling=draw(sampling()),
                             coalesce_tokens=draw(I32), request_id=draw(TEXT))
    which = draw(st.sampled_from(["text", "messages", "token_ids", None]))
    if which == "text":
        req.text = draw(TEXT)
    elif which == "messages":
        req.messages.CopyFrom(draw(messages()))
    elif which == "token_ids":
        req.token_ids.CopyFrom(draw(token_ids()))
    return req


@st.composite
def tokenize_requests(draw):
    req = pb.TokenizeRequest(model=draw(MODEL))
    which = draw(st.sampled_from(["text", "messages", None]))
    if which == "text":
        req.text = draw(TEXT)
    elif which == "messages":
        req.messages.CopyFrom(draw(messages()))
    return req


@st.composite
def session_scripts(draw):
    out = [pb.SessionRequest(open=pb.SessionOpen(model=draw(st.one_of(st.just(""), MODEL)),
                                                 idle_timeout_s=draw(st.integers(0, 2**32 - 1))))]
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["turn", "turn", "cancel", "close", "open", "empty"]))
        if kind == "turn":
            t = pb.Turn(turn_id=draw(TEXT), sampling=draw(sampling()), coalesce_tokens=draw(I32))
            which = draw(st.sampled_from(["text", "messages", "token_ids", None]))
            if which == "text":
                t.text = draw(TEXT)
            elif which == "messages":
                t.messages.CopyFrom(draw(messages()))
            elif which == "token_ids":
                t.token_ids.CopyFrom(draw(token_ids()))
            out.append(pb.SessionRequest(turn=t))
        elif kind == "cancel":
            out.append(pb.SessionRequest(cancel=pb.CancelTurn(turn_id=draw(TEXT))))
        elif kind == "close":
            out.append(pb.SessionRequest(close=pb.CloseSession()))
        elif kind == "open":
            out.append(pb.SessionRequest(open=pb.SessionOpen()))
        else:
            out.append(pb.SessionRequest())
    return out


# ------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def stub(fault_server):
    with grpc.insecure_channel(fault_server.address) as ch:
        yield pb_grpc.WaferStub(ch), ch


def code_of(fn) -> tuple[grpc.StatusCode, str]:
    try:
        fn()
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""


def check_generate(stub, req) -> None:
    def call():
        msgs = list(stub.Generate(req, timeout=CALL_TIMEOUT_S))
        assert msgs and msgs[-1].HasField("final"), "an OK stream without its final"
        assert all(m.HasField("chunk") for m in msgs[:-1])
    code, details = code_of(call)
    assert code in ALLOWED, f"{code}: {details}"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert details, "a refusal must say which field"


def fuzz(fault_server, body):
    """Run a hypothesis-driven ``body`` between a baseline and the invariants."""
    b = take_baseline(fault_server)
    body()
    assert_invariants(fault_server, b)


# ------------------------------------------------------------------------- typed fields


def test_fuzz_generate_fields(fault_server, stub):
    s, _ = stub

    @FUZZ
    @given(generate_requests())
    def one(req):
        check_generate(s, req)

    fuzz(fault_server, one)


def test_fuzz_tokenize_fields(fault_server, stub):
    s, _ = stub

    @FUZZ
    @given(tokenize_requests())
    def one(req):
        code, details = code_of(lambda: s.Tokenize(req, timeout=CALL_TIMEOUT_S))
        assert code in ALLOWED, f"{code}: {details}"

    fuzz(fault_server, one)


def test_fuzz_get_model_fields(fault_server, stub):
    s, _ = stub

    @FUZZ
    @given(st.builds(pb.GetModelRequest, name=MODEL))
    def one(req):
        code, details = code_of(lambda: s.GetModel(req, timeout=CALL_TIMEOUT_S))
        assert code in ALLOWED, f"{code}: {details}"

    fuzz(fault_server, one)


def test_fuzz_session_scripts(fault_server, stub):
    """A fuzzed script of SessionRequests then a half-close: the stream ends with OK or an
    allowed status; every TurnError carries an allowed code; nothing hangs."""
    s, _ = stub
    allowed = {c.name for c in ALLOWED}

    @FUZZ
    @given(session_scripts())
    def one(script):
        got = []

        def call():
            got.extend(s.Session(iter(script), timeout=CALL_TIMEOUT_S))
        code, details = code_of(call)
        assert code in ALLOWED, f"{code}: {details}"
        for r in got:
            if r.HasField("error"):
                assert r.error.code in allowed, r.error

    fuzz(fault_server, one)


# ------------------------------------------------------------------------- raw bytes on the wire


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes or message)."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def raw_unary(ch, method):
    return ch.unary_unary(f"/wafer.v1.Wafer/{method}")  # no serializers: bytes in, bytes out


def raw_call(ch, method: str, raw: bytes) -> tuple[grpc.StatusCode, str]:
    if method == "Generate":
        fn = lambda: list(ch.unary_stream("/wafer.v1.Wafer/Generate")(raw, timeout=CALL_TIMEOUT_S))  # noqa: E731
    elif method == "Session":
        open_ = pb.SessionRequest(open=pb.SessionOpen()).SerializeToString()
        fn = lambda: list(ch.stream_stream("/wafer.v1.Wafer/Session")(iter([open_, raw]), timeout=CALL_TIMEOUT_S))  # noqa: E731
    else:
        fn = lambda: raw_unary(ch, method)(raw, timeout=CALL_TIMEOUT_S)  # noqa: E731
    return code_of(fn)


MESSAGES = {"Generate": pb.GenerateRequest, "Tokenize": pb.TokenizeRequest,
            "GetModel": pb.GetModelRequest, "Session": pb.SessionRequest}


def parses(cls, raw: bytes) -> bool:
    try:
        cls.FromString(raw)
        return True
    except Exception:  # google.protobuf.message.DecodeError (or its C twin)
        return False


@st.composite
def unknown_fields(draw):
    """Fields the messages do not have (numbers 100+), of every wire type: a parser skips them."""
    out = b""
    for _ in range(draw(st.integers(1, 4))):
        n = draw(st.integers(100, 10_000))
        kind = draw(st.sampled_from(["varint", "len", "i64", "i32"]))
        if kind == "varint":
            out += varint(n << 3) + varint(draw(st.integers(0, 2**64 - 1)))
        elif kind == "len":
            out += field(n, draw(st.binary(max_size=50)))
        elif kind == "i64":
            out += varint(n << 3 | 1) + draw(st.binary(min_size=8, max_size=8))
        else:
            out += varint(n << 3 | 5) + draw(st.binary(min_size=4, max_size=4))
    return out


@pytest.mark.parametrize("method", ["Generate", "Tokenize", "GetModel"])
def test_fuzz_raw_bytes_that_parse(fault_server, stub, method):
    """Random fields serialized by hand, unknown fields among them (numbers 100+, every wire
    type), as raw bytes with an identity serializer: whatever parses gets an allowed answer."""
    _, ch = stub
    base = {"Generate": generate_requests(), "Tokenize": tokenize_requests(),
            "GetModel": st.builds(pb.GetModelRequest, name=MODEL)}[method]

    @settings(FUZZ, max_examples=30)
    @given(base, unknown_fields(), st.booleans())
    def one(msg, extra, before):
        raw = extra + msg.SerializeToString() if before else msg.SerializeToString() + extra
        assert parses(MESSAGES[method], raw)
        code, details = raw_call(ch, method, raw)
        assert code in ALLOWED, f"{code}: {details}"

    fuzz(fault_server, one)


@pytest.mark.parametrize("method", ["Generate", "Tokenize", "GetModel", "Session"])
def test_fuzz_raw_bytes_that_fail_to_parse(fault_server, stub, method):
    """Random bytes that are no valid message (truncated fields, bad wire types, invalid UTF-8):
    INVALID_ARGUMENT (in a Session: a TurnError INVALID_ARGUMENT, or that status), never UNKNOWN."""
    _, ch = stub

    @settings(FUZZ, max_examples=20)
    @given(st.binary(min_size=1, max_size=64))
    def one(raw):
        if parses(MESSAGES[method], raw):
            return
        if method == "Session":
            open_ = pb.SessionRequest(open=pb.SessionOpen()).SerializeToString()
            try:
                got = list(ch.stream_stream("/wafer.v1.Wafer/Session")(iter([open_, raw]), timeout=CALL_TIMEOUT_S))
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
                return
            errors = [pb.SessionResponse.FromString(r) for r in got]
            assert any(r.HasField("error") and r.error.code == "INVALID_ARGUMENT" for r in errors), errors
            return
        code, details = raw_call(ch, method, raw)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{code}: {details}"

    fuzz(fault_server, one)


INVALID_UTF8 = b"ok \xc3\x28 \xff"
# every string field, as (method, raw request bytes carrying INVALID_UTF8 in it)
UTF8_CASES = {
    "GenerateRequest.model": ("Generate", field(1, INVALID_UTF8) + field(3, b"hi")),
    "GenerateRequest.text": ("Generate", field(3, INVALID_UTF8)),
    "GenerateRequest.request_id": ("Generate", field(3, b"hi") + field(7, INVALID_UTF8)),
    "ChatMessage.role": ("Generate", field(2, field(1, field(1, INVALID_UTF8) + field(2, b"hi")))),
    "ChatMessage.content": ("Generate", field(2, field(1, field(1, b"user") + field(2, INVALID_UTF8)))),
    "SamplingParams.stop": ("Generate", field(3, b"hi") + field(5, field(8, INVALID_UTF8))),
    "TokenizeRequest.model": ("Tokenize", field(1, INVALID_UTF8) + field(3, b"hi")),
    "TokenizeRequest.text": ("Tokenize", field(3, INVALID_UTF8)),
    "GetModelRequest.name": ("GetModel", field(1, INVALID_UTF8)),
    "Turn.text": ("Session", field(2, field(3, INVALID_UTF8))),
    "Turn.turn_id": ("Session", field(2, field(1, INVALID_UTF8) + field(3, b"hi"))),
}


def test_invalid_utf8_in_every_string_field_is_invalid_argument(fault_server, stub):
    _, ch = stub
    b = take_baseline(fault_server)
    wrong = {}
    for name, (method, raw) in UTF8_CASES.items():
        if method == "Session":
            open_ = pb.SessionRequest(open=pb.SessionOpen()).SerializeToString()
            try:
                got = [pb.SessionResponse.FromString(r) for r in
                       ch.stream_stream("/wafer.v1.Wafer/Session")(iter([open_, raw]), timeout=CALL_TIMEOUT_S)]
                ok = any(r.HasField("error") and r.error.code == "INVALID_ARGUMENT" for r in got)
            except grpc.RpcError as e:
                ok = e.code() == grpc.StatusCode.INVALID_ARGUMENT
            if not ok:
                wrong[name] = "no INVALID_ARGUMENT"
            continue
        code, details = raw_call(ch, method, raw)
        if code != grpc.StatusCode.INVALID_ARGUMENT:
            wrong[name] = f"{code.name}: {details[:60]}"
    assert_invariants(fault_server, b)
    assert not wrong, wrong
