"""The public gRPC API (package ``wafer.v1``): wafer.proto and its committed generated stubs."""
