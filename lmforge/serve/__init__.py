"""OpenAI-compatible HTTP serving over an inference engine: ``create_app(engine, args)``.

Submodules: ``app`` (endpoints), ``schemas`` (request bodies), ``errors`` (OpenAI's error shape),
``limiter`` (bounded admission queue), ``auth`` (bearer keys), ``metrics`` (Prometheus text),
``streaming`` (server-sent events), ``server`` (uvicorn with graceful shutdown).
"""
from lmforge.serve.app import create_app

__all__ = ["create_app"]
