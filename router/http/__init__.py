"""The router's OpenAI-compatible HTTP API (`HttpServer`): chat and completions, streaming or
not, over the same front door as gRPC `Generate`."""

from router.http.server import HttpServer

__all__ = ["HttpServer"]
