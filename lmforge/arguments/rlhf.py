"""Arguments of ``lmforge rlhf``: preference training (dpo, kto, orpo, simpo, cpo), reward models (rm)
and online RL (grpo), and of ``lmforge rollout`` (the generation server GRPO can pull samples from).

Everything ``sft`` takes (model, dataset, template, tuner, packing, ...) works the same; the
fields below choose the objective.

``--loss_type`` means the *objective's variant* here, not the token loss of ``sft``'s ``LOSSES``
registry: the preference-loss variant(s) for dpo/cpo (``sigmoid``, ``ipo``, ``hinge``, ...; dpo takes
several, mixed with ``--loss_weights``), stored as ``pref_loss_type``, and the GRPO objective
(``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``cispo``, ``sapo``), stored as ``grpo_loss_type``.
``loss_type`` is then cleared, so the shared training code never looks
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

RLHF_TYPES = ("dpo", "kto", "orpo", "simpo", "cpo", "rm", "grpo", "gkd")
# kept here (not imported from lmforge.rlhf.losses / grpo) so that parsing flags imports no torch
DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "sppo_hard", "apo_zero", "apo_down",
                  "sigmoid_norm", "bco_pair", "aot", "aot_pair", "discopop")
AVERAGED_LOSS_TYPES = ("ipo", "sigmoid_norm")  # defined on length-averaged log-probs
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
# beta when the user leaves it unset: the papers' recommended values (GRPO: DeepSeekMath's 0.04; GKD: the
# balanced JSD of Agarwal et al.)
DEFAULT_BETA = {"dpo": 0.1, "kto": 0.1, "orpo": 0.1, "simpo": 2.0, "cpo": 0.1, "grpo": 0.04, "gkd": 0.5}


@dataclass
class GrpoArguments:
    """GRPO: rollouts, rewards and the clipped objective (rlhf_type grpo)."""

    num_generations: int = field(8, "grpo: samples per prompt (the group G); per_device_train_batch_size counts "
                                    "prompts, so a micro-batch trains on batch x G completions")
    max_completion_length: int = field(512, "grpo/gkd: most tokens generated per reply (per turn)")
    temperature: float = field(1.0, "grpo/gkd: sampling temperature (gkd: also of both distributions in the JSD)")
    top_p: float = field(1.0, "grpo: rollout nucleus sampling mass")
    top_k: int = field(-1, "grpo: rollout top-k (-1: all)")
    repetition_penalty: float = field(1.0, "grpo: rollout repetition penalty")
    epsilon: float = field(0.2, "grpo: clip range of the ratio, 1 - epsilon .. 1 + epsilon_high")
    epsilon_high: Optional[float] = field(None, "grpo: upper clip (DAPO clip-higher, e.g. 0.28); default epsilon")
    delta: Optional[float] = field(None, "grpo: two-sided clipping: also cap the ratio at delta where the advantage "
                                         "is negative (must exceed 1 + epsilon_high; e.g. 4)")
    scale_rewards: Literal["group", "batch", "none"] = field(
        "group", "grpo: divide advantages by the group's reward std, the batch's, or not at all (Dr. GRPO)")
    reward_aggregation: Literal["sum", "normalize_then_sum"] = field(
        "sum", "grpo: several rewards: weighted sum then one advantage (sum), or each reward's own group advantage "
               "then their weighted sum (normalize_then_sum), so a reward with a small range still counts")
    grpo_loss_type: Optional[str] = field(
        None, "grpo: grpo (per-sequence mean), bnpo (token mean of the micro-batch), dr_grpo (sum / (batch x "
              "max_completion_length)), dapo (token mean of the whole optimizer step over every process), cispo "
              "(clipped IS weight on the log-prob, token mean like dapo), sapo (soft gate instead of the clip); "
              "default grpo. --loss_type sets the same thing")
    importance_sampling_level: Literal["token", "sequence"] = field(
        "token", "grpo: ratio per token, or per sequence (GSPO: the length-normalised sequence ratio; use a small "
                 "epsilon such as 3e-4 / epsilon_high 4e-4)")
    sapo_temperature_pos: float = field(1.0, "grpo sapo: gate temperature where the advantage is positive")
    sapo_temperature_neg: float = field(1.05, "grpo sapo: gate temperature where the advantage is negative")
    mask_truncated_completions: bool = field(False, "grpo: completions cut at max_completion_length do not train")
    top_entropy_quantile: float = field(1.0, "grpo: train only on the tokens whose entropy is in this top fraction "
                                             "of the micro-batch (over every process); 1: all tokens, 0.2: the top fifth")
    off_policy_mask_threshold: Optional[float] = field(
        None, "grpo: drop completions with a negative advantage whose mean log-ratio log(pi_old / pi) exceeds this "
              "(off-policy sequence masking)")
    async_generate: bool = field(False, "grpo: generate the next step's rollouts while this step trains, on an "
                                        "engine with its own weights (native, a rollout server, or for hf a copy of "
                                        "the policy); the one-step lag is corrected by importance sampling with the "
                                        "engine's log-probs (temperature 1)")
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
class GkdArguments:
    """Generalised knowledge distillation (rlhf_type gkd): the student learns the teacher's token distributions."""

    teacher_model: Optional[str] = field(None, "gkd: the teacher (a checkpoint or hub id with the student's "
                                               "tokenizer); the student samples with --temperature and "
                                               "--max_completion_length")
    lmbda: float = field(0.5, "gkd: fraction of micro-batches whose completions the student samples itself "
                              "(on-policy); the rest use the dataset's replies (or the teacher's, --seq_kd)")
    seq_kd: bool = field(False, "gkd: off-policy micro-batches use replies the teacher samples instead of the "
                                "dataset's (sequence-level KD)")


@dataclass
class RlhfArguments(TrainArguments, GrpoArguments, GkdArguments, RewardArguments):
    """Preference and RL training: lmforge rlhf --rlhf_type dpo|grpo|gkd|... --model M --dataset D."""

    rlhf_type: Literal["dpo", "kto", "orpo", "simpo", "cpo", "rm", "grpo", "gkd"] = field("dpo", "the objective")
    loss_type: Optional[list[str]] = field(
        None, "for rlhf: the dpo/cpo loss variant(s) (stored as pref_loss_type) or the grpo objective (stored as "
              "grpo_loss_type)")
    beta: Optional[float] = field(None, "strength of the preference term: DPO/KTO/CPO beta, ORPO lambda, SimPO "
                                        "beta, GRPO KL coefficient (0: no reference model), GKD's JSD interpolation "
                                        "(0: forward KL, 1: reverse KL); default 0.1 (SimPO 2.0, GRPO 0.04, GKD 0.5)")
    pref_loss_type: Optional[list[str]] = field(
        None, "dpo: sigmoid, robust, hinge, ipo, exo_pair, nca_pair, sppo_hard, apo_zero, apo_down, sigmoid_norm, "
              "bco_pair, aot, aot_pair, discopop, and sft (the chosen reply's NLL), several mixed with "
              "--loss_weights; cpo: sigmoid, hinge, ipo (default sigmoid). --loss_type sets the same thing")
    loss_weights: list[float] = field(default_factory=list, help="dpo: one weight per --loss_type (default all 1)")
    label_smoothing: float = field(0.0, "assumed label-flip rate (conservative/robust DPO, CPO, SimPO, AOT; EXO's "
                                        "epsilon)")
    rpo_alpha: Optional[float] = field(None, "dpo: add rpo_alpha x the NLL of the chosen reply (RPO)")
    ld_alpha: Optional[float] = field(None, "dpo: LD-DPO: tokens past the shorter reply's length count alpha times "
                                            "in each reply's log-prob (0..1; 1 is plain DPO)")
    discopop_tau: float = field(0.05, "dpo discopop: temperature of the log-ratio modulation")
    ref_model: Optional[str] = field(None, "reference model (dpo, kto, grpo); default: the starting model, via disabled "
                                           "adapters for lora/dora/qlora or a frozen copy for full/freeze")
    sync_ref_model: bool = field(False, "dpo/grpo: move the reference towards the policy every ref_model_sync_steps "
                                        "(TR-DPO); needs a reference model apart from the policy (not LoRA's "
                                        "adapters-off reference)")
    ref_model_mixup_alpha: float = field(0.6, "sync_ref_model: ref <- alpha x policy + (1 - alpha) x ref (1: copy)")
    ref_model_sync_steps: int = field(512, "sync_ref_model: optimizer steps between two updates of the reference")
    precompute_ref_log_probs: bool = field(False, "dpo: score the data with the reference once before training, "
                                                  "then free it")
    concat_forward: bool = field(True, "chosen and rejected in one forward pass (false: two, lower peak memory)")
    desirable_weight: float = field(1.0, "kto: lambda_D, weight of desirable (label true) rows")
    undesirable_weight: float = field(1.0, "kto: lambda_U, weight of undesirable (label false) rows")
    simpo_gamma: float = field(1.0, "simpo: target reward margin gamma")
    cpo_alpha: Optional[float] = field(None, "cpo/simpo: weight of the NLL term on the chosen reply; default 1 for "
                                             "cpo, 0 for simpo (>0 gives CPO-SimPO)")
    orpo_prompt_loss: bool = field(True, "orpo: the NLL term covers the prompt and the reply, as the ORPO authors' "
                                         "implementation does by default (false: the reply only, as TRL does)")
    center_rewards_coefficient: float = field(0.0, "rm: weight of (r_chosen + r_rejected)^2, keeps rewards centred")

    def __post_init__(self) -> None:
        if isinstance(self.loss_type, str):  # Python callers may pass one name
            self.loss_type = [self.loss_type]
        if isinstance(self.pref_loss_type, str):  # and args.json written before mixes existed holds one
            self.pref_loss_type = [self.pref_loss_type]
        if self.rlhf_type == "grpo":
            self._check_grpo()
            return
        if self.rlhf_type == "gkd":
            self._check_gkd()
            return
        if self.loss_type is not None:  # the flag users know; see the module docstring
            if self.pref_loss_type not in (None, self.loss_type):
                raise ArgumentError(f"--loss_type {self.loss_type!r} and --pref_loss_type {self.pref_loss_type!r} "
                                    "disagree (for rlhf they are the same setting)")
            self.pref_loss_type, self.loss_type = self.loss_type, None
        allowed = {"dpo": DPO_LOSS_TYPES + ("sft",), "cpo": CPO_LOSS_TYPES}.get(self.rlhf_type, ())
        for name in self.pref_loss_type or ():
            if name not in allowed:
                if not allowed:
                    raise ArgumentError(f"--loss_type {name!r}: rlhf_type {self.rlhf_type} has no loss variants "
                                        "(they exist for dpo and cpo)")
                raise ArgumentError(f"--loss_type for rlhf_type {self.rlhf_type} must be one of {', '.join(allowed)}; "
                                    f"got {name!r}")
        types = self.pref_loss_type or []
        if len(types) > 1 and self.rlhf_type != "dpo":
            raise ArgumentError("several --loss_type values (a mix) are for rlhf_type dpo")
        if len(set(types)) != len(types):
            raise ArgumentError(f"--loss_type names a variant twice: {types}")
        if types == ["sft"]:
            raise ArgumentError("--loss_type sft alone is supervised fine-tuning: mix it with a preference loss "
                                "(--loss_type sigmoid sft --loss_weights 1 0.5) or use lmforge sft")
        if self.loss_weights and len(self.loss_weights) != len(types or ["sigmoid"]):
            raise ArgumentError(f"--loss_weights has {len(self.loss_weights)} values for the {len(types or [1])} "
                                f"--loss_type values {types or ['sigmoid']}")
        if self.ld_alpha is not None and (self.rlhf_type != "dpo" or not 0.0 <= self.ld_alpha <= 1.0):
            raise ArgumentError(f"--ld_alpha is for rlhf_type dpo and must be in [0, 1]; got {self.ld_alpha}")
        if self.discopop_tau <= 0:
            raise ArgumentError(f"--discopop_tau must be > 0, got {self.discopop_tau}")
        if self.precompute_ref_log_probs and self.rlhf_type != "dpo":
            raise ArgumentError("--precompute_ref_log_probs is for rlhf_type dpo (kto's reference point needs the "
                                "reference on every batch; orpo/simpo/cpo/rm have no reference)")
        if self.precompute_ref_log_probs and len({self.averages(t) for t in types if t != "sft"}) > 1:
            raise ArgumentError(f"--precompute_ref_log_probs stores one kind of log-prob; the mix {types} needs summed "
                                f"and length-averaged ones ({', '.join(AVERAGED_LOSS_TYPES)} average)")
        if self.precompute_ref_log_probs and self.sync_ref_model:
            raise ArgumentError("--precompute_ref_log_probs with --sync_ref_model: a reference that moves cannot be "
                                "scored once before training")
        if self.ref_model and self.rlhf_type not in ("dpo", "kto", "grpo"):
            raise ArgumentError(f"--ref_model: rlhf_type {self.rlhf_type} uses no reference model")
        if self.rpo_alpha is not None and self.rlhf_type != "dpo":
            raise ArgumentError("--rpo_alpha is for rlhf_type dpo (orpo and cpo have their own NLL term)")
        self._check_sync_ref()

    def _check_sync_ref(self) -> None:
        if not self.sync_ref_model:
            return
        if self.rlhf_type not in ("dpo", "grpo"):
            raise ArgumentError(f"--sync_ref_model is for rlhf_type dpo and grpo, not {self.rlhf_type}")
        if not 0.0 < self.ref_model_mixup_alpha <= 1.0:
            raise ArgumentError(f"--ref_model_mixup_alpha must be in (0, 1], got {self.ref_model_mixup_alpha}")
        if self.ref_model_sync_steps < 1:
            raise ArgumentError(f"--ref_model_sync_steps must be >= 1, got {self.ref_model_sync_steps}")

    def _check_gkd(self) -> None:
        if not self.teacher_model:
            raise ArgumentError("rlhf_type gkd needs --teacher_model (a checkpoint with the student's tokenizer)")
        if self.loss_type is not None or self.pref_loss_type is not None:
            raise ArgumentError("--loss_type: rlhf_type gkd has one loss (the generalised JSD; --beta interpolates)")
        if not 0.0 <= self.lmbda <= 1.0:
            raise ArgumentError(f"--lmbda must be in [0, 1], got {self.lmbda}")
        if self.beta is not None and not 0.0 <= self.beta <= 1.0:
            raise ArgumentError(f"--beta must be in [0, 1] for gkd (0: forward KL, 1: reverse KL), got {self.beta}")
        if self.max_completion_length < 1:
            raise ArgumentError(f"--max_completion_length must be >= 1, got {self.max_completion_length}")
        if self.temperature <= 0:
            raise ArgumentError(f"--temperature must be > 0 for gkd (the student samples), got {self.temperature}")
        if self.ref_model or self.precompute_ref_log_probs or self.sync_ref_model:
            raise ArgumentError("rlhf_type gkd has a teacher (--teacher_model), not a reference model")
        if self.infer_backend != "hf" or self.rollout_url:
            raise ArgumentError("rlhf_type gkd samples with the hf engine on the student itself (no --infer_backend "
                                "native, no --rollout_url)")

    def _check_grpo(self) -> None:
        if self.loss_type is not None:  # --loss_type is the objective for grpo; see the module docstring
            if len(self.loss_type) != 1:
                raise ArgumentError(f"--loss_type for grpo is one objective, got {self.loss_type}")
            if self.grpo_loss_type not in (None, self.loss_type[0]):
                raise ArgumentError(f"--loss_type {self.loss_type[0]!r} and --grpo_loss_type {self.grpo_loss_type!r} "
                                    "disagree (for grpo they are the same setting)")
            self.grpo_loss_type, self.loss_type = self.loss_type[0], None
        if self.grpo_loss_type is not None and self.grpo_loss_type not in GRPO_LOSS_TYPES:
            raise ArgumentError(f"--grpo_loss_type must be one of {', '.join(GRPO_LOSS_TYPES)}; "
                                f"got {self.grpo_loss_type!r}")
        if self.pref_loss_type is not None or self.loss_weights:
            raise ArgumentError("--pref_loss_type/--loss_weights are for dpo/cpo; grpo's variants are --grpo_loss_type")
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
        high = 1 + (self.epsilon_high if self.epsilon_high is not None else self.epsilon)
        if self.delta is not None and self.delta <= high:
            raise ArgumentError(f"--delta ({self.delta}) must exceed 1 + epsilon_high ({high:g}): it caps the ratio "
                                "only where the clip does not")
        if not 0.0 < self.top_entropy_quantile <= 1.0:
            raise ArgumentError(f"--top_entropy_quantile must be in (0, 1], got {self.top_entropy_quantile}")
        if self.off_policy_mask_threshold is not None and self.off_policy_mask_threshold < 0:
            raise ArgumentError(f"--off_policy_mask_threshold must be >= 0, got {self.off_policy_mask_threshold}")
        if min(self.sapo_temperature_pos, self.sapo_temperature_neg) <= 0:
            raise ArgumentError("--sapo_temperature_pos and --sapo_temperature_neg must be > 0")
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
        if self.sync_ref_model and self.resolved_beta == 0:
            raise ArgumentError("--sync_ref_model with --beta 0: grpo uses the reference only for its KL term")
        if self.async_generate and self.multi_turn_scheduler:
            raise ArgumentError("--async_generate works with single-turn rollouts (no --multi_turn_scheduler)")
        if self.async_generate and self.temperature != 1.0:
            raise ArgumentError("--async_generate takes the behaviour policy's log-probs from the engine, which "
                                "reports them at temperature 1: use --temperature 1 with it")
        if self.async_generate and self.num_iterations > 1:
            raise ArgumentError("--async_generate with --num_iterations > 1: the repeated steps would sample again "
                                "instead of reusing their rollouts; pick one")
        if self.async_generate and self.dynamic_sample:
            raise ArgumentError("--async_generate with --dynamic_sample: refilling a batch would wait for the engine "
                                "the overlap is meant to free; pick one")
        self._check_sync_ref()
        self.check_rewards(required=True)

    # ---- values with per-objective defaults (resolved here so every reader agrees)

    @property
    def resolved_beta(self) -> float:
        return self.beta if self.beta is not None else DEFAULT_BETA.get(self.rlhf_type, 0.1)

    @property
    def resolved_loss_type(self) -> str:
        """The first (main) preference variant: its rewards are the ones logged."""
        return self.resolved_loss_types[0]

    @property
    def resolved_loss_types(self) -> list[str]:
        return list(self.pref_loss_type or ["sigmoid"])

    @property
    def resolved_loss_weights(self) -> list[float]:
        return list(self.loss_weights) or [1.0] * len(self.resolved_loss_types)

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

    def averages(self, loss_type: str | None = None) -> bool:
        """Length-averaged log-probs where the paper defines the objective on them: SimPO, ORPO, and the IPO and
        length-normalised DPO variants (of DPO and of CPO)."""
        if self.rlhf_type in ("simpo", "orpo"):
            return True
        return self.rlhf_type in ("dpo", "cpo") and (loss_type or self.resolved_loss_type) in AVERAGED_LOSS_TYPES

    @property
    def average_log_probs(self) -> bool:
        """Whether the main loss variant takes averaged log-probs (what the precomputed reference stores)."""
        return self.averages()


@dataclass
class RolloutArguments(DeployArguments):
    """Generation server for RL: lmforge rollout --model M [--infer_backend native]; a trainer started with
    --rollout_url pushes its weights here and pulls samples (token ids in and out)."""

    port: int = field(8001, "port to listen on")
    max_weights_request_bytes: int = field(1024 ** 3, "largest weight-update body accepted (the trainer sends "
                                                      "safetensors chunks of at most 256 MiB)")
