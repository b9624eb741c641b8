"""The OpenAI-compatible HTTP gateway: a stateless ASGI process in front of the gRPC front (docs/gateway.md)."""
