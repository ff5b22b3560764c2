"""Agents over engines and servers: ``rag`` (answers from documents, cited), ``preference`` (feedback into
preference data), domain assistants from YAML (``assistant``); see ``base.py`` for the interface and
``http.py`` for the endpoints. Registered in ``lmforge.registry.AGENTS``."""
from lmforge.agents.base import (Agent, AgentError, AgentReply, EngineGenerator, Generator, ServerGenerator,
                                 build_agent)

__all__ = ["Agent", "AgentError", "AgentReply", "EngineGenerator", "Generator", "ServerGenerator", "build_agent"]
