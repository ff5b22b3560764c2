"""The agent commands: ``lmforge rag index|query``, ``lmforge agent`` (HTTP), ``lmforge preference train``.

    lmforge rag index --docs handbook/ --index handbook.idx            # minilm embeddings; incremental
    lmforge rag query --index handbook.idx --query "Who approves leave?" --model Qwen/Qwen2.5-1.5B-Instruct
    lmforge agent --agent rag preference medical-qa --index handbook.idx --feedback_file fb.jsonl --model M
    lmforge preference train --feedback_file fb.jsonl --model M --rlhf_type dpo --rounds_dir output/pref
"""
from __future__ import annotations

import json
import logging
from typing import Any

logger = logging.getLogger("lmforge")


def build_generator(args: Any) -> Any:
    """A server (``--url``) or a local engine (``--model``/``--ckpt_dir``); None when neither is given."""
    from lmforge.agents.base import EngineGenerator, ServerGenerator

    if args.url:
        return ServerGenerator(args.url, api_key=args.url_api_key, model=args.served_model)
    if args.model or args.ckpt_dir:
        from lmforge.pipelines.infer import build_engine

        return EngineGenerator(build_engine(args))
    return None


def rag_index_main(args: Any) -> dict[str, Any]:
    from lmforge.agents.embedders import load_embedder
    from lmforge.agents.index import build_index
    from lmforge.registry import load_plugins
    from lmforge.utils.command import print_output
    from lmforge.utils.log import setup_logging

    setup_logging()
    load_plugins(args.external_plugins)
    if not args.docs or not args.index:
        raise ValueError("lmforge rag index needs --docs (a folder of documents) and --index (the index folder)")
    from pathlib import Path

    if not Path(args.docs).is_dir():
        raise FileNotFoundError(f"--docs {args.docs}: no such folder")
    stats = build_index(args.docs, args.index, load_embedder(args.embedding_model, args.embedder),
                        chunk_size=args.chunk_size, chunk_overlap=args.chunk_overlap, rebuild=args.rebuild)
    for reason in stats["skipped"]:
        logger.warning("skipped %s", reason)
    print_output("rag index", f"{stats['documents']} documents, {stats['chunks']} chunks ({stats['added']} added, "
                              f"{stats['updated']} updated, {stats['unchanged']} unchanged, {stats['removed']} "
                              f"removed, {len(stats['skipped'])} skipped)", args.index)
    return stats


def rag_agent(args: Any, generator: Any) -> Any:
    from lmforge.agents.rag import RagAgent, open_index

    if not args.index:
        raise ValueError("--index is required (a folder made by lmforge rag index)")
    return RagAgent(generator, index=open_index(args.index, args.embedding_model), top_k=args.retrieve_k,
                    min_score=args.min_score, system=args.system, max_tokens=args.max_new_tokens,
                    temperature=args.temperature, extractive=args.extractive)


def rag_query_main(args: Any) -> dict[str, Any]:
    from lmforge.registry import load_plugins
    from lmforge.utils.log import setup_logging

    setup_logging()
    load_plugins(args.external_plugins)
    if not args.query:
        raise ValueError('--query is required: one or more questions ("..." "...")')
    generator = None if args.retrieve_only else build_generator(args)
    if generator is None and not args.retrieve_only:
        raise ValueError("lmforge rag query needs --model, --ckpt_dir or --url to answer (or --retrieve_only)")
    agent = rag_agent(args, generator)
    answers = []
    for q in args.query:
        if args.retrieve_only:
            hits = agent.retrieve(q)
            out = {"query": q, "sources": hits}
            text = "\n".join(f"[{i}] {h['score']:.3f} {h['source']}: {h['text'][:200]!r}" for i, h in enumerate(hits, 1))
        else:
            reply = agent.chat([{"role": "user", "content": q}])
            out = {"query": q, **reply.to_dict()}
            text = reply.content
        answers.append(out)
        print(json.dumps(out, ensure_ascii=False) if args.json else f"Q: {q}\n{text}\n", flush=True)
    return {"answers": answers}


def agent_main(args: Any) -> dict[str, Any]:
    """Serve the named agents over HTTP until stopped (see ``lmforge.agents.http``)."""
    import uvicorn

    from lmforge.agents.http import create_agent_app
    from lmforge.utils.log import mask_secret, setup_logging

    setup_logging()
    mask_secret(args.api_key)
    agents = build_agents(args)
    app = create_agent_app(agents, api_key=args.api_key)
    logger.info("agents %s on http://%s:%d (POST /v1/agents/NAME/chat)", ", ".join(agents), args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return {"agents": list(agents)}


def build_agents(args: Any) -> dict[str, Any]:
    """The agents ``--agent`` names, answering with the model or server the flags give."""
    from lmforge.agents.base import build_agent
    from lmforge.registry import load_plugins

    load_plugins(args.external_plugins)
    if not args.agent:
        raise ValueError("--agent is required: rag, preference, assistant configs (.yaml or a shipped name)")
    generator = build_generator(args)
    agents = {}
    for name in args.agent:
        if name == "rag":
            agent = rag_agent(args, generator)
        elif name == "preference":
            agent = build_agent(name, generator, feedback_file=args.feedback_file, max_tokens=args.max_new_tokens,
                                temperature=args.temperature)
        else:
            agent = build_agent(name, generator, max_tokens=args.max_new_tokens, temperature=args.temperature)
        agents[agent.name] = agent
    return agents


def preference_train_main(args: Any) -> dict[str, Any]:
    from lmforge.toolkit.preference_rounds import run_round
    from lmforge.utils.log import setup_logging

    setup_logging()
    return run_round(args)
