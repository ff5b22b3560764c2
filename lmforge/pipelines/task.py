"""``sft --task_type seq_cls|embedding|reranker|generative_reranker``: the sft pipeline with a task's model,
inputs and loss.

    lmforge sft --model builtin:tiny --task_type embedding --dataset builtin:arith-retrieval#2000
    lmforge sft --model builtin:tiny --task_type seq_cls --dataset builtin:intents
    lmforge sft --model builtin:tiny --task_type reranker --dataset builtin:arith-retrieval#2000

``prepare_training`` loads the model with the task's class (``AutoModel``,
``AutoModelForSequenceClassification``, or the causal LM for a generative reranker), the rows are
mapped and encoded by :mod:`lmforge.dataset.tasks` / :mod:`lmforge.dataset.task_encode`, and
``run_training`` trains a :class:`~lmforge.trainers.tasks.trainer.TaskTrainer`: the output folder,
checkpoints, several processes and resume are sft's. What the task was trained with (task type,
pooling, prompts, labels) is written to ``args.json``, so ``deploy``/``eval``/``export --ckpt_dir``
serve the checkpoint the same way.
"""
from __future__ import annotations

import logging
from typing import Any

from lmforge.arguments import TrainArguments
from lmforge.pipelines.sft import load_training_data, prepare_training, run_training

logger = logging.getLogger("lmforge")


def _check(args: TrainArguments) -> None:
    """What can be refused before anything loads."""
    from lmforge.registry import load_plugins
    from lmforge.trainers.tasks.losses import loss_for

    task = args.task_type
    load_plugins(args.external_plugins)  # a plugin may register a task loss
    if args.streaming:
        raise ValueError(f"--streaming is not supported with --task_type {task}; drop it")
    if task == "seq_cls":
        if args.loss_type:
            raise ValueError("--loss_type does not apply to --task_type seq_cls: the loss follows --problem_type "
                             "(cross-entropy, binary cross-entropy per class, or squared error)")
    else:
        loss_for(task, args.loss_type)
    if args.num_negatives is not None and args.num_negatives < 0:
        raise ValueError(f"--num_negatives must be 0 or more, got {args.num_negatives}")
    if args.infonce_temperature <= 0 or args.listwise_temperature <= 0:
        raise ValueError("--infonce_temperature and --listwise_temperature must be positive")
    if any(d < 1 for d in args.matryoshka_dims):
        raise ValueError(f"--matryoshka_dims must be positive, got {args.matryoshka_dims}")
    if args.matryoshka_dims and task != "embedding":
        raise ValueError("--matryoshka_dims applies to --task_type embedding only")


def resolve_label_spec(args: TrainArguments) -> dict[str, Any]:
    """A classifier's problem type, number of classes and class names, from the flags and the training labels
    (read once before the model loads, since its head is sized by them); written back into ``args``."""
    from lmforge.dataset import load_dataset
    from lmforge.dataset.tasks import resolve_labels

    train, _ = load_dataset(args.dataset, seed=args.data_seed, columns=args.columns or None, strict=args.strict,
                            num_proc=args.dataset_num_proc, hub=args.hub, shuffle=False, task="seq_cls")
    spec = resolve_labels(train["label"], num_labels=args.num_labels, problem_type=args.problem_type,
                          label_names=list(args.label_names))
    args.num_labels, args.problem_type, args.label_names = spec["num_labels"], spec["problem_type"], spec["label_names"]
    names = f" ({', '.join(spec['label_names'])})" if spec["label_names"] else ""
    logger.info("Classifier: %s, %d classes%s", spec["problem_type"], spec["num_labels"], names)
    return spec


def _log_sample(ds: Any, encoder: Any) -> None:
    row = ds[0]  # run_training logs the input itself
    if row.get("positive_ids") is not None:
        logger.info("Sample positive: %r", encoder.safe_decode(row["positive_ids"])[:300])
    if row.get("negative_ids"):
        logger.info("Sample negative (1 of %d): %r", len(row["negative_ids"]),
                    encoder.safe_decode(row["negative_ids"][0])[:300])


def task_main(args: TrainArguments) -> dict[str, Any]:
    """Train ``args.task_type``; returns what ``sft_main`` returns, plus ``task``."""
    from lmforge.dataset.task_encode import TaskEncoder
    from lmforge.model import resolve_model_dir
    from lmforge.model.tasks import default_pooling, is_decoder_config, yes_no_token_ids
    from lmforge.trainers.tasks.collator import TaskCollator
    from lmforge.trainers.tasks.trainer import TaskTrainer
    from lmforge.utils.log import setup_logging

    setup_logging()
    task = args.task_type
    _check(args)
    if args.packing:
        logger.warning("--task_type %s: --packing ignored (each sequence is pooled or scored on its own)", task)
        args.packing = False
    spec = resolve_label_spec(args) if task == "seq_cls" else None
    setup = prepare_training(args, "train")
    model, tokenizer = setup.model, setup.tokenizer
    if task in ("seq_cls", "reranker") and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # the head finds each row's last token by it
    pooling = "last"
    if task == "embedding":
        args.pooling = pooling = args.pooling or default_pooling(
            model.config, resolve_model_dir(args.model, hub=args.hub, revision=args.revision))
        logger.info("Embedding: %s pooling, normalised vectors, loss %s", pooling, args.loss_type or "infonce")
    yes_no = yes_no_token_ids(tokenizer) if task == "generative_reranker" else None
    encoder = TaskEncoder(task, tokenizer, setup.template, decoder=is_decoder_config(model.config),
                          max_length=args.max_length, truncation_strategy=args.truncation_strategy,
                          query_prompt=args.query_prompt, document_prompt=args.document_prompt,
                          rerank_instruction=args.rerank_instruction, label_spec=spec)
    train, val = load_training_data(args, encoder, pack=False)
    _log_sample(train, encoder)
    collator = TaskCollator(task, tokenizer.pad_token_id, num_negatives=args.num_negatives)
    result = run_training(setup, train, val, trainer_cls=TaskTrainer, data_collator=collator, compute_metrics=None,
                          loss_fn=None, task=task, pooling=pooling, yes_no=yes_no)
    return {**result, "task": task}
