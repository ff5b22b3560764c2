"""``rlhf_main``: preference training and GRPO with the sft pipeline's pieces.

    from lmforge import rlhf_main, RlhfArguments
    result = rlhf_main(RlhfArguments(rlhf_type="dpo", model="builtin:tiny",
                                     dataset=["builtin:arith-preference#2000"]))
    result = rlhf_main(RlhfArguments(rlhf_type="grpo", model="output/sft/checkpoint-1000",
                                     dataset=["builtin:arith-rl#2000"], reward_funcs=["accuracy"]))

The model, template, tuner, output folder and checkpointing are the ones ``sft`` uses
(``prepare_training`` / ``run_training``); this module only picks the template mode, turns the
data into the shape each objective wants, chooses the reference model, and swaps in the
:class:`lmforge.rlhf.trainer.PreferenceTrainer` with its collator (or, for grpo, the
:class:`lmforge.rlhf.grpo_trainer.GRPOTrainer` over prompt-only rows, with its rewards and
multi-turn scheduler; see docs/grpo.md).

For gkd, :class:`lmforge.rlhf.gkd.GKDTrainer` trains on the rows' prompts with completions the student
samples, the dataset's, or the teacher's (``--teacher_model``, loaded frozen).

``--packing`` means padding-free batches here (all ``2B`` chosen and rejected sequences of a batch
flattened into one row); pairs are never bin-packed across batches, since a pair must stay in one
batch. ``rm`` always uses padded rows (its head pools each row's last token).
"""
from __future__ import annotations

import copy
import functools
import logging
from typing import Any

from lmforge.arguments import RlhfArguments
from lmforge.pipelines.sft import (TrainingSetup, default_collator, load_training_data, prepare_training,
                                   run_training)

logger = logging.getLogger("lmforge")


def kto_unpaired(ds: Any) -> Any:
    """KTO wants unpaired rows with ``label``: a preference pair becomes a desirable and an undesirable row.

    Rows that already have a ``label`` pass through; a row with neither fails, naming it.
    """
    from lmforge.dataset import DatasetError

    def expand(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in batch}
        for i in range(len(batch["messages"])):
            row = {k: v[i] for k, v in batch.items()}
            if row.get("label") is not None:
                rows = [row]
            elif row.get("rejected_messages") is not None or row.get("rejected_response") is not None:
                messages = row["messages"]
                rejected = row.get("rejected_messages") or [*messages[:-1],
                                                           {**messages[-1], "content": row["rejected_response"]}]
                base = {**row, "rejected_response": None, "rejected_messages": None}
                rows = [{**base, "label": True}, {**base, "messages": rejected, "label": False}]
            else:
                raise DatasetError(f"rlhf_type kto: row {i} of a batch has no 'label' (true/false) and no rejected "
                                   "reply to pair it with")
            for r in rows:
                for k in out:
                    out[k].append(r.get(k))
        return out

    return ds.map(expand, batched=True, desc="KTO: pairs to unpaired rows")


def _check_kto_weights(train: Any, args: RlhfArguments) -> None:
    """The KTO paper advises ``lambda_D n_D / (lambda_U n_U)`` in [1, 4/3]; say so when it is outside."""
    if not hasattr(train, "column_names") or "label" not in train.column_names:
        return
    labels = train["label"]
    n_d = sum(1 for x in labels if x)
    n_u = len(labels) - n_d
    if n_d and n_u:
        ratio = args.desirable_weight * n_d / (args.undesirable_weight * n_u)
        logger.info("KTO: %d desirable, %d undesirable rows; lambda_D n_D / (lambda_U n_U) = %.2f", n_d, n_u, ratio)
        if not 1.0 <= ratio <= 4 / 3:
            logger.warning("KTO: that ratio is outside the [1, 4/3] the KTO paper recommends; adjust "
                           "--desirable_weight/--undesirable_weight")
    elif not n_d or not n_u:
        logger.warning("KTO: the data has only %s rows", "undesirable" if not n_d else "desirable")


def _check_kto_batch(args: RlhfArguments) -> None:
    if args.per_device_train_batch_size is not None and args.per_device_train_batch_size < 2:
        raise ValueError("rlhf_type kto estimates its reference point from mismatched rows of a batch: "
                         "--per_device_train_batch_size must be at least 2")


def _reference_model(args: RlhfArguments, setup: TrainingSetup) -> Any:
    """The frozen reference: ``--ref_model``; None for adapters (switched off instead); else a copy of the start.

    With ``--precompute_ref_log_probs`` no copy is made (the untrained policy scores the data) and
    ``--ref_model`` is passed as a loader, so the trainer holds the only reference and frees it.
    """
    if not args.needs_reference:
        return None
    if args.precompute_ref_log_probs:
        if args.ref_model:
            return functools.partial(_load_reference, args, setup)
        logger.info("Reference: log-probs of the starting model, computed once before training")
        return None
    if args.ref_model:
        return _load_reference(args, setup)
    if args.is_adapter and args.sync_ref_model:  # a reference that moves cannot be the adapter-free base
        logger.info("Reference: a frozen copy of the starting model (--sync_ref_model moves it)")
        ref = copy.deepcopy(setup.model)
        return ref.merge_and_unload() if hasattr(ref, "merge_and_unload") else ref
    if args.is_adapter:
        logger.info("Reference: the base model with the %s adapters disabled (no second copy)", args.train_type)
        return None
    logger.info("Reference: a frozen copy of the starting model (train_type %s)", args.train_type)
    return copy.deepcopy(setup.model)


def _load_reference(args: RlhfArguments, setup: TrainingSetup, path: str | None = None,
                    flag: str = "--ref_model") -> Any:
    from lmforge.model import get_model_tokenizer

    path = path or args.ref_model
    ref, tok = get_model_tokenizer(
        path, hub=args.hub, torch_dtype=args.torch_dtype, attn_impl=args.attn_impl,
        model_kwargs=args.model_kwargs, trust_remote_code=args.trust_remote_code,
        device="cuda" if setup.on_gpu else "cpu")
    if len(tok) != len(setup.tokenizer):
        raise ValueError(f"{flag} {path}: its vocabulary ({len(tok)}) differs from the model's "
                         f"({len(setup.tokenizer)}); log-probs would not be comparable")
    logger.info("%s: %s, loaded separately", "Reference" if flag == "--ref_model" else "Teacher", path)
    return ref


def _with_empty_labels(ds: Any) -> Any:
    """Prompt-only rows have no labels; the shared training code logs a sample's labels, so give it none."""
    if ds is None or "labels" in (ds.column_names or ()):
        return ds
    return ds.map(lambda b: {"labels": [[] for _ in b["input_ids"]]}, batched=True)


def grpo_main(args: RlhfArguments, engine: Any = None) -> dict[str, Any]:
    """GRPO: prompts in (a trailing reply is dropped), rewards from ``--reward_funcs``/``--reward_model``.

    ``engine``: an already built rollout engine to sample from instead of the one the flags choose
    (weights are pushed to it with ``update_weights`` after each optimizer step).
    """
    import torch

    from lmforge.rlhf.grpo_trainer import GRPOTrainer, collate_prompts, prompt_rows
    from lmforge.rlhf.multi_turn import build_scheduler
    from lmforge.rlhf.rewards import build_reward_funcs

    from lmforge.registry import load_plugins

    load_plugins(args.external_plugins)  # they may register the rewards and schedulers checked here
    # rewards and the scheduler are checked before the policy loads and any data is encoded
    on_gpu = torch.cuda.is_available() and not args.use_cpu
    reward_funcs = build_reward_funcs(args.reward_funcs, reward_kwargs=args.reward_kwargs,
                                      reward_models=args.reward_model, max_completion_length=args.max_completion_length,
                                      device="cuda" if on_gpu else "cpu")
    scheduler = build_scheduler(args.multi_turn_scheduler, args.max_turns, args.multi_turn_kwargs)
    setup = prepare_training(args, "infer")  # the dataset is encoded as prompts, ending with the generation prompt
    if getattr(setup.template, "vision", None) is not None and args.infer_backend == "native" and engine is None \
            and not args.rollout_url:
        from lmforge.infer.native.vision import check_supported

        try:  # before training starts, not at the first rollout
            check_supported(setup.model)
        except NotImplementedError as e:
            raise ValueError(str(e)) from None
    if args.packing:
        logger.warning("rlhf_type grpo: --packing ignored (completions are sampled and padded per micro-batch)")
    train, val = load_training_data(args, setup.template, pack=False, transform=prompt_rows)
    logger.info("GRPO: %s prompts x %d samples; rewards %s (weights %s)", len(train) if hasattr(train, "__len__")
                else "streamed", args.num_generations, [n for n, _ in reward_funcs], args.reward_weights or "all 1")
    return run_training(setup, _with_empty_labels(train), _with_empty_labels(val), trainer_cls=GRPOTrainer,
                        data_collator=collate_prompts, compute_metrics=None, ref_model=_reference_model(args, setup),
                        rlhf_args=args, reward_funcs=reward_funcs, template=setup.template, scheduler=scheduler,
                        engine=engine)


def gkd_main(args: RlhfArguments) -> dict[str, Any]:
    """GKD: the rows' prompts (and replies, for the off-policy batches) with a teacher of the same tokenizer."""
    from lmforge.rlhf.gkd import GKDTrainer, collate_rows

    setup = prepare_training(args, "train")
    if args.packing:
        logger.warning("rlhf_type gkd: --packing ignored (completions are sampled and padded per micro-batch)")
    teacher = _load_reference(args, setup, args.teacher_model, "--teacher_model")
    train, val = load_training_data(args, setup.template, pack=False)
    columns = getattr(train, "column_names", None) or []
    if any(k in columns and any(train[k]) for k in ("images", "videos")):
        raise ValueError("GKD on rows with images or videos is not supported yet (the teacher and the student score "
                         "text only); train image rows with sft or --rlhf_type dpo")
    logger.info("GKD: lmbda %.2f (on-policy share), beta %.2f, %s off-policy replies", args.lmbda, args.resolved_beta,
                "teacher-sampled" if args.seq_kd else "dataset")
    return run_training(setup, train, val, trainer_cls=GKDTrainer, data_collator=collate_rows, compute_metrics=None,
                        teacher_model=teacher, rlhf_args=args, template=setup.template)


def rlhf_main(args: RlhfArguments) -> dict[str, Any]:
    """Train a preference objective or GRPO; returns what ``sft_main`` returns (``output_dir``, ``last_checkpoint``, ...)."""
    from lmforge.rlhf.collator import PreferenceCollator
    from lmforge.rlhf.trainer import PreferenceTrainer
    from lmforge.utils.log import setup_logging

    setup_logging()
    if args.beta is None and args.rlhf_type != "rm":
        args.beta = args.resolved_beta  # recorded in args.json
    if args.dry_run:
        from lmforge.toolkit.dry_run import dry_run  # the one import upward: the toolkit reads this module

        return dry_run(args, "rlhf")
    if args.rlhf_type == "grpo":
        return grpo_main(args)
    if args.rlhf_type == "gkd":
        return gkd_main(args)
    kto, rm = args.rlhf_type == "kto", args.rlhf_type == "rm"
    if kto:
        _check_kto_batch(args)  # the user's value, before the model loads
    setup = prepare_training(args, "train" if kto else "rlhf")
    if kto:
        _check_kto_batch(args)  # the default chosen for the device
    if rm:
        from lmforge.rlhf.reward_model import reward_head_names, reward_model_from_causal_lm

        setup.model = reward_model_from_causal_lm(setup.model, setup.tokenizer)
        if args.is_adapter:  # the new head must train in full beside the adapters
            args.modules_to_save = list(dict.fromkeys([*args.modules_to_save, *reward_head_names(setup.model)]))
    padding_free = args.packing
    if rm and padding_free:
        logger.warning("rlhf_type rm: --packing ignored (the reward head pools each padded row's last token)")
        padding_free = False
    train, val = load_training_data(args, setup.template, pack=False, transform=kto_unpaired if kto else None)
    if kto:
        _check_kto_weights(train, args)
    base = None
    if getattr(setup.template, "vision", None) is not None:  # image rows: the sft collator adds their pixels
        if rm:
            raise ValueError("--rlhf_type rm on a vision-language model is not supported yet (the reward head "
                             "is built for causal language models)")
        base = default_collator(setup, setup.model)  # padding-free as --packing says, like padding_free here
    collator = PreferenceCollator(setup.tokenizer.pad_token_id, kind="kto" if kto else "pair",
                                  padding_free=padding_free, base=base)
    return run_training(setup, train, val, trainer_cls=PreferenceTrainer, data_collator=collator,
                        compute_metrics=None, ref_model=_reference_model(args, setup), rlhf_args=args)
