"""``lmforge rollout``: serve a model for RL rollouts (see :mod:`lmforge.serve.rollout`).

    lmforge rollout --model Qwen/Qwen2.5-0.5B-Instruct --infer_backend native --port 8001
    lmforge rlhf --rlhf_type grpo --model Qwen/Qwen2.5-0.5B-Instruct --rollout_url http://127.0.0.1:8001 ...

Start it with the model (and ``--template``/``--system``) the trainer starts from: the trainer
sends its first turns as token ids, but later turns of multi-turn rollouts as messages, which the
server encodes with its own template. The trainer pushes its weights before its first rollout and
after every optimizer step.
"""
from __future__ import annotations

import logging

from lmforge.arguments import RolloutArguments

logger = logging.getLogger("lmforge.serve")


def rollout_main(args: RolloutArguments) -> None:
    """Build the engine, then serve the rollout routes and the OpenAI routes until SIGINT/SIGTERM."""
    from lmforge.pipelines.deploy import _is_loopback, _passive_openmp, add_log_file, check_port
    from lmforge.utils.log import setup_logging

    setup_logging()
    if args.log_file:
        add_log_file(args.log_file)
    _passive_openmp()
    from lmforge.pipelines.infer import build_engine
    from lmforge.serve.auth import load_api_keys
    from lmforge.serve.rollout import create_rollout_app
    from lmforge.serve.server import make_server

    keys = load_api_keys(args.api_key, args.api_key_file)
    check_port(args.host, args.port)  # before the model loads
    from lmforge.utils.log import mask_secret

    for key in keys:
        mask_secret(key)
    if not keys and not _is_loopback(args.host):
        logger.warning("listening on %s without --api_key: anyone who can reach this port can change the "
                       "model's weights (/rollout/update_weights)", args.host)
    if args.external_plugins:
        from lmforge.registry import load_plugins

        load_plugins(args.external_plugins)
    engine = build_engine(args)
    app = create_rollout_app(engine, args)
    logger.info("rollout server on http://%s:%d (routes /rollout/info, /rollout/generate, /rollout/update_weights; "
                "OpenAI routes on /v1)", args.host, args.port)
    make_server(app, args.host, args.port, shutdown_timeout=args.shutdown_timeout,
                max_connections=args.max_connections, header_timeout=args.body_timeout).run()
