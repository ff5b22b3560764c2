"""Generalised knowledge distillation (``rlhf --rlhf_type gkd``): the student matches the teacher's token
distributions on sequences it samples itself.

Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes"
(GKD, arXiv:2306.13649). Each micro-batch's completions are, with probability ``lmbda``, the student's own
samples (on-policy: the student learns to recover from its own mistakes, not only to continue the
teacher's perfect prefixes); otherwise the dataset's replies, or with ``--seq_kd`` the teacher's samples
(sequence-level KD). On every completion token the loss is the generalised Jensen-Shannon divergence

    JSD(beta)(P || Q) = beta KL(P || M) + (1 - beta) KL(Q || M),   M = beta P + (1 - beta) Q

between the teacher's distribution P and the student's Q (the paper's eq. 3), both at ``--temperature``.
``beta`` interpolates between the two KL directions: ``beta = 0`` is taken as the forward KL(P || Q) and
``beta = 1`` as the reverse KL(Q || P), the limits of JSD(beta) up to its vanishing scale.

Written here rather than taken from TRL: lmforge's trainers share its rollout engines, templates and
checkpointing, and the loss is a few lines on top of them.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
from torch import Tensor

from lmforge.rlhf.collator import completion_start
from lmforge.rlhf.grpo import selective_log_softmax
from lmforge.rlhf.rollout import RolloutPrompt, run_rollouts
from lmforge.rlhf.scoring import prompt_completion_batch
from lmforge.rlhf.metrics import MetricStore
from lmforge.trainers.trainer import LmforgeTrainer

__all__ = ["GKDTrainer", "generalized_jsd", "split_prompt_completion", "collate_rows", "choose_on_policy"]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, beta: float = 0.5,
                    temperature: float = 1.0) -> Tensor:
    """Per-position JSD(beta) [..., ] between the teacher's and the student's distributions (see the module
    docstring), over the last (vocabulary) dimension; computed in float32 from log-probabilities."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    s = (student_logits.float() / temperature).log_softmax(-1)
    t = (teacher_logits.float() / temperature).log_softmax(-1)

    def kl(log_p: Tensor, log_q: Tensor) -> Tensor:  # KL(p || q)
        return (log_p.exp() * (log_p - log_q)).sum(-1)

    if beta == 0.0:
        return kl(t, s)
    if beta == 1.0:
        return kl(s, t)
    m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1.0 - beta)]), dim=0)
    return beta * kl(t, m) + (1.0 - beta) * kl(s, m)


def split_prompt_completion(input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int], list[int]]:
    """An encoded training row as (prompt ids, completion ids, completion mask): the completion is the last run
    of labelled tokens (the final reply) and everything after it; the mask marks the labelled ones."""
    cut = completion_start(list(labels))
    return list(input_ids[:cut]), list(input_ids[cut:]), [int(x != IGNORE_INDEX) for x in labels[cut:]]


def collate_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """GKD batches are the encoded rows themselves: the trainer decides their completions and tensorises them."""
    return list(rows)


def choose_on_policy(lmbda: float, seed: int, step: int, micro: int) -> bool:
    """Whether a micro-batch uses the student's own samples: a draw with probability ``lmbda``, reproducible
    from (seed, step, micro-batch)."""
    if lmbda <= 0.0:
        return False
    if lmbda >= 1.0:
        return True
    g = torch.Generator().manual_seed(hash((seed, step, micro)) & 0x7FFFFFFF)
    return float(torch.rand((), generator=g)) < lmbda


class GKDTrainer(LmforgeTrainer):
    """Trains ``rlhf_type gkd``; see the module docstring.

    ``teacher_model`` is a frozen model with the student's tokenizer; ``template`` the training template
    (its ``infer`` mode is not needed: prompts are the rows' own ids up to the final reply).
    """

    def __init__(self, *args: Any, teacher_model: Any = None, rlhf_args: Any = None, template: Any = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.rlhf = rlhf_args if rlhf_args is not None else self.lmforge_args
        if teacher_model is None:
            raise ValueError("GKDTrainer needs a teacher_model")
        if template is None:
            raise ValueError("GKDTrainer needs the template")
        self.teacher = teacher_model.eval().requires_grad_(False).to(self.args.device)
        self.template = template
        self.beta = self.rlhf.resolved_beta
        self.loss_is_scaled_for_ga = False  # a token mean per micro-batch: the Trainer divides by the steps
        self.model_accepts_loss_kwargs = False
        self.metric_store = MetricStore(self.accelerator.device)
        self._student_engine: Any = None
        self._teacher_engine: Any = None
        self._micro = 0
        self._step_seen = -1

    # ----------------------------------------------------------------------------- completions

    def _engine(self, teacher: bool) -> Any:
        from lmforge.infer.hf import HfEngine

        if teacher:
            if self._teacher_engine is None:
                self._teacher_engine = HfEngine(model_obj=self.teacher, tokenizer=self.processing_class,
                                                template=self.template)
            return self._teacher_engine
        if self._student_engine is None:
            policy = self.accelerator.unwrap_model(self.model)
            self._student_engine = HfEngine(model_obj=policy, tokenizer=self.processing_class, template=self.template)
        return self._student_engine

    def _sample(self, prompts: list[list[int]], teacher: bool) -> tuple[list[list[int]], float]:
        """One sampled completion per prompt (ids, end-of-turn included), from the student or the teacher."""
        from lmforge.infer.protocol import RequestConfig

        a = self.rlhf
        policy = self.accelerator.unwrap_model(self.model)
        was_training = policy.training
        engine = self._engine(teacher)
        cfg = RequestConfig(max_tokens=a.max_completion_length, temperature=a.temperature, top_p=a.top_p,
                            top_k=a.top_k, repetition_penalty=a.repetition_penalty)
        t0 = time.perf_counter()
        try:
            episodes = run_rollouts(engine, [RolloutPrompt([], None, p) for p in prompts], cfg, num_generations=1)
        finally:
            policy.train(was_training)
        return [e.completion_ids for e in episodes], time.perf_counter() - t0

    def _batch(self, rows: list[dict[str, Any]], source: str) -> dict[str, Tensor]:
        """Left-padded prompts, then right-padded completions of ``source``: dataset, student or teacher."""
        parts = [split_prompt_completion(r["input_ids"], r["labels"]) for r in rows]
        if source != "dataset":
            sampled, seconds = self._sample([p for p, _, _ in parts], teacher=source == "teacher")
            parts = [(p, c, [1] * len(c)) for (p, _, _), c in zip(parts, sampled)]
            self.metric_store.add("train", "gkd/sample_seconds", seconds)
        pad = self.processing_class.pad_token_id if self.processing_class is not None else 0
        return prompt_completion_batch(parts, pad, self.args.device)

    def _prepare_inputs(self, inputs: Any) -> dict[str, Any]:
        if isinstance(inputs, dict):
            return inputs
        if not self.model.training:
            return self._batch(inputs, "dataset")
        if self.state.global_step != self._step_seen:
            self._step_seen, self._micro = self.state.global_step, 0
        on_policy = choose_on_policy(self.rlhf.lmbda, self.args.seed, self.state.global_step, self._micro)
        self._micro += 1
        source = "student" if on_policy else ("teacher" if self.rlhf.seq_kd else "dataset")
        self.metric_store.add("train", "gkd/on_policy", float(on_policy))
        return self._batch(inputs, source)

    # ----------------------------------------------------------------------------- loss

    def _completion_logits(self, model: Any, batch: dict[str, Tensor]) -> Tensor:
        C = batch["completion_ids"].shape[1]
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], use_cache=False).logits
        return out[:, -(C + 1):-1]

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        student = self._completion_logits(model, inputs)
        with torch.no_grad():
            teacher = self._completion_logits(self.teacher, inputs)
        vocab = min(student.shape[-1], teacher.shape[-1], len(self.processing_class)) \
            if self.processing_class is not None else min(student.shape[-1], teacher.shape[-1])
        mask = inputs["completion_mask"]
        jsd = generalized_jsd(student[..., :vocab], teacher[..., :vocab], self.beta, self.rlhf.temperature)
        n = mask.sum().clamp(min=1)
        loss = (jsd * mask).sum() / n
        split = "train" if model.training else "eval"
        self.metric_store.add(split, "gkd/jsd", loss.detach())
        with torch.no_grad():
            nll = -(selective_log_softmax(student, inputs["completion_ids"]) * mask).sum() / n
        self.metric_store.add(split, "gkd/student_nll", nll)
        return (loss, {}) if return_outputs else loss

    def prediction_step(self, model: Any, inputs: Any, prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None):
        """Evaluation: the JSD on the validation rows' own replies (``eval_`` metrics)."""
        batch = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, batch)
        return loss.detach(), None, None

    def _track_num_input_tokens(self, inputs: Any) -> None:
        return None  # the rows are not the trained sequences (their completions may be sampled)

    def floating_point_ops(self, inputs: Any) -> int:
        return 0

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self.metric_store.pop_into(logs)
        super().log(logs, start_time)

