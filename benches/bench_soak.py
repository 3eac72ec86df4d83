"""`wafer bench soak`: a long mixed load against a server, watching it for leaks and drift.

    wafer bench soak --model smollm2-135m                      # 30 minutes, a local server
    wafer bench soak --model tiny.gguf --minutes 2 --window 10
    wafer bench soak --server 127.0.0.1:50051 --pid 1234        # a running server (its /proc)

Workers (--concurrency) loop over a mix of calls, each bounded in tokens and time: streams read
to their end, streams the client cancels, short deadlines, sessions (turns, a cancel, close),
Tokenize, and refused requests. Every window (--window seconds) samples the server process's RSS,
open fds and threads from /proc/<pid>, and the client's latency percentiles of the calls that
ended in it. Writes soak.json and soak.png (RSS, fds, threads, p99 latency over time) in
--result-dir. Reports; asserts nothing (the growth numbers are for a person or a gate to judge).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

OPS = ("generate", "generate", "generate", "cancel", "deadline", "session", "tokenize", "invalid")


def add_arguments(p) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--server", metavar="HOST:PORT", help="a running server (give --pid to sample it)")
    g.add_argument("--model", help="start a local `wafer serve --model MODEL` (name or .gguf) for the soak")
    p.add_argument("--pid", type=int, default=None, help="with --server: the server's process id, for /proc")
    p.add_argument("--serve-args", default="", metavar="'FLAGS'", help="with --model: more `wafer serve` flags")
    p.add_argument("--minutes", type=float, default=30.0, help="how long (default 30)")
    p.add_argument("--window", type=float, default=30.0, help="seconds per sample window (default 30)")
    p.add_argument("--concurrency", type=int, default=4, help="client workers (default 4)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per generation, at most (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-dir", default="bench-out/soak", help="where soak.json and soak.png go")
    p.add_argument("--json", action="store_true", help="print the result JSON")


# ------------------------------------------------------------------------- the server process


def proc_sample(pid: int | None) -> dict:
    """RSS (MB), open fds and threads of a process, from /proc; {} without a pid."""
    if pid is None:
        return {}
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss_mb"] = int(line.split()[1]) / 1024
                elif line.startswith("Threads:"):
                    out["threads"] = int(line.split()[1])
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        pass
    return out


class LocalServer:
    """`wafer serve --model MODEL` on a free loopback port (metrics off); its pid for /proc."""

    def __init__(self, model: str, extra: list[str]):
        import subprocess
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="wafer-soak-"))
        self.ready, self.log_path = tmp / "ready", tmp / "serve.log"
        cmd = [sys.executable, "-m", "engine.cli", "serve", "--model", model, "--port", "0",
               "--metrics-port", "-1", "--grace", "1", "--ready-file", str(self.ready), *extra]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        while not (self.ready.exists() and self.ready.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() - t0 > 600:
                self.stop()
                raise RuntimeError(f"`{' '.join(cmd[2:])}` did not start:\n{self.log_path.read_text()[-2000:]}")
            time.sleep(0.1)
        self.address = f"127.0.0.1:{self.ready.read_text().split()[0]}"
        self.pid = self.proc.pid

    def stop(self) -> int | None:
        self.proc.terminate()
        try:
            return self.proc.wait(60)
        except Exception:
            self.proc.kill()
            return self.proc.wait()


# ------------------------------------------------------------------------- the load


def percentile(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


class Window:
    def __init__(self):
        self.e2e_ms: list[float] = []
        self.ttft_ms: list[float] = []
        self.ops: dict[str, int] = {}
        self.codes: dict[str, int] = {}

    def add(self, op: str, code: str, e2e_ms: float | None = None, ttft_ms: float | None = None):
        self.ops[op] = self.ops.get(op, 0) + 1
        self.codes[code] = self.codes.get(code, 0) + 1
        if e2e_ms is not None:
            self.e2e_ms.append(e2e_ms)
        if ttft_ms is not None:
            self.ttft_ms.append(ttft_ms)


async def one_op(stub, pb, op: str, rng: random.Random, max_tokens: int, win_of) -> None:
    import grpc

    def sp(n):
        return pb.SamplingParams(max_tokens=n, temperature=rng.choice([0.0, 0.8]))

    prompt = pb.TokenIds(ids=[rng.randrange(1, 300) for _ in range(rng.randint(4, 200))])
    t0 = time.monotonic()
    ttft = None
    code = "OK"
    try:
        if op in ("generate", "cancel", "deadline"):
            timeout = rng.uniform(0.005, 0.5) if op == "deadline" else 60.0
            call = stub.Generate(pb.GenerateRequest(token_ids=prompt, sampling=sp(rng.randint(1, max_tokens))),
                                 timeout=timeout)
            stop_after = rng.randint(1, 4) if op == "cancel" else None
            n = 0
            async for msg in call:
                if msg.HasField("chunk"):
                    n += 1
                    if ttft is None:
                        ttft = (time.monotonic() - t0) * 1e3
                    if stop_after is not None and n >= stop_after:
                        call.cancel()
                        code = "CANCELLED(client)"
                        break
        elif op == "session":
            def reqs():
                yield pb.SessionRequest(open=pb.SessionOpen())
                for t in range(rng.randint(1, 3)):
                    yield pb.SessionRequest(turn=pb.Turn(turn_id=str(t), text="tell me more", sampling=sp(
                        rng.randint(1, max_tokens))))
                if rng.random() < 0.3:
                    yield pb.SessionRequest(cancel=pb.CancelTurn())
            async for _ in stub.Session(reqs(), timeout=120):
                pass
        elif op == "tokenize":
            await stub.Tokenize(pb.TokenizeRequest(text="hello soak " * rng.randint(1, 50)), timeout=30)
        else:  # refused
            await stub.Tokenize(pb.TokenizeRequest(model="no-such-model", text="x"), timeout=30)
    except grpc.aio.AioRpcError as e:
        code = e.code().name
    e2e = (time.monotonic() - t0) * 1e3
    win_of().add(op, code, e2e if op == "generate" and code == "OK" else None, ttft)


async def soak(address: str, pid: int | None, args) -> dict:
    import grpc

    from protos import wafer_pb2 as pb
    from protos import wafer_pb2_grpc as pb_grpc

    windows: list[dict] = []
    current = Window()
    t_start = time.monotonic()
    end = t_start + args.minutes * 60
    stop = asyncio.Event()

    def win_of():
        return current

    async def worker(k: int):
        rng = random.Random(args.seed * 1000 + k)
        async with grpc.aio.insecure_channel(address) as ch:
            stub = pb_grpc.WaferStub(ch)
            while not stop.is_set():
                try:
                    await asyncio.wait_for(one_op(stub, pb, rng.choice(OPS), rng, args.max_tokens, win_of), 180)
                except asyncio.TimeoutError:
                    current.add("timeout", "CLIENT_TIMEOUT")

    def close_window(w: Window, t: float) -> dict:
        d = {"t_s": round(t - t_start, 1), **proc_sample(pid), "ops": sum(w.ops.values()),
             "by_op": w.ops, "codes": w.codes, "p50_e2e_ms": percentile(w.e2e_ms, 50),
             "p99_e2e_ms": percentile(w.e2e_ms, 99), "p50_ttft_ms": percentile(w.ttft_ms, 50),
             "p99_ttft_ms": percentile(w.ttft_ms, 99)}
        windows.append(d)
        print(f"[{d['t_s']:7.1f} s] ops {d['ops']:5d}  rss {d.get('rss_mb', 0):7.1f} MB  fds "
              f"{d.get('fds', '-')}  threads {d.get('threads', '-')}  p99 e2e "
              f"{d['p99_e2e_ms'] or 0:7.1f} ms  p99 ttft {d['p99_ttft_ms'] or 0:7.1f} ms", file=sys.stderr)
        return d

    windows.append({"t_s": 0.0, **proc_sample(pid), "ops": 0})
    tasks = [asyncio.ensure_future(worker(k)) for k in range(args.concurrency)]
    while (now := time.monotonic()) < end:
        await asyncio.sleep(min(args.window, end - now))
        w, current = current, Window()
        close_window(w, time.monotonic())
    stop.set()
    await asyncio.wait(tasks, timeout=200)
    for t in tasks:
        t.cancel()
    await asyncio.sleep(2.0)  # the server settles after the last calls
    idle = {"t_s": round(time.monotonic() - t_start, 1), **proc_sample(pid), "ops": 0, "idle": True}
    windows.append(idle)
    return {"windows": windows}


def summarize(result: dict) -> dict:
    ws = [w for w in result["windows"] if w.get("ops")]
    first, last = (ws[0], ws[-1]) if ws else ({}, {})
    idle = result["windows"][-1]
    start = result["windows"][0]
    s = {"ops": sum(w.get("ops", 0) for w in ws), "windows": len(ws)}
    for key in ("rss_mb", "fds", "threads"):
        if key in start:
            s[f"{key}_start"] = start[key]
            s[f"{key}_first_window"] = first.get(key)
            s[f"{key}_last_window"] = last.get(key)
            s[f"{key}_max"] = max(w.get(key, 0) for w in result["windows"])
            s[f"{key}_idle_end"] = idle.get(key)
    if "rss_mb" in first and "rss_mb" in last and len(ws) > 1:
        hours = (last["t_s"] - first["t_s"]) / 3600
        s["rss_growth_mb_per_hour"] = round((last["rss_mb"] - first["rss_mb"]) / hours, 1) if hours else None
    p99 = [w["p99_e2e_ms"] for w in ws if w.get("p99_e2e_ms") is not None]
    if p99:
        s["p99_e2e_ms_first"], s["p99_e2e_ms_last"], s["p99_e2e_ms_max"] = p99[0], p99[-1], max(p99)
    codes: dict[str, int] = {}
    for w in ws:
        for c, n in w.get("codes", {}).items():
            codes[c] = codes.get(c, 0) + n
    s["codes"] = codes
    return s


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ws = result["windows"]
    t = [w["t_s"] / 60 for w in ws]
    fig, axes = plt.subplots(4, 1, figsize=(8, 10), sharex=True)
    for ax, key, label in zip(axes[:3], ("rss_mb", "fds", "threads"), ("RSS (MB)", "open fds", "threads")):
        ax.plot([x for x, w in zip(t, ws) if key in w], [w[key] for w in ws if key in w], marker=".")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for key, label in (("p99_e2e_ms", "p99 e2e"), ("p99_ttft_ms", "p99 TTFT"), ("p50_e2e_ms", "p50 e2e")):
        pts = [(x, w[key]) for x, w in zip(t, ws) if w.get(key) is not None]
        if pts:
            axes[3].plot(*zip(*pts), marker=".", label=label)
    axes[3].set_ylabel("client latency (ms)")
    axes[3].set_xlabel("minutes")
    axes[3].legend()
    axes[3].grid(alpha=0.3)
    fig.suptitle(f"wafer soak: {result['config'].get('target', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args) -> int:
    import shlex

    if args.minutes <= 0 or args.window <= 0 or args.concurrency < 1:
        print("wafer bench soak: error: --minutes and --window must be > 0, --concurrency >= 1", file=sys.stderr)
        return 2
    if args.server and args.serve_args:
        print("wafer bench soak: error: --serve-args starts a local server: use it with --model", file=sys.stderr)
        return 2
    server = None
    try:
        if args.model:
            print(f"starting `wafer serve --model {args.model} {args.serve_args}` ...", file=sys.stderr)
            server = LocalServer(args.model, shlex.split(args.serve_args))
            address, pid = server.address, server.pid
        else:
            address, pid = args.server, args.pid
        result = asyncio.run(soak(address, pid, args))
    except (RuntimeError, OSError) as e:
        print(f"wafer bench soak: error: {e}", file=sys.stderr)
        return 2
    finally:
        exit_code = server.stop() if server is not None else None
    result["config"] = {"target": args.model or args.server, "minutes": args.minutes, "window_s": args.window,
                        "concurrency": args.concurrency, "max_tokens": args.max_tokens, "seed": args.seed,
                        "serve_args": args.serve_args}
    result["summary"] = summarize(result)
    result["summary"]["server_exit_code"] = exit_code
    out = Path(args.result_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "soak.png")
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result["summary"], indent=1))
        print(f"wrote {out / 'soak.json'} and {out / 'soak.png'}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m benches.bench_soak", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
