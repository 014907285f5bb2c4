"""streamsvc: streaming chat gateway and sandboxed connector runner."""

__version__ = "0.1.0"
