"""Arguments of ``lmforge sample`` (best-of-N / rejection sampling) and the reward flags it shares with GRPO."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from lmforge.arguments.base import ArgumentError, field
from lmforge.arguments.infer import InferArguments


@dataclass
class RewardArguments:
    """Rewards (outcome reward functions and reward models) for GRPO and sample."""

    reward_funcs: list[str] = field(default_factory=list,
                                    help="registered reward functions: accuracy, format, cosine, length, repetition, "
                                         "or your own (--external_plugins)")
    reward_weights: list[float] = field(default_factory=list,
                                        help="one weight per reward (functions, then reward models); default all 1")
    reward_kwargs: dict = field(default_factory=dict,
                                help='settings per reward function as JSON, e.g. \'{"format": {"pattern": "\\\\d+"}}\'')
    reward_model: list[str] = field(default_factory=list,
                                    help="reward-model checkpoints (lmforge rlhf --rlhf_type rm) used as rewards")

    def check_rewards(self, required: bool) -> None:
        n = len(self.reward_funcs) + len(self.reward_model)
        if required and n == 0:
            raise ArgumentError("no reward: pass --reward_funcs (e.g. accuracy) and/or --reward_model PATH")
        if self.reward_weights and len(self.reward_weights) != n:
            raise ArgumentError(f"--reward_weights has {len(self.reward_weights)} values for {n} rewards "
                                f"(--reward_funcs {self.reward_funcs} then --reward_model {self.reward_model})")
        if not isinstance(self.reward_kwargs, dict) or not all(isinstance(v, dict) for v in self.reward_kwargs.values()):
            raise ArgumentError('--reward_kwargs must map reward names to JSON objects: \'{"NAME": {"key": 1}}\'')


@dataclass
class SampleArguments(InferArguments, RewardArguments):
    """Best-of-N and rejection sampling: lmforge sample --model M --dataset D --reward_funcs accuracy."""

    num_return_sequences: int = field(8, "samples per prompt (N)")
    temperature: float = field(1.0, "sampling temperature (samples must differ to be worth ranking)")
    stream: bool = field(False, "unused by sample")
    prm: Optional[str] = field(None, "process reward model that scores each step: arith_steps, reward_model, or yours")
    prm_kwargs: dict = field(default_factory=dict, help='settings of the PRM as JSON, e.g. \'{"model": "PATH"}\'')
    prm_aggregate: Literal["min", "last", "mean", "prod"] = field("min", "how a reply's step scores become one")
    prm_weight: float = field(1.0, "weight of the PRM's score in a sample's score (ORM sum + prm_weight x PRM)")
    sample_format: Literal["sft", "dpo", "all"] = field(
        "sft", "sft: the best reply per prompt as messages; dpo: best (chosen) and worst (rejected_response); "
               "all: every sample with its scores")
    min_score: Optional[float] = field(None, "keep a prompt only if its best sample scores at least this "
                                             "(rejection sampling, e.g. 1 with --reward_funcs accuracy)")
    sample_batch_size: int = field(16, "prompts sampled per engine call")

    def __post_init__(self) -> None:
        if self.num_return_sequences < 1:
            raise ArgumentError(f"--num_return_sequences must be >= 1, got {self.num_return_sequences}")
        if self.sample_format == "dpo" and self.num_return_sequences < 2:
            raise ArgumentError("--sample_format dpo needs --num_return_sequences >= 2 (a best and a worst sample)")
        if self.sample_batch_size < 1:
            raise ArgumentError(f"--sample_batch_size must be >= 1, got {self.sample_batch_size}")
        self.check_rewards(required=self.prm is None)
