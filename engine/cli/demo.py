"""`make demo`: start `wafer serve` on a free loopback port, stream one chat completion through
the gRPC client, print a usage line, stop the server with SIGTERM.

    python -m engine.cli.demo --model smollm2-135m [--prompt "..."] [--max-tokens N]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence, then add a fun fact."


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--emulate", default=None, help="e.g. wse3:llama-3.1-8b (needs sim/)")
    args = p.parse_args(argv)

    from engine.fetch import ModelNotFound, resolve_model

    try:
        resolve_model(args.model)
    except ModelNotFound as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="wafer-demo-"))
    ready, log = tmp / "ready", tmp / "serve.log"
    cmd = [sys.executable, "-m", "engine.cli", "serve", "--model", args.model, "--port", "0",
           "--metrics-port", "0", "--ready-file", str(ready), "--grace", "2"]
    if args.emulate:
        cmd += ["--emulate", args.emulate, "--pace", "realtime"]
    print(f"[demo] starting: wafer serve --model {args.model} --port 0 (log: {log})", file=sys.stderr)
    t0 = time.monotonic()
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
    try:
        while not (ready.exists() and ready.read_text().strip()):
            if proc.poll() is not None:
                print(f"[demo] server exited with {proc.returncode}:\n{log.read_text()}", file=sys.stderr)
                return 1
            if time.monotonic() - t0 > 600:
                print("[demo] server not ready after 600 s", file=sys.stderr)
                return 1
            time.sleep(0.1)
        port, metrics_port = ready.read_text().split()
        address = f"127.0.0.1:{port}"
        print(f"[demo] server SERVING on {address} after {time.monotonic() - t0:.1f} s "
              f"(metrics http://127.0.0.1:{metrics_port}/metrics)", file=sys.stderr)

        from engine.client import Token, WaferClient

        with WaferClient(address, timeout=300) as client:
            client.wait_ready(60)
            print(f"\n> {args.prompt}\n", flush=True)
            done = None
            for item in client.generate(messages=[{"role": "user", "content": args.prompt}],
                                        max_tokens=args.max_tokens, temperature=0):
                if isinstance(item, Token):
                    sys.stdout.write(item.text)
                    sys.stdout.flush()
                else:
                    done = item
            u = done.usage
            n = u["completion_tokens"]
            tok_s = 1e3 / u["mean_itl_ms"] if u["mean_itl_ms"] > 0 else 0.0
            print(f"\n\n[{n} tokens, {done.finish_reason}; prompt {u['prompt_tokens']} tokens; "
                  f"TTFT {u['ttft_ms']:.1f} ms; {tok_s:.1f} tok/s over gRPC]", flush=True)
            if done.emulation:
                e = done.emulation
                print(f"[emulated {e['target']}: simulated TTFT {e['sim_ttft_ms']:.2f} ms, "
                      f"last token at {e['sim_e2e_ms']:.1f} ms, max lateness {e['max_late_ms']:.1f} ms]")
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        print(f"[demo] server stopped (exit {proc.returncode})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
