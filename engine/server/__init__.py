"""The gRPC serving layer: servicer (validation, streaming), app (server, health, reflection,
drain), registry (models and lifecycle), metrics (Prometheus), client (sync/asyncio), cli."""
