"""The gRPC serving layer. Imports point down this list:

app (bind, health, reflection, drain) -> runtime (load, warm, the engine thread via the
scheduler) -> publisher, threads (priorities); app -> servicer (thin RPCs) -> session_call (the
Session RPC) -> stream (engine events -> messages + metrics), validate (request -> SamplingParams);
parse (request bytes -> messages; one that fails to parse is refused by the handler, not by gRPC),
reflection (grpc.reflection v1 and v1alpha), security (TLS, bearer tokens);
registry (models and lifecycle), metrics (Prometheus), emulation (wafer timing), options.
testing runs a server on a thread. Clients are in engine.client, the CLI in engine.cli."""
