"""The gRPC serving layer. Imports point down this list:

app (bind, health, reflection, drain) -> runtime (load, warm, the engine thread via the
scheduler) -> publisher, threads (priorities); app -> servicer (thin RPCs) -> session_call (the
Session RPC) -> stream (engine events -> messages + metrics), validate (request -> SamplingParams);
registry (models and lifecycle), metrics (Prometheus), emulation (wafer timing), options.
testing runs a server on a thread. Clients are in engine.client, the CLI in engine.cli."""
