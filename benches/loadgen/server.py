"""Start a local `wafer serve` for a bench (``--model``): a subprocess on 127.0.0.1, any free port,
no metrics endpoint; stopped (SIGTERM, then SIGKILL) when the bench ends."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def local_server(model: str, serve_args: list[str] = (), timeout_s: float = 600.0) -> Iterator[str]:
    """Yield the address of a `wafer serve --model MODEL` started for the bench."""
    tmp = Path(tempfile.mkdtemp(prefix="wafer-bench-serve-"))
    ready, log_path = tmp / "ready", tmp / "serve.log"
    cmd = [sys.executable, "-m", "engine.cli", "serve", "--model", model, "--port", "0",
           "--metrics-port", "-1", "--grace", "1", "--ready-file", str(ready), *serve_args]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        t0 = time.monotonic()
        while not (ready.exists() and ready.read_text().strip()):
            if proc.poll() is not None or time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"`{' '.join(cmd[2:])}` did not start; its log ({log_path}) ends:\n"
                                   + log_path.read_text()[-2000:])
            time.sleep(0.1)
        yield f"127.0.0.1:{ready.read_text().split()[0]}"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def add_target_arguments(p) -> None:
    """--server ADDR or --model NAME (start one), shared by the bench subcommands."""
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--server", metavar="HOST:PORT", help="a running wafer.v1 server to load")
    g.add_argument("--model", help="start a local `wafer serve --model MODEL` for the bench (name or .gguf)")
    p.add_argument("--emulate", metavar="HW:MODEL",
                   help="with --model: the local server emulates this wafer target (e.g. wse3:llama-3.1-8b)")
    p.add_argument("--serve-args", default="", metavar="'FLAGS'",
                   help="with --model: more `wafer serve` flags, one quoted string (e.g. '--pace none')")
    from engine.cli.remote import add_connection_arguments

    add_connection_arguments(p)  # --tls-ca, --token-file ... for a secured --server


@contextlib.contextmanager
def target_address(args) -> Iterator[str]:
    """The address to load: --server's, or a local server's started for the bench."""
    import shlex

    if args.server:
        if args.emulate or args.serve_args:
            raise ValueError("--emulate and --serve-args start a local server: use them with --model, "
                             "not --server")
        yield args.server
        return
    extra = (["--emulate", args.emulate] if args.emulate else []) + shlex.split(args.serve_args)
    print(f"starting `wafer serve --model {args.model} {' '.join(extra)}` ...", file=sys.stderr)
    with local_server(args.model, extra) as address:
        print(f"local server ready on {address}", file=sys.stderr)
        yield address
