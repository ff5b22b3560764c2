"""PreferenceTrainer: LmforgeTrainer with sequence-level preference objectives.

What it adds to the SFT trainer:

- **Sequence log-probs.** One forward pass over the ``2B`` chosen+rejected sequences of a batch
  (padded rows or one padding-free row); the log-probs of labelled tokens are summed per
  sequence, or averaged where the objective is defined on the average (SimPO, ORPO, IPO).
  Only labelled positions are upcast to float32, never the full ``[2B, T, V]`` logits. Which
  tokens count is the template's labels (``--loss_scale last_round`` keeps only the final
  reply); ``loss_scale`` weights other than 0/1 are not applied to sequence log-probs.
- **The reference model**, for DPO and KTO, in one of three forms: the policy itself with its
  LoRA adapters switched off (``model.disable_adapter()`` under ``no_grad``: no second copy of the
  weights), a separate frozen model, or log-probs precomputed once into the dataset
  (``ref_chosen_logps`` / ``ref_rejected_logps`` columns, which a user may also supply).
- **Metrics.** ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
  ``rewards/accuracies`` and ``logps/*`` are accumulated over the micro-batches between two logs
  (sums and counts, so the means are exact) and merged into the Trainer's log lines, with an
  ``eval_`` prefix during evaluation.

The loss of a batch is the mean of the per-pair (per-row for KTO) losses; the Trainer divides it
by the gradient-accumulation steps, so accumulated micro-batches average like one large batch.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lmforge.rlhf import losses as L
from lmforge.trainers.trainer import LmforgeTrainer, LossOnlyEvaluation

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


class SequenceScores(NamedTuple):
    """Per-sequence sums of labelled-token log-probs and the number of labelled tokens, both [n]."""

    sums: Tensor
    counts: Tensor

    def logps(self, average: bool) -> Tensor:
        return self.sums / self.counts.clamp(min=1) if average else self.sums


def sequence_log_probs(logits: Tensor, labels: Tensor, position_ids: Tensor | None = None) -> SequenceScores:
    """Summed log-probs of each sequence's labelled tokens.

    ``labels`` are unshifted (``labels[t]`` is predicted by ``logits[t-1]``). Padded batches hold
    one sequence per row; with ``position_ids`` (padding-free) the sequences are the runs that
    start where the position is 0, and a token that starts a sequence is never a target.
    """
    logits, targets = logits[:, :-1], labels[:, 1:]
    if position_ids is None:
        n = labels.shape[0]
        seg = torch.arange(n, device=labels.device)[:, None].expand_as(targets)
    else:
        starts = position_ids == 0
        seg_all = starts.reshape(-1).long().cumsum(0).reshape(starts.shape) - 1
        n = int(starts.sum())
        seg = seg_all[:, 1:]
        targets = targets.masked_fill(starts[:, 1:], IGNORE_INDEX)
    mask = targets != IGNORE_INDEX
    picked = logits[mask].float()                                     # [N, V], labelled rows only
    tgt = targets[mask]
    token_logps = picked.gather(-1, tgt[:, None]).squeeze(-1) - picked.logsumexp(-1)
    idx = seg[mask]
    zeros = torch.zeros(n, dtype=torch.float32, device=logits.device)
    return SequenceScores(zeros.index_add(0, idx, token_logps), zeros.index_add(0, idx, torch.ones_like(token_logps)))


def _model_inputs(batch: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {"input_ids": batch[f"{prefix}input_ids"]}
    for key in ("attention_mask", "position_ids"):
        if batch.get(f"{prefix}{key}") is not None:
            out[key] = batch[f"{prefix}{key}"]
    return out


def split_batch(batch: dict[str, Any], n_first: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The first ``n_first`` sequences and the rest, for a padded or a padding-free batch."""
    keys = [k for k in ("input_ids", "labels", "attention_mask", "position_ids") if batch.get(k) is not None]
    if batch.get("position_ids") is not None and batch["input_ids"].shape[0] == 1:
        starts = (batch["position_ids"][0] == 0).nonzero().squeeze(1)
        cut = int(starts[n_first])
        return {k: batch[k][:, :cut] for k in keys}, {k: batch[k][:, cut:] for k in keys}
    return {k: batch[k][:n_first] for k in keys}, {k: batch[k][n_first:] for k in keys}


def count_sequences(batch: dict[str, Any], prefix: str = "") -> int:
    pos = batch.get(f"{prefix}position_ids")
    if pos is not None and batch[f"{prefix}input_ids"].shape[0] == 1:
        return int((pos == 0).sum())
    return batch[f"{prefix}input_ids"].shape[0]


class MetricStore:
    """Values logged between two Trainer logs, kept as exact reductions: sums and counts for means, or
    running min/max; reduced over every process (so uneven per-process subsets add up right)."""

    def __init__(self, accelerator: Any):
        self.accelerator = accelerator
        self._data: dict[str, dict[str, list]] = {"train": {}, "eval": {}}

    def add(self, split: str, key: str, value: Tensor | float, reduce: str = "mean") -> None:
        """``reduce``: ``mean`` (over every value added), ``sum`` (a count), ``min`` or ``max``."""
        value = torch.as_tensor(value).detach().float().reshape(-1)
        device = self.accelerator.device
        if reduce in ("mean", "sum"):
            count = float(value.numel()) if reduce == "mean" else 0.0
            stat = torch.stack([value.sum(), torch.tensor(count)]).to(device)
            if self.accelerator.num_processes > 1:
                stat = self.accelerator.reduce(stat, reduction="sum")
        elif reduce in ("min", "max"):
            if not value.numel():
                return
            stat = (value.min() if reduce == "min" else value.max()).to(device)[None]
            if self.accelerator.num_processes > 1:
                stat = self.accelerator.gather(stat)
                stat = stat.min()[None] if reduce == "min" else stat.max()[None]
        else:
            raise ValueError(f"MetricStore reduce must be mean, sum, min or max, got {reduce!r}")
        slot = self._data[split].get(key)
        if reduce == "sum":
            total = float(stat[0])
            self._data[split][key] = ["sum", total] if slot is None else ["sum", slot[1] + total]
        elif reduce == "mean":
            total, count = float(stat[0]), int(stat[1])
            self._data[split][key] = ["mean", total, count] if slot is None else ["mean", slot[1] + total, slot[2] + count]
        else:
            v = float(stat[0])
            pick = min if reduce == "min" else max
            self._data[split][key] = [reduce, v] if slot is None else [reduce, pick(slot[1], v)]

    def pop(self, split: str) -> dict[str, float]:
        """The reduced values of ``split`` (means rounded to 6 places), then forget them."""
        out = {}
        for key, slot in self._data[split].items():
            if slot[0] == "mean":
                if slot[2]:
                    out[key] = round(slot[1] / slot[2], 6)
            else:
                out[key] = round(slot[1], 6)
        self._data[split] = {}
        return out

    def pop_into(self, logs: dict[str, float]) -> tuple[str, dict[str, float]]:
        """Add the stored values of the split a Trainer ``logs`` dict belongs to (``eval_`` keys mean eval)
        to it, prefixed like its keys; returns (split, the values)."""
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        stored = self.pop(split)
        prefix = "eval_" if split == "eval" else ""
        logs.update({f"{prefix}{k}": v for k, v in stored.items()})
        return split, stored


class ReferenceMixin:
    """The frozen reference policy of DPO, KTO and GRPO: a separate model, or the policy without its adapters."""

    ref_model: Any = None

    def _set_reference(self, ref_model: Any) -> None:
        self.ref_model = ref_model
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
            ref_model.to(self.args.device)

    def _has_adapters(self) -> bool:
        return hasattr(self.accelerator.unwrap_model(self.model), "disable_adapter")

    @contextlib.contextmanager
    def _reference(self, model: Any):
        """The model that plays the reference, under no_grad: the ref model, or ``model`` without adapters
        (or ``model`` as it is, only while precomputing before the first step)."""
        with torch.no_grad():
            if self.ref_model is not None:
                yield self.ref_model
            elif self._has_adapters():
                with self.accelerator.unwrap_model(model).disable_adapter():
                    yield model
            else:
                yield model


class PreferenceTrainer(LossOnlyEvaluation, ReferenceMixin, LmforgeTrainer):
    """Trains DPO (and variants), KTO, ORPO, SimPO, CPO and reward models; see the module docstring.

    ``rlhf_args`` is an :class:`lmforge.arguments.RlhfArguments` (default: ``lmforge_args``).
    ``ref_model`` is a frozen reference for DPO/KTO; leave it None for LoRA (adapters disabled)
    or for the reference-free objectives. With ``precompute_ref_log_probs`` it may be a zero-argument
    loader instead, called once here and dropped after scoring, so no caller keeps it alive; with
    neither, the untrained policy itself scores the data before the first step.
    """

    def __init__(self, *args: Any, ref_model: Any = None, rlhf_args: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.rlhf = rlhf_args if rlhf_args is not None else self.lmforge_args
        if self.rlhf is None:
            raise ValueError("PreferenceTrainer needs rlhf_args (an RlhfArguments)")
        self.kind = self.rlhf.rlhf_type
        self.beta = self.rlhf.resolved_beta
        self.average = self.rlhf.average_log_probs
        # Sequence-level losses are means over pairs: let the Trainer divide by the accumulation steps.
        self.loss_is_scaled_for_ga = False
        self.model_accepts_loss_kwargs = False
        self.metric_store = MetricStore(self.accelerator)
        if callable(ref_model) and not isinstance(ref_model, torch.nn.Module):
            ref_model = ref_model()
        self._set_reference(ref_model)
        precompute = self.rlhf.precompute_ref_log_probs
        if self.rlhf.needs_reference and ref_model is None and not precompute and not self._has_adapters():
            raise ValueError(f"rlhf_type {self.kind} needs a reference model: pass --ref_model, train with LoRA "
                             "(the adapters are switched off for the reference), or use --precompute_ref_log_probs")
        if precompute:
            self.train_dataset = self.precompute_reference_log_probs(self.train_dataset, "train")
            self.eval_dataset = self.precompute_reference_log_probs(self.eval_dataset, "eval")
            self.ref_model = None  # every batch carries its reference log-probs now: free the model

    # ----------------------------------------------------------------------------- reference

    def precompute_reference_log_probs(self, dataset: Any, split: str) -> Any:
        """Score ``dataset`` once with the reference and add ``ref_chosen_logps``/``ref_rejected_logps``.

        Columns that are already there (computed elsewhere) are kept as they are.
        """
        if dataset is None or {"ref_chosen_logps", "ref_rejected_logps"} <= set(dataset.column_names or ()):
            return dataset
        if not hasattr(dataset, "add_column"):
            raise ValueError("--precompute_ref_log_probs needs a map-style dataset (drop --streaming)")
        from torch.utils.data import DataLoader

        loader = DataLoader(dataset, batch_size=self.args.per_device_eval_batch_size, shuffle=False,
                            collate_fn=self.data_collator)
        chosen: list[float] = []
        rejected: list[float] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in loader:
                batch = self._prepare_inputs(batch)
                with self._reference(self.model) as ref:
                    c, r = self._pair_logps(ref, batch)
                chosen += c.tolist()
                rejected += r.tolist()
        finally:
            self.model.train(was_training)
        logger.info("Precomputed reference log-probs for %d %s pairs", len(chosen), split)
        return dataset.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected)

    # ----------------------------------------------------------------------------- scoring

    def _score(self, model: Any, batch: dict[str, Any], prefix: str = "") -> SequenceScores:
        logits = model(**_model_inputs(batch, prefix), use_cache=False).logits
        return sequence_log_probs(logits, batch[f"{prefix}labels"], batch.get(f"{prefix}position_ids"))

    def _pair_scores(self, model: Any, batch: dict[str, Any]) -> SequenceScores:
        """Scores of the 2B sequences (chosen first): one forward pass, or two with ``concat_forward false``."""
        if self.rlhf.concat_forward:
            return self._score(model, batch)
        n = count_sequences(batch) // 2
        first, second = split_batch(batch, n)
        a, b = self._score(model, first), self._score(model, second)
        return SequenceScores(torch.cat([a.sums, b.sums]), torch.cat([a.counts, b.counts]))

    def _pair_logps(self, model: Any, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        logps = self._pair_scores(model, batch).logps(self.average)
        n = logps.shape[0] // 2
        return logps[:n], logps[n:]

    # ----------------------------------------------------------------------------- losses

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        if self.kind == "rm":
            loss, metrics = self._reward_model_loss(model, inputs)
        elif self.kind == "kto":
            loss, metrics = self._kto_loss(model, inputs)
        else:
            loss, metrics = self._pair_loss(model, inputs)
        self._store("train" if model.training else "eval", metrics)
        return (loss, {}) if return_outputs else loss

    def _pair_loss(self, model: Any, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        scores = self._pair_scores(model, batch)
        logps = scores.logps(self.average)
        n = logps.shape[0] // 2
        pc, pr = logps[:n], logps[n:]
        args, beta = self.rlhf, self.beta
        if self.kind == "dpo":
            if "ref_chosen_logps" in batch:
                rc, rr = batch["ref_chosen_logps"].to(pc.dtype), batch["ref_rejected_logps"].to(pc.dtype)
            else:
                with self._reference(model) as ref:
                    rc, rr = self._pair_logps(ref, batch)
            out = L.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=args.resolved_loss_type,
                             label_smoothing=args.label_smoothing)
        elif self.kind == "cpo":
            out = L.cpo_loss(pc, pr, beta=beta, loss_type=args.resolved_loss_type, label_smoothing=args.label_smoothing)
        elif self.kind == "simpo":
            out = L.simpo_loss(pc, pr, beta=beta, gamma=args.simpo_gamma, label_smoothing=args.label_smoothing)
        elif self.kind == "orpo":
            out = L.orpo_loss(pc, pr, beta=beta)
        else:
            raise ValueError(f"unknown rlhf_type {self.kind!r}")
        loss = out.losses.mean()
        metrics = self._reward_metrics(out.chosen_rewards, out.rejected_rewards)
        metrics.update({"logps/chosen": pc.detach(), "logps/rejected": pr.detach()})
        weight = args.nll_weight
        if weight:
            # token-mean NLL of the chosen replies: the SFT term of RPO, ORPO and CPO
            nll = -scores.sums[:n].sum() / scores.counts[:n].sum().clamp(min=1)
            loss = loss + weight * nll
            metrics["nll_loss"] = nll.detach()[None]
        return loss, metrics

    def _kto_loss(self, model: Any, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        policy = self._score(model, batch).sums
        with torch.no_grad():
            policy_kl = self._score(model, batch, "kl_").sums
        with self._reference(model) as ref:
            ref_logps = self._score(ref, batch).sums
            ref_kl = self._score(ref, batch, "kl_").sums
        kl = L.kto_kl_estimate(policy_kl, ref_kl)
        if self.accelerator.num_processes > 1:  # the paper's estimate is over the whole (global) batch
            kl = self.accelerator.gather(kl[None]).mean()
        desirable = batch["label"]
        losses, rewards = L.kto_loss(policy, ref_logps, desirable, kl, beta=self.beta,
                                     desirable_weight=self.rlhf.desirable_weight,
                                     undesirable_weight=self.rlhf.undesirable_weight)
        metrics = {"rewards/chosen": rewards[desirable], "rewards/rejected": rewards[~desirable],
                   "logps/chosen": policy.detach()[desirable], "logps/rejected": policy.detach()[~desirable],
                   "kl": kl[None]}
        return losses.mean(), metrics

    def _reward_model_loss(self, model: Any, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        rewards = model(**_model_inputs(batch), use_cache=False).logits.squeeze(-1).float()
        n = rewards.shape[0] // 2
        rc, rr = rewards[:n], rewards[n:]
        losses = L.bradley_terry_loss(rc, rr, batch.get("margin"),
                                      center_rewards_coefficient=self.rlhf.center_rewards_coefficient)
        return losses.mean(), self._reward_metrics(rc.detach(), rr.detach())

    @staticmethod
    def _reward_metrics(chosen: Tensor, rejected: Tensor) -> dict[str, Tensor]:
        return {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
                "rewards/accuracies": (chosen > rejected).float()}

    # ----------------------------------------------------------------------------- metrics

    def _store(self, split: str, metrics: dict[str, Tensor]) -> None:
        """Add per-example values to the running means of ``split`` (merged into the next log)."""
        for key, value in metrics.items():
            self.metric_store.add(split, key, value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        split, stored = self.metric_store.pop_into(logs)
        prefix = "eval_" if split == "eval" else ""
        if "rewards/chosen" in stored and "rewards/rejected" in stored and f"{prefix}rewards/margins" not in logs:
            # KTO's chosen and rejected rows are unpaired: the margin is the difference of the means
            logs[f"{prefix}rewards/margins"] = round(stored["rewards/chosen"] - stored["rewards/rejected"], 6)
        super().log(logs, start_time)
