"""Arguments of ``lmforge rlhf``: preference training (dpo, kto, orpo, simpo, cpo), reward models (rm)
and online RL (grpo), and of ``lmforge rollout`` (the generation server GRPO can pull samples from).

Everything ``sft`` takes (model, dataset, template, tuner, packing, ...) works the same; the
fields below choose the objective.

``--loss_type`` means the *objective's variant* here, not the token loss of ``sft``'s ``LOSSES``
registry: the preference-loss variant for dpo/cpo (``sigmoid``, ``ipo``, ``hinge``, ...), stored as
``pref_loss_type``, and the token aggregation for grpo (``grpo``, ``bnpo``, ``dr_grpo``), stored as
``grpo_loss_type``. ``loss_type`` is then cleared, so the shared training code never looks
``sigmoid`` up as a token loss and ``args.json`` records the variant under one unambiguous name.
The SFT terms of ``--rpo_alpha``, ORPO and CPO are plain token cross-entropy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from lmforge.arguments.base import ArgumentError, field
from lmforge.arguments.infer import DeployArguments
from lmforge.arguments.sample import RewardArguments
from lmforge.arguments.train import TrainArguments

RLHF_TYPES = ("dpo", "kto", "orpo", "simpo", "cpo", "rm", "grpo")
# kept here (not imported from lmforge.rlhf.losses) so that parsing flags imports no torch
DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "sppo_hard", "apo_zero", "apo_down")
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")
# beta when the user leaves it unset: the papers' recommended values (GRPO: DeepSeekMath's 0.04)
DEFAULT_BETA = {"dpo": 0.1, "kto": 0.1, "orpo": 0.1, "simpo": 2.0, "cpo": 0.1, "grpo": 0.04}


@dataclass
class GrpoArguments:
    """GRPO: rollouts, rewards and the clipped objective (rlhf_type grpo)."""

    num_generations: int = field(8, "grpo: samples per prompt (the group G); per_device_train_batch_size counts "
                                    "prompts, so a micro-batch trains on batch x G completions")
    max_completion_length: int = field(512, "grpo: most tokens generated per reply (per turn)")
    temperature: float = field(1.0, "grpo: rollout sampling temperature")
    top_p: float = field(1.0, "grpo: rollout nucleus sampling mass")
    top_k: int = field(-1, "grpo: rollout top-k (-1: all)")
    repetition_penalty: float = field(1.0, "grpo: rollout repetition penalty")
    epsilon: float = field(0.2, "grpo: clip range of the ratio, 1 - epsilon .. 1 + epsilon_high")
    epsilon_high: Optional[float] = field(None, "grpo: upper clip (DAPO clip-higher, e.g. 0.28); default epsilon")
    scale_rewards: Literal["group", "batch", "none"] = field(
        "group", "grpo: divide advantages by the group's reward std, the batch's, or not at all (Dr. GRPO)")
    grpo_loss_type: Optional[str] = field(
        None, "grpo: token aggregation: grpo (per-sequence mean), bnpo (per-token mean over the batch), "
              "dr_grpo (sum / (batch x max_completion_length)); default grpo. --loss_type sets the same thing")
    num_iterations: int = field(1, "grpo: optimizer updates per batch of rollouts (mu); >1 keeps the sampling "
                                   "policy's log-probs for the clipped ratio")
    dynamic_sample: bool = field(False, "grpo: drop groups whose rewards are all equal and sample more prompts "
                                        "to refill the batch (DAPO dynamic sampling)")
    max_resample_times: int = field(3, "grpo: with dynamic_sample, most extra rounds of prompts per micro-batch")
    infer_backend: Literal["hf", "native"] = field(
        "hf", "grpo: rollout engine in this process: hf (any device, shares the training weights) or native (CUDA)")
    rollout_url: Optional[str] = field(None, "grpo: sample from a `lmforge rollout` server at this URL instead; "
                                             "weights are pushed to it after each optimizer step")
    rollout_api_key: Optional[str] = field(None, "grpo: API key of the rollout server")
    rollout_batch_size: Optional[int] = field(None, "grpo: most sequences the engine generates at once "
                                                    "(default: a whole micro-batch)")
    rollout_gpu_memory_utilization: float = field(0.3, "grpo: GPU memory fraction of a native rollout engine "
                                                       "(it shares the GPU with training)")
    multi_turn_scheduler: Optional[str] = field(None, "grpo: multi-turn rollouts with this scheduler (e.g. "
                                                      "tool_call, or yours)")
    max_turns: int = field(3, "grpo: most model turns per multi-turn trajectory")
    multi_turn_kwargs: dict = field(default_factory=dict, help="grpo: settings of the multi-turn scheduler as JSON")
    log_completions: bool = field(False, "grpo: append each logged step's first group (prompt, replies, rewards) "
                                         "to completions.jsonl in the output folder")


@dataclass
class RlhfArguments(TrainArguments, GrpoArguments, RewardArguments):
    """Preference and RL training: lmforge rlhf --rlhf_type dpo|grpo|... --model M --dataset D."""

    rlhf_type: Literal["dpo", "kto", "orpo", "simpo", "cpo", "rm", "grpo"] = field("dpo", "the objective")
    loss_type: Optional[str] = field(None, "for rlhf: the dpo/cpo loss variant (stored as pref_loss_type) or the "
                                           "grpo aggregation (stored as grpo_loss_type)")
    beta: Optional[float] = field(None, "strength of the preference term: DPO/KTO/CPO beta, ORPO lambda, SimPO "
                                        "beta, GRPO KL coefficient (0: no reference model); default 0.1 (SimPO 2.0, "
                                        "GRPO 0.04)")
    pref_loss_type: Optional[str] = field(
        None, "dpo: sigmoid, robust, hinge, ipo, exo_pair, nca_pair, sppo_hard, apo_zero, apo_down; cpo: sigmoid, "
              "hinge, ipo (default sigmoid). --loss_type sets the same thing")
    label_smoothing: float = field(0.0, "assumed label-flip rate (conservative/robust DPO, CPO, SimPO; EXO's epsilon)")
    rpo_alpha: Optional[float] = field(None, "dpo: add rpo_alpha x the NLL of the chosen reply (RPO)")
    ref_model: Optional[str] = field(None, "reference model (dpo, kto, grpo); default: the starting model, via disabled "
                                           "adapters for lora/dora/qlora or a frozen copy for full/freeze")
    precompute_ref_log_probs: bool = field(False, "dpo: score the data with the reference once before training, "
                                                  "then free it")
    concat_forward: bool = field(True, "chosen and rejected in one forward pass (false: two, lower peak memory)")
    desirable_weight: float = field(1.0, "kto: lambda_D, weight of desirable (label true) rows")
    undesirable_weight: float = field(1.0, "kto: lambda_U, weight of undesirable (label false) rows")
    simpo_gamma: float = field(1.0, "simpo: target reward margin gamma")
    cpo_alpha: Optional[float] = field(None, "cpo/simpo: weight of the NLL term on the chosen reply; default 1 for "
                                             "cpo, 0 for simpo (>0 gives CPO-SimPO)")
    center_rewards_coefficient: float = field(0.0, "rm: weight of (r_chosen + r_rejected)^2, keeps rewards centred")

    def __post_init__(self) -> None:
        if self.rlhf_type == "grpo":
            self._check_grpo()
            return
        if self.loss_type is not None:  # the flag users know; see the module docstring
            if self.pref_loss_type not in (None, self.loss_type):
                raise ArgumentError(f"--loss_type {self.loss_type!r} and --pref_loss_type {self.pref_loss_type!r} "
                                    "disagree (for rlhf they are the same setting)")
            self.pref_loss_type, self.loss_type = self.loss_type, None
        allowed = {"dpo": DPO_LOSS_TYPES, "cpo": CPO_LOSS_TYPES}.get(self.rlhf_type, ())
        if self.pref_loss_type is not None and self.pref_loss_type not in allowed:
            if not allowed:
                raise ArgumentError(f"--loss_type {self.pref_loss_type!r}: rlhf_type {self.rlhf_type} has no loss "
                                    "variants (they exist for dpo and cpo)")
            raise ArgumentError(f"--loss_type for rlhf_type {self.rlhf_type} must be one of {', '.join(allowed)}; "
                                f"got {self.pref_loss_type!r}")
        if self.precompute_ref_log_probs and self.rlhf_type != "dpo":
            raise ArgumentError("--precompute_ref_log_probs is for rlhf_type dpo (kto's reference point needs the "
                                "reference on every batch; orpo/simpo/cpo/rm have no reference)")
        if self.ref_model and self.rlhf_type not in ("dpo", "kto", "grpo"):
            raise ArgumentError(f"--ref_model: rlhf_type {self.rlhf_type} uses no reference model")
        if self.rpo_alpha is not None and self.rlhf_type != "dpo":
            raise ArgumentError("--rpo_alpha is for rlhf_type dpo (orpo and cpo have their own NLL term)")

    def _check_grpo(self) -> None:
        if self.loss_type is not None:  # --loss_type is the aggregation for grpo; see the module docstring
            if self.grpo_loss_type not in (None, self.loss_type):
                raise ArgumentError(f"--loss_type {self.loss_type!r} and --grpo_loss_type {self.grpo_loss_type!r} "
                                    "disagree (for grpo they are the same setting)")
            self.grpo_loss_type, self.loss_type = self.loss_type, None
        if self.grpo_loss_type is not None and self.grpo_loss_type not in GRPO_LOSS_TYPES:
            raise ArgumentError(f"--grpo_loss_type must be one of {', '.join(GRPO_LOSS_TYPES)}; "
                                f"got {self.grpo_loss_type!r}")
        if self.pref_loss_type is not None:
            raise ArgumentError("--pref_loss_type is for dpo/cpo; grpo's variants are --grpo_loss_type")
        if self.num_generations < 2:
            raise ArgumentError(f"--num_generations must be >= 2 for grpo (advantages are relative to the group), "
                                f"got {self.num_generations}")
        if self.max_completion_length < 1:
            raise ArgumentError(f"--max_completion_length must be >= 1, got {self.max_completion_length}")
        if self.num_iterations < 1:
            raise ArgumentError(f"--num_iterations must be >= 1, got {self.num_iterations}")
        if not 0 < self.epsilon < 1 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            raise ArgumentError(f"--epsilon must be in (0, 1) and --epsilon_high > 0; got {self.epsilon}, "
                                f"{self.epsilon_high}")
        if self.beta is not None and self.beta < 0:
            raise ArgumentError(f"--beta must be >= 0 for grpo, got {self.beta}")
        if self.max_turns < 1:
            raise ArgumentError(f"--max_turns must be >= 1, got {self.max_turns}")
        if self.precompute_ref_log_probs:
            raise ArgumentError("--precompute_ref_log_probs is for rlhf_type dpo (grpo's completions are sampled "
                                "during training)")
        if self.rollout_url and self.infer_backend != "hf":
            raise ArgumentError("--rollout_url and --infer_backend native are two different rollout engines; "
                                "pick one")
        if self.ref_model and self.resolved_beta == 0:
            raise ArgumentError("--ref_model with --beta 0: grpo uses the reference only for its KL term")
        self.check_rewards(required=True)

    # ---- values with per-objective defaults (resolved here so every reader agrees)

    @property
    def resolved_beta(self) -> float:
        return self.beta if self.beta is not None else DEFAULT_BETA.get(self.rlhf_type, 0.1)

    @property
    def resolved_loss_type(self) -> str:
        return self.pref_loss_type or "sigmoid"

    @property
    def nll_weight(self) -> float:
        """Weight of the chosen reply's NLL added to the preference loss."""
        if self.rlhf_type == "dpo":
            return self.rpo_alpha or 0.0
        if self.rlhf_type == "orpo":
            return 1.0
        if self.rlhf_type in ("cpo", "simpo"):
            return self.cpo_alpha if self.cpo_alpha is not None else (1.0 if self.rlhf_type == "cpo" else 0.0)
        return 0.0

    @property
    def needs_reference(self) -> bool:
        return self.rlhf_type in ("dpo", "kto") or (self.rlhf_type == "grpo" and self.resolved_beta > 0)

    @property
    def resolved_grpo_loss_type(self) -> str:
        return self.grpo_loss_type or "grpo"

    @property
    def average_log_probs(self) -> bool:
        """Length-averaged log-probs where the paper defines the objective on them (SimPO, ORPO, IPO)."""
        return self.rlhf_type in ("simpo", "orpo") or (self.rlhf_type == "dpo" and self.resolved_loss_type == "ipo")


@dataclass
class RolloutArguments(DeployArguments):
    """Generation server for RL: lmforge rollout --model M [--infer_backend native]; a trainer started with
    --rollout_url pushes its weights here and pulls samples (token ids in and out)."""

    port: int = field(8001, "port to listen on")
    max_weights_request_bytes: int = field(1024 ** 3, "largest weight-update body accepted (the trainer sends "
                                                      "safetensors chunks of at most 256 MiB)")
