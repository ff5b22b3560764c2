"""HTTP endpoints over agents (``lmforge agent``; the web page calls the same routes or the Python API):

    GET  /health
    GET  /v1/agents                       each agent's name, description and settings
    POST /v1/agents/{name}/chat           {"messages": [...]} -> {"content", "sources", "refused", "meta"}
    POST /v1/agents/{name}/compare        {"messages": [...], "seed"?} -> {"answers": [a, b], ...}  (preference)
    POST /v1/agents/{name}/feedback       {"messages", "answers", "choice"} or {"messages", "response", "rating"}
    GET  /v1/agents/{name}/feedback       counts of the feedback recorded so far                  (preference)

Bodies are JSON of at most ``MAX_BODY`` bytes (413 beyond, refused unread when declared); a bad one is a 400
naming the field, an unknown agent a 404,
a route the agent lacks a 405. With ``api_key`` every route but /health needs ``Authorization: Bearer KEY``.
Generation runs in a worker thread, one request at a time per agent (engines are not re-entrant).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import threading
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from lmforge.agents.base import Agent, AgentError

MAX_BODY = 1 << 20


def create_agent_app(agents: dict[str, Agent], *, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="lmforge agents")
    locks = {name: threading.Lock() for name in agents}

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message}}, status_code=status)

    def authorised(request: Request) -> bool:
        if not api_key:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())

    class TooLarge(AgentError):
        pass

    async def body(request: Request) -> dict[str, Any]:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY:  # refused before reading it
            raise TooLarge(f"request body of {declared} bytes; at most {MAX_BODY}")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY:
                raise TooLarge(f"request body over {MAX_BODY} bytes")
        try:
            data = json.loads(raw or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AgentError(f"request body is not JSON ({e})") from None
        if not isinstance(data, dict):
            raise AgentError("request body: expected a JSON object")
        return data

    async def call(name: str, request: Request, method: str, *fields: str) -> Any:
        if not authorised(request):
            return error(401, "missing or wrong API key (Authorization: Bearer KEY)")
        agent = agents.get(name)
        if agent is None:
            return error(404, f"no agent {name!r}; agents here: {', '.join(agents)}")
        fn = getattr(agent, method, None)
        if fn is None:
            return error(405, f"agent {name!r} ({type(agent).__name__}) has no {method}")
        try:
            data = await body(request)
            args = [data] if not fields else [data.get(f) for f in fields]

            def run() -> Any:
                with locks[name]:
                    return fn(*args)

            out = await asyncio.to_thread(run)
        except TooLarge as e:
            return error(413, str(e))
        except AgentError as e:
            return error(400, str(e))
        except ConnectionError as e:  # the agent's model server
            return error(502, str(e))
        return out.to_dict() if hasattr(out, "to_dict") else out

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/agents")
    async def list_agents(request: Request) -> Any:
        if not authorised(request):
            return error(401, "missing or wrong API key (Authorization: Bearer KEY)")
        return {"agents": [{**a.info(), "name": name} for name, a in agents.items()]}

    @app.post("/v1/agents/{name}/chat")
    async def chat(name: str, request: Request) -> Any:
        return await call(name, request, "chat", "messages")

    @app.post("/v1/agents/{name}/compare")
    async def compare(name: str, request: Request) -> Any:
        return await call(name, request, "compare", "messages", "seed")

    @app.post("/v1/agents/{name}/feedback")
    async def feedback(name: str, request: Request) -> Any:
        out = await call(name, request, "record")
        if isinstance(out, dict):
            out = {"recorded": out["id"], "stats": agents[name].store.stats()}
        return out

    @app.get("/v1/agents/{name}/feedback")
    async def feedback_stats(name: str, request: Request) -> Any:
        if not authorised(request):
            return error(401, "missing or wrong API key (Authorization: Bearer KEY)")
        agent = agents.get(name)
        if agent is None or not hasattr(agent, "store"):
            return error(404, f"no preference agent {name!r}")
        return agent.store.stats()

    return app
