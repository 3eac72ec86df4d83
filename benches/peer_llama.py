"""The llama.cpp peer, run as a subprocess by benches/bench_engine.py so that it can live in
its own virtual environment (built for AVX-512) while wafer runs in ours.

Build the peer (once; ~15 min on 2 cores) into a separate venv, for the CPU class the numbers
are about (AVX-512 with VNNI/VBMI/BF16; GGML_NATIVE=OFF so the flags are explicit):

    python3.11 -m venv ~/llama-peer
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
      -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_BF16=ON" \
      ~/llama-peer/bin/pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36

then point the bench at it: WAFER_PEER_PYTHON=~/llama-peer/bin/python (default: the
bench's own python when it can import llama_cpp).

Protocol: one JSON request per stdin line, one JSON answer per stdout line:
  {"op": "decode", "prompt": [...], "n": 64}       -> {"tok_s": ...} (n single-token evals
                                                      after the prompt)
  {"op": "prefill", "prompt": [...]}               -> {"tok_s": ...} (one eval, from empty)
  {"op": "logits", "tokens": [...], "out": path}   -> {} (teacher-forced logits saved as .npy)
  {"op": "info"}                                   -> {"version": ..., "system_info": ...}
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def main(model_path: str, threads: int, n_ctx: int) -> None:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=model_path, n_threads=threads, n_threads_batch=threads,
                          n_ctx=n_ctx, n_batch=512, logits_all=True, verbose=False)
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        if op == "decode":
            llm.reset()
            llm.eval(req["prompt"])
            t = time.perf_counter()
            for i in range(req["n"]):
                llm.eval([req["prompt"][i % len(req["prompt"])]])
            ans = {"tok_s": req["n"] / (time.perf_counter() - t)}
        elif op == "prefill":
            llm.reset()
            t = time.perf_counter()
            llm.eval(req["prompt"])
            ans = {"tok_s": len(req["prompt"]) / (time.perf_counter() - t)}
        elif op == "logits":
            llm.reset()
            llm.eval(req["tokens"])
            np.save(req["out"], np.array(llm.scores[: len(req["tokens"])], np.float32))
            ans = {}
        elif op == "info":
            ans = {"version": llama_cpp.__version__,
                   "system_info": llama_cpp.llama_print_system_info().decode()}
        else:
            ans = {"error": f"unknown op {op!r}"}
        print(json.dumps(ans), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
