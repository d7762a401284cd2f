"""The gateway: SGLang-compatible HTTP API in front of the bus."""
