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
from typing import Any

import torch
from torch import Tensor
from transformers import TrainerCallback

from lmforge.rlhf import losses as L
from lmforge.rlhf.metrics import MetricStore
from lmforge.rlhf.scoring import (SequenceScores, TokenLogps, count_sequences, ld_weights, model_inputs,
                                  sequence_log_probs, split_batch, token_log_probs, whole_sequence_labels)

__all__ = ["PreferenceTrainer", "MetricStore", "ReferenceMixin", "mix_reference", "sequence_log_probs"]
from lmforge.trainers.trainer import LmforgeTrainer, LossOnlyEvaluation
from lmforge.utils.distributed import global_sum

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
_model_inputs = model_inputs  # the name the tests and older callers use


def mix_reference(ref_model: Any, policy_weights: Any, alpha: float) -> int:
    """TR-DPO's soft update ``ref <- alpha * policy + (1 - alpha) * ref`` (``alpha = 1``: a hard copy), in place.

    ``policy_weights`` are ``(name, tensor)`` pairs under the reference's own parameter names (for a LoRA
    policy, :func:`lmforge.rlhf.rollout.policy_named_weights` gives the merged weights). Gorbatovski et al.
    2024, "Learn Your Reference Model for Real Good Alignment", eq. 5 (soft) and 6 (hard). Returns the
    number of tensors updated; a policy weight the reference lacks is an error (the two would drift apart).
    """
    params = dict(ref_model.named_parameters())
    n = 0
    with torch.no_grad():
        for name, value in policy_weights:
            if name not in params:
                raise KeyError(f"sync_ref_model: the reference has no parameter {name!r}")
            p = params[name]
            p.mul_(1.0 - alpha).add_(value.to(device=p.device, dtype=p.dtype), alpha=alpha)
            n += 1
    return n


class _SyncReference(TrainerCallback):
    """Calls ``sync()`` every ``every`` optimizer steps."""

    def __init__(self, sync: Any, every: int):
        self.sync, self.every = sync, every

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any):
        if state.global_step % self.every == 0:
            self.sync()


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

    def _setup_reference_sync(self) -> None:
        """``--sync_ref_model``: a callback that moves the reference towards the policy (TR-DPO)."""
        args = self.rlhf
        if not getattr(args, "sync_ref_model", False):
            return
        if self.ref_model is None:
            raise ValueError("--sync_ref_model needs a reference model apart from the policy (--ref_model, or the "
                             "frozen copy rlhf_main makes); LoRA's adapters-off reference cannot move")
        self.add_callback(_SyncReference(self.sync_reference, args.ref_model_sync_steps))

    def sync_reference(self) -> None:
        from lmforge.rlhf.rollout import policy_named_weights

        n = mix_reference(self.ref_model, policy_named_weights(self.accelerator.unwrap_model(self.model)),
                          self.rlhf.ref_model_mixup_alpha)
        logger.info("sync_ref_model: reference <- %.3g x policy + %.3g x reference (%d tensors) at step %d",
                    self.rlhf.ref_model_mixup_alpha, 1 - self.rlhf.ref_model_mixup_alpha, n, self.state.global_step)

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
        self.metric_store = MetricStore(self.accelerator.device)
        if callable(ref_model) and not isinstance(ref_model, torch.nn.Module):
            ref_model = ref_model()
        self._set_reference(ref_model)
        precompute = self.rlhf.precompute_ref_log_probs
        if self.rlhf.needs_reference and ref_model is None and not precompute and not self._has_adapters():
            raise ValueError(f"rlhf_type {self.kind} needs a reference model: pass --ref_model, train with LoRA "
                             "(the adapters are switched off for the reference), or use --precompute_ref_log_probs")
        self._bco_stats = torch.zeros(2, dtype=torch.float64)  # bco_pair: sum and count of the rewards seen
        self._setup_reference_sync()
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

    def _score(self, model: Any, batch: dict[str, Any], prefix: str = "", whole: bool = False
               ) -> tuple[TokenLogps, TokenLogps | None]:
        """Labelled-token log-probs of ``batch``'s sequences and, with ``whole``, of every real token (one pass)."""
        logits = model(**model_inputs(batch, prefix), use_cache=False).logits
        pos = batch.get(f"{prefix}position_ids")
        tokens = token_log_probs(logits, batch[f"{prefix}labels"], pos)
        return tokens, token_log_probs(logits, whole_sequence_labels(batch, prefix), pos) if whole else None

    def _pair_scores(self, model: Any, batch: dict[str, Any], whole: bool = False
                     ) -> tuple[SequenceScores, SequenceScores, SequenceScores | None]:
        """(scores, LD-weighted scores, whole-sequence scores or None) of the 2B sequences (chosen first): one
        forward pass, or two with ``concat_forward false``. Without ``--ld_alpha`` the first two are the same."""
        if self.rlhf.concat_forward:
            tokens, full = self._score(model, batch, whole=whole)
        else:
            first, second = split_batch(batch, count_sequences(batch) // 2)
            (ta, fa), (tb, fb) = self._score(model, first, whole=whole), self._score(model, second, whole=whole)
            tokens = TokenLogps.cat(ta, tb)
            full = TokenLogps.cat(fa, fb) if whole else None
        scores = tokens.scores()
        alpha = getattr(self.rlhf, "ld_alpha", None)
        weighted = tokens.scores(ld_weights(tokens, tokens.n // 2, alpha)) if alpha is not None else scores
        return scores, weighted, full.scores() if full is not None else None

    def _pair_logps(self, model: Any, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Chosen and rejected log-probs of the main loss variant's kind (summed, LD-weighted or averaged)."""
        _, weighted, _ = self._pair_scores(model, batch)
        logps = weighted.logps(self.average)
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
        args, beta = self.rlhf, self.beta
        whole = self.kind == "orpo" and args.orpo_prompt_loss
        scores, weighted, full = self._pair_scores(model, batch, whole=whole)
        n = scores.sums.shape[0] // 2

        def halves(x: Tensor) -> tuple[Tensor, Tensor]:
            return x[:n], x[n:]

        types = args.resolved_loss_types if self.kind in ("dpo", "cpo") else [self.kind]
        weights = args.resolved_loss_weights if self.kind in ("dpo", "cpo") else [1.0]
        ref = None
        if self.kind == "dpo":
            if "ref_chosen_logps" in batch:  # precomputed: one kind of log-prob, the main variant's (args check)
                rc, rr = batch["ref_chosen_logps"].float(), batch["ref_rejected_logps"].float()
                ref = {self.average: (rc, rr)}
            else:
                with self._reference(model) as ref_model:
                    _, ref_weighted, _ = self._pair_scores(ref_model, batch)
                ref = {avg: halves(ref_weighted.logps(avg)) for avg in (False, True)}
        loss = torch.zeros((), device=scores.sums.device)
        metrics: dict[str, Tensor] = {}
        main = None
        for loss_type, w in zip(types, weights):
            if loss_type == "sft":
                continue  # added with the other NLL terms below
            avg = args.averages(loss_type)
            pc, pr = halves(weighted.logps(avg))
            if self.kind == "dpo":
                rc, rr = ref[avg]
                out = L.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=args.label_smoothing,
                                 bco_delta=self._bco_delta(pc - rc, pr - rr) if loss_type == "bco_pair" else 0.0,
                                 discopop_tau=args.discopop_tau)
            elif self.kind == "cpo":
                out = L.cpo_loss(pc, pr, beta=beta, loss_type=loss_type, label_smoothing=args.label_smoothing)
            elif self.kind == "simpo":
                out = L.simpo_loss(pc, pr, beta=beta, gamma=args.simpo_gamma, label_smoothing=args.label_smoothing)
            elif self.kind == "orpo":
                out = L.orpo_loss(pc, pr, beta=beta)
            else:
                raise ValueError(f"unknown rlhf_type {self.kind!r}")
            term = out.losses.mean()
            loss = loss + w * term
            if main is None:
                main = (out, pc, pr)
            if len(types) > 1:
                metrics[f"loss/{loss_type}"] = term.detach()[None]
        out, pc, pr = main
        metrics.update(self._reward_metrics(out.chosen_rewards, out.rejected_rewards))
        metrics.update({"logps/chosen": pc.detach(), "logps/rejected": pr.detach()})
        nll_weight = args.nll_weight + sum(w for t, w in zip(types, weights) if t == "sft")
        if nll_weight:
            # token-mean NLL of the chosen sequences: the SFT term of RPO, ORPO, CPO and the sft loss type;
            # ORPO's covers the prompt too unless --orpo_prompt_loss false (see RlhfArguments)
            own = full if full is not None else scores
            nll = -own.sums[:n].sum() / own.counts[:n].sum().clamp(min=1)
            loss = loss + nll_weight * nll
            metrics["nll_loss"] = nll.detach()[None]
        return loss, metrics

    def _bco_delta(self, chosen_logratios: Tensor, rejected_logratios: Tensor) -> float:
        """BCO's reward shift: the running mean of every implicit reward seen in training so far, on every process
        (this batch's included, so the first batch is centred on itself)."""
        rewards = self.beta * torch.cat([chosen_logratios, rejected_logratios]).detach().float()
        if self.model.training:
            stat = global_sum(torch.stack([rewards.sum(), torch.tensor(float(rewards.numel()),
                                                                       device=rewards.device)]).double())
            self._bco_stats = self._bco_stats + stat.cpu()
        total, count = self._bco_stats.tolist()
        return total / count if count else 0.0

    def _kto_loss(self, model: Any, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        policy = self._score(model, batch)[0].scores().sums
        with torch.no_grad():
            policy_kl = self._score(model, batch, "kl_")[0].scores().sums
        with self._reference(model) as ref:
            ref_logps = self._score(ref, batch)[0].scores().sums
            ref_kl = self._score(ref, batch, "kl_")[0].scores().sums
        kl = L.kto_kl_estimate(policy_kl, ref_kl)  # mean over every process's rows, then clamped at 0
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
