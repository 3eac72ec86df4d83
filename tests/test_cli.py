"""The `wafer` command as a user runs it: model fetch/resolve, local generate, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engine import fetch


def wafer(*args, env=None):
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True,
                          text=True, timeout=300, env=env)


def test_resolve_accepts_a_path_and_names_what_is_missing(tmp_path, tiny_gguf):
    path = tiny_gguf("Q8_0")
    assert fetch.resolve_model(str(path)) == path
    with pytest.raises(fetch.ModelNotFound, match="neither a known model"):
        fetch.resolve_model(str(tmp_path / "nope.gguf"))


def test_known_model_not_pulled_says_how_to_pull(tmp_path, monkeypatch):
    monkeypatch.setenv("WAFER_HOME", str(tmp_path))
    with pytest.raises(fetch.ModelNotFound, match="wafer models pull smollm2-135m"):
        fetch.resolve_model("smollm2-135m")


def test_pull_is_a_noop_when_present(real_model_path, capsys):
    assert fetch.pull("smollm2-135m") == real_model_path
    assert "already present" in capsys.readouterr().err


def test_generate_json_streams_tokens_then_a_summary(tiny_gguf):
    out = wafer("generate", "--model", str(tiny_gguf("Q4_1")), "--prompt", "hello there",
                "--raw", "--max-tokens", "5", "--temperature", "0.8", "--seed", "3", "--json")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    *tokens, summary = lines
    assert all(set(t) == {"id", "text"} for t in tokens)
    assert summary["completion_tokens"] == len(tokens) <= 5
    assert summary["finish_reason"] in ("stop", "length")
    assert {"prompt_tokens", "ttft_ms", "decode_tok_s"} <= set(summary)
    again = wafer("generate", "--model", str(tiny_gguf("Q4_1")), "--prompt", "hello there",
                  "--raw", "--max-tokens", "5", "--temperature", "0.8", "--seed", "3", "--json")
    assert [json.loads(x)["id"] for x in again.stdout.splitlines()[:-1]] == [t["id"] for t in tokens]


def test_generate_streams_the_real_answer(real_model_path):
    out = wafer("generate", "--model", "smollm2-135m", "--prompt", "What is the capital of France?")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "The capital of France is Paris."


@pytest.mark.parametrize("args,needle", [
    (["--model", "no-such-model"], "neither a known model"),
    (["--top-p", "0"], "top_p=0 must be in (0, 1]"),
    (["--max-tokens", "100000"], "exceeds the model's context of 256"),
])
def test_errors_are_one_line_and_nonzero(tiny_gguf, args, needle):
    base = ["generate", "--model", str(tiny_gguf("Q4_1")), "--prompt", "hi"]
    out = wafer(*base, *args)
    assert out.returncode == 2
    assert needle in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
