"""Arguments of ``lmforge rlhf``: preference training (dpo, kto, orpo, simpo, cpo) and reward models (rm).

Everything ``sft`` takes (model, dataset, template, tuner, packing, ...) works the same; the
fields below choose the objective.

``--loss_type`` means the *preference-loss variant* here (``sigmoid``, ``ipo``, ``hinge``, ...),
not the token loss of ``sft``'s ``LOSSES`` registry. It is stored as ``pref_loss_type`` and
``loss_type`` is cleared, so the shared training code never looks ``sigmoid`` up as a token loss
and ``args.json`` records the variant under one unambiguous name. The SFT terms of
``--rpo_alpha``, ORPO and CPO are plain token cross-entropy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from lmforge.arguments.base import ArgumentError, field
from lmforge.arguments.train import TrainArguments

RLHF_TYPES = ("dpo", "kto", "orpo", "simpo", "cpo", "rm")
# kept here (not imported from lmforge.rlhf.losses) so that parsing flags imports no torch
DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "sppo_hard", "apo_zero", "apo_down")
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")
# beta when the user leaves it unset: the papers' recommended values
DEFAULT_BETA = {"dpo": 0.1, "kto": 0.1, "orpo": 0.1, "simpo": 2.0, "cpo": 0.1}


@dataclass
class RlhfArguments(TrainArguments):
    """Preference training: lmforge rlhf --rlhf_type dpo --model M --dataset D."""

    rlhf_type: Literal["dpo", "kto", "orpo", "simpo", "cpo", "rm"] = field("dpo", "the objective")
    loss_type: Optional[str] = field(None, "for rlhf: the dpo/cpo loss variant (stored as pref_loss_type)")
    beta: Optional[float] = field(None, "strength of the preference term: DPO/KTO/CPO beta, ORPO lambda, SimPO "
                                        "beta; default 0.1 (SimPO 2.0)")
    pref_loss_type: Optional[str] = field(
        None, "dpo: sigmoid, robust, hinge, ipo, exo_pair, nca_pair, sppo_hard, apo_zero, apo_down; cpo: sigmoid, "
              "hinge, ipo (default sigmoid). --loss_type sets the same thing")
    label_smoothing: float = field(0.0, "assumed label-flip rate (conservative/robust DPO, CPO, SimPO; EXO's epsilon)")
    rpo_alpha: Optional[float] = field(None, "dpo: add rpo_alpha x the NLL of the chosen reply (RPO)")
    ref_model: Optional[str] = field(None, "reference model (dpo, kto); default: the starting model, via disabled "
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
        if self.ref_model and self.rlhf_type not in ("dpo", "kto"):
            raise ArgumentError(f"--ref_model: rlhf_type {self.rlhf_type} uses no reference model")
        if self.rpo_alpha is not None and self.rlhf_type != "dpo":
            raise ArgumentError("--rpo_alpha is for rlhf_type dpo (orpo and cpo have their own NLL term)")

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
        return self.rlhf_type in ("dpo", "kto")

    @property
    def average_log_probs(self) -> bool:
        """Length-averaged log-probs where the paper defines the objective on them (SimPO, ORPO, IPO)."""
        return self.rlhf_type in ("simpo", "orpo") or (self.rlhf_type == "dpo" and self.resolved_loss_type == "ipo")
