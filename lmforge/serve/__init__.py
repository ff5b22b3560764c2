"""OpenAI-compatible HTTP serving over an inference engine: ``create_app(engine, args)``.

Submodules: ``app`` (endpoints), ``schemas`` (request bodies), ``body`` (reading them: size, time,
UTF-8, JSON), ``budget`` (what a request may cost before admission; memory given back), ``errors``
(OpenAI's error shape), ``limiter`` (bounded admission queue), ``auth`` (bearer keys), ``metrics``
(Prometheus text), ``streaming`` (server-sent events), ``server`` (uvicorn with graceful shutdown,
a connection cap and a header deadline).
"""
from lmforge.serve.app import create_app

__all__ = ["create_app"]
