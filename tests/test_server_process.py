"""`wafer serve` as a real process: readiness, `wafer generate --server`, `wafer chat --server`,
and SIGTERM drain (every stream gets a final message, the process exits cleanly)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine.client import Completion, Token, WaferClient

ROOT = Path(__file__).resolve().parents[1]


def wafer(*args, **kw):
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, **kw)


def start_server(path, tmp, *flags):
    """`wafer serve` on a free loopback port: (process, address, log path) once it is ready."""
    ready, log = tmp / "ready", tmp / "serve.log"
    with open(log, "w") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "serve", "--model", str(path), "--port", "0",
             "--metrics-port", "0", *flags, "--ready-file", str(ready)],
            cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while not ready.exists() or not ready.read_text().strip():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "server not ready in 180 s"
        time.sleep(0.1)
    return proc, f"127.0.0.1:{int(ready.read_text().split()[0])}", log


@pytest.fixture(scope="module")
def served(tiny_gguf, tmp_path_factory):
    proc, address, log = start_server(tiny_gguf("Q4_1", context_length=2048), tmp_path_factory.mktemp("serve"),
                                      "--grace", "0.3", "--realtime-streaming")
    yield proc, address, log
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def test_logs_readiness(served):
    _, address, log = served
    text = log.read_text()
    assert "ready: serving" in text and address in text
    # --realtime-streaming: either applied or refused with the reason
    assert "run under SCHED_RR" in text or "cannot run the streaming threads under SCHED_RR" in text


def test_generate_cli_remote_json(served):
    _, address, _ = served
    r = wafer("generate", "--server", address, "--prompt", "hello", "--max-tokens", "6", "--json")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    tokens, summary = lines[:-1], lines[-1]
    assert tokens and all(set(t) == {"id", "text"} for t in tokens)
    assert set(summary) == {"prompt_tokens", "completion_tokens", "ttft_ms", "decode_tok_s", "finish_reason"}
    assert summary["completion_tokens"] == len(tokens)


def test_generate_cli_remote_text_and_errors(served):
    _, address, _ = served
    r = wafer("generate", "--server", address, "--prompt", "hello", "--max-tokens", "4", "--raw")
    assert r.returncode == 0 and "tokens" in r.stderr
    r = wafer("generate", "--server", address, "--prompt", "hello", "--top-p", "3")
    assert r.returncode == 2
    assert "INVALID_ARGUMENT" in r.stderr and "top_p" in r.stderr
    # a value the request cannot even hold: the same message as the local mode, no traceback
    r = wafer("generate", "--server", address, "--prompt", "hello", "--seed", "-1")
    assert r.returncode == 2 and "seed=-1 must be in [0, 2^64)" in r.stderr and "Traceback" not in r.stderr
    # a model named explicitly is asked for, even when it is the local default's name
    r = wafer("generate", "--server", address, "--prompt", "hello", "--model", "smollm2-135m")
    assert r.returncode == 2 and "NOT_FOUND" in r.stderr and "smollm2-135m" in r.stderr


def test_chat_cli_with_piped_stdin(served):
    _, address, _ = served
    r = wafer("chat", "--server", address, "--max-tokens", "5", input="hello there\nand again\n")
    assert r.returncode == 0, r.stderr
    summaries = [x for x in r.stderr.splitlines() if x.startswith("[")]
    assert len(summaries) == 2
    assert "(0 reused)" in summaries[0] and "(0 reused)" not in summaries[1]


def test_chat_cli_goes_on_after_a_rejected_turn(served):
    """A turn the server rejects (here: longer than the context) is reported; the session and
    the next turn go on."""
    _, address, _ = served
    r = wafer("chat", "--server", address, "--max-tokens", "3", input="word " * 3000 + "\nhello\n")
    assert r.returncode == 0, r.stderr
    assert "turn rejected: INVALID_ARGUMENT" in r.stderr
    assert len([x for x in r.stderr.splitlines() if x.startswith("[")]) == 1


def test_chat_cli_ctrl_c_cancels_the_turn_and_goes_on(served):
    """Ctrl-C while an answer streams cancels that turn on the server; the prompt comes back and
    the session goes on (a KeyboardInterrupt inside gRPC's read used to end the chat with a
    traceback)."""
    _, address, _ = served
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "chat", "--server", address,
                             "--max-tokens", "1900", "--json"], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        proc.stdin.write("tell me everything\n")
        proc.stdin.flush()
        first = proc.stdout.readline()  # the first token of the long answer
        assert '"id"' in first
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate("hello\n", timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    summaries = [json.loads(x) for x in out.splitlines() if "finish_reason" in x]
    assert [s["finish_reason"] for s in summaries][0] == "cancelled"
    assert len(summaries) == 2 and summaries[0]["completion_tokens"] < 1900
    assert summaries[1]["cached_tokens"] > 0  # the same session, its cache kept


def test_sigterm_drains_streams_then_exits(served):
    proc, address, log = served
    results = []
    first = threading.Event()

    def stream():
        items = []
        with WaferClient(address, timeout=60) as c:
            try:
                for item in c.generate("long", max_tokens=2000, temperature=0):
                    items.append(item)
                    first.set()
                results.append(items)
            except Exception as e:  # a status is acceptable too, a hang is not
                results.append(e)
            first.set()

    t = threading.Thread(target=stream)
    t.start()
    assert first.wait(30)
    idle = WaferClient(address, timeout=60)
    session = idle.session()
    session.say("hello", max_tokens=2)  # an open session, idle between turns
    os.kill(proc.pid, signal.SIGTERM)
    t.join(30)
    assert not t.is_alive(), "stream hung after SIGTERM"
    assert proc.wait(30) == 0
    (items,) = results
    assert not isinstance(items, Exception), items
    assert isinstance(items[-1], Completion)
    assert items[-1].finish_reason in ("shutdown", "length", "stop")
    assert all(isinstance(i, Token) for i in items[:-1])
    text = log.read_text()
    assert "draining" in text and "stopped" in text
    session.close()  # the server already closed it for the shutdown
    assert session.closed_reason == "shutdown"
    idle.close()


def test_a_second_signal_ends_the_grace_period(tiny_gguf, tmp_path):
    """SIGTERM with a long grace lets a stream go on; a second SIGTERM (or Ctrl-C) ends it now,
    with its final message, and the server exits."""
    proc, address, log = start_server(tiny_gguf("Q4_1", context_length=8192), tmp_path, "--grace", "60")
    try:
        with WaferClient(address, timeout=60) as c:
            stream = c.generate("long", max_tokens=8000, temperature=0)  # a few seconds here
            next(stream)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            done = [i for i in stream if isinstance(i, Completion)]
        assert done and done[0].finish_reason == "shutdown"
        assert proc.wait(30) == 0 and time.monotonic() - t0 < 30  # not the 60 s grace
        assert "second signal" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
