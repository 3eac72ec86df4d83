"""`wafer bench serve`: a load generator for any wafer.v1 server, with `vllm bench serve`'s metrics
and JSON keys.

    arrivals.py  when requests are sent (Poisson / gamma burstiness)
    dataset.py   what is sent (random token ids of exact lengths, or a JSONL of messages)
    runner.py    sending it: open loop, closed loop, GuideLLM's sweep; one RequestRecord a request
    metrics.py   TTFT / ITL / TPOT / E2EL / goodput / simulated times: pure functions of records
    report.py    the result dict (vLLM's keys), the printed table, the JSON file
    plot.py      latency-vs-throughput and CDF PNGs
    server.py    a local `wafer serve` when the bench is given --model
The CLI is engine/cli/bench.py; benches/sessions.py is `wafer bench sessions`.
"""
