"""GRPOTrainer: online RL on rewards for groups of the policy's own samples (``rlhf --rlhf_type grpo``).

One micro-batch of ``B`` prompts (``--per_device_train_batch_size``) becomes, in ``_prepare_inputs``:

1. **Rollouts**: ``G`` (``--num_generations``) samples per prompt from the rollout engine: the hf
   engine on the training model itself (no weight copy), the native CUDA engine (weights pushed
   after each optimizer step), or a ``lmforge rollout`` server (``--rollout_url``; weights pushed
   over HTTP). With ``--multi_turn_scheduler`` each sample goes on for several turns.
2. **Rewards** from ``--reward_funcs``/``--reward_model``, weighted (``--reward_weights``); with
   ``--dynamic_sample`` groups whose rewards are all equal are dropped and more prompts sampled.
3. **Advantages** relative to the group (:func:`lmforge.rlhf.grpo.group_advantages`).
4. **Old and reference log-probs** under no_grad: the sampling policy's when ``--num_iterations`` > 1
   (several updates reuse one batch of rollouts), the reference's when ``--beta`` > 0 (a frozen copy,
   ``--ref_model``, or for LoRA the same model with its adapters switched off).

On image and video rows every request carries the prompt's images and videos and every log-prob is computed
with the same pixels (:mod:`lmforge.rlhf.grpo_batch`).

``compute_loss`` then scores the completions with the current policy and applies the clipped
objective (:func:`lmforge.rlhf.grpo.grpo_token_loss`). Only tokens the model generated train:
for single-turn rollouts those are the sampled ids themselves; a multi-turn trajectory is encoded
by the template, whose labels cover the model's turns and not the tool results.

Logged with the loss: ``reward``, ``reward_std``, ``rewards/<name>/mean|std``, ``kl``,
``clip_ratio/low_mean|high_mean|region_mean``, ``completions/mean_length|min_length|max_length|
clipped_ratio``, ``frac_reward_zero_std``, ``rollout/groups``, ``rollout/tokens_per_s`` (eval runs get the ``eval_`` prefix).
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor
from transformers import TrainerCallback

from lmforge.rlhf.grpo import (BatchStd, entropy_mask, entropy_threshold, grpo_token_loss, off_policy_sequence_mask,
                               reward_advantages, scored, selective_log_softmax, token_entropy, truncated_mask,
                               zero_std_groups)
from lmforge.rlhf.grpo_batch import completion_logits, rollout_pixels
from lmforge.rlhf.rewards import score_completions, weighted_rewards
from lmforge.rlhf.rollout import (AsyncRollouts, Episode, RolloutPrompt, Sampled, policy_named_weights, run_rollouts,
                                   stable_seed)
from lmforge.rlhf.scoring import prompt_completion_batch
from lmforge.rlhf.metrics import MetricStore
from lmforge.rlhf.trainer import ReferenceMixin
from lmforge.trainers.trainer import LmforgeTrainer
from lmforge.utils.distributed import collective_device, gather_objects, global_sum, world_size

__all__ = ["GRPOTrainer", "RepeatBlockSampler", "PROMPT_COLUMN", "TOOLS_COLUMN", "prompt_rows", "collate_prompts"]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Columns the GRPO pipeline adds to the encoded prompts (they are not reward inputs).
PROMPT_COLUMN, TOOLS_COLUMN = "lmforge_prompt", "lmforge_tools"
_NOT_REWARD_INPUTS = {"input_ids", "labels", "length", "loss_scale", PROMPT_COLUMN, TOOLS_COLUMN}


def prompt_rows(ds: Any) -> Any:
    """Canonical rows -> prompt-only rows, their messages and tools also kept as JSON in
    :data:`PROMPT_COLUMN`/:data:`TOOLS_COLUMN` next to the template's prompt ids.

    A row that ends with an assistant reply is a reference conversation: its last exchange (the reply
    and any tool calls and results before it, back to the last user message) is dropped, so the model
    answers the last user turn itself; put what rewards need (the answer) in a column such as
    ``solution``. A row without a final reply is a prompt already (it may end on a tool result). A row's
    ``images`` and ``videos`` stay with it: its prompt's ``<image>`` and ``<video>`` tags are sampled and scored
    with them.
    """

    def strip(batch: dict[str, list]) -> dict[str, list]:
        prompts, tools = [], []
        messages_out = []
        for messages, t in zip(batch["messages"], batch.get("tools") or [None] * len(batch["messages"])):
            msgs = [{k: v for k, v in m.items() if v is not None} for m in messages or []]
            if msgs and msgs[-1].get("role") == "assistant":
                while msgs and msgs[-1].get("role") != "user":
                    msgs.pop()
            messages_out.append(msgs)
            prompts.append(json.dumps(msgs, ensure_ascii=False))
            tools.append(t if t is None or isinstance(t, str) else json.dumps(t, ensure_ascii=False))
        return {"messages": messages_out, PROMPT_COLUMN: prompts, TOOLS_COLUMN: tools}

    return ds.map(strip, batched=True, desc="GRPO: prompts")


def collate_prompts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """GRPO batches are the prompt rows themselves: the trainer samples and tensorises them."""
    return list(rows)


class RepeatBlockSampler(torch.utils.data.Sampler):
    """Shuffled indices in blocks of ``block`` (one optimizer step's prompts over all processes), each block
    served ``repeat`` times in a row (``--num_iterations``), so the trainer can reuse one block's rollouts for
    several updates. A last, incomplete block is dropped."""

    def __init__(self, size: int, block: int, repeat: int, seed: int = 0):
        self.size, self.block, self.repeat, self.seed, self.epoch = size, block, repeat, seed, 0
        if size < block:
            raise ValueError(f"GRPO with --num_iterations {repeat} needs at least {block} prompts "
                             f"(batch x accumulation x processes); the dataset has {size}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (self.size // self.block) * self.block * self.repeat

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        for s in range(0, (self.size // self.block) * self.block, self.block):
            for _ in range(self.repeat):
                yield from order[s:s + self.block]


class RolloutProgress(TrainerCallback):
    """After each logged training step, one line with the GRPO numbers beside the progress bar's loss line:
    ``rollouts: reward 0.52 (accuracy 0.52) kl 0.012 clip 0.000 length 3.3 [1-8] 3512 tok/s``."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any):
        if state.is_world_process_zero and logs and "reward" in logs:
            _write(rollout_line(logs))


def rollout_line(logs: dict[str, float]) -> str:
    per = ", ".join(f"{k[len('rewards/'):-len('/mean')]} {logs[k]:.3g}" for k in logs
                    if k.startswith("rewards/") and k.endswith("/mean"))
    parts = [f"reward {logs['reward']:.3g}" + (f" ({per})" if per else "")]
    if "kl" in logs:
        parts.append(f"kl {logs['kl']:.3g}")
    if "clip_ratio/region_mean" in logs:
        parts.append(f"clip {logs['clip_ratio/region_mean']:.3f}")
    if "completions/mean_length" in logs:
        parts.append(f"length {logs['completions/mean_length']:.3g} [{logs.get('completions/min_length', 0):.0f}-"
                     f"{logs.get('completions/max_length', 0):.0f}]")
    if "rollout/tokens_per_s" in logs:
        parts.append(f"{logs['rollout/tokens_per_s']:.0f} tok/s")
    return "rollouts: " + " ".join(parts)


def _write(line: str) -> None:
    import sys

    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)  # below a progress bar if one is drawn, a plain line otherwise


class GRPOTrainer(ReferenceMixin, LmforgeTrainer):
    """Trains ``rlhf_type grpo``; see the module docstring.

    ``reward_funcs`` is ``[(name, callable)]`` (:func:`lmforge.rlhf.rewards.build_reward_funcs`);
    ``template`` the training template (its ``infer`` mode encodes prompts); ``scheduler`` a
    multi-turn scheduler or None; ``engine`` an engine to use instead of building one (tests).
    """

    def __init__(self, *args: Any, ref_model: Any = None, rlhf_args: Any = None,
                 reward_funcs: Sequence[tuple[str, Any]] = (), template: Any = None, scheduler: Any = None,
                 engine: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.rlhf = rlhf_args if rlhf_args is not None else self.lmforge_args
        if self.rlhf is None:
            raise ValueError("GRPOTrainer needs rlhf_args (an RlhfArguments)")
        if not reward_funcs:
            raise ValueError("GRPOTrainer needs reward_funcs (--reward_funcs / --reward_model)")
        if template is None:
            raise ValueError("GRPOTrainer needs the template")
        # Per-micro-batch means: the Trainer divides by the accumulation steps. dapo/cispo divide by the tokens
        # of the whole step themselves (get_batch_samples counts them), so the Trainer must not divide again.
        self.token_level = self.rlhf.resolved_grpo_loss_type in ("dapo", "cispo")
        self.loss_is_scaled_for_ga = self.token_level
        self.model_accepts_loss_kwargs = False
        self.metric_store = MetricStore(self.accelerator.device)
        self.beta = self.rlhf.resolved_beta
        self._set_reference(ref_model if self.beta else None)
        if self.beta and ref_model is None and not self._has_adapters():
            raise ValueError("grpo with --beta > 0 needs a reference: --ref_model, LoRA (adapters switched off), "
                             "or a frozen copy (rlhf_main makes one); or pass --beta 0")
        self.reward_funcs = list(reward_funcs)
        self.reward_weights = list(self.rlhf.reward_weights) or [1.0] * len(self.reward_funcs)
        self.template = template
        self.train_template = copy.copy(template)
        self.train_template.set_mode("train")
        self.train_template.max_length = None
        self.scheduler = scheduler
        self.G = self.rlhf.num_generations
        self.mu = self.rlhf.num_iterations
        self._engine = engine
        self._colocated = engine is None and not self.rlhf.rollout_url and self.rlhf.infer_backend == "hf"
        self._async = bool(getattr(self.rlhf, "async_generate", False))
        if self._async and engine is None and not self.rlhf.rollout_url and self.rlhf.infer_backend == "hf":
            self._colocated = False  # async hf: the engine gets its own copy of the policy (see _get_engine)
        self._synced_step = -1  # a separate engine gets the policy's weights before its first rollout
        self._step_batches: list[dict[str, Any]] | None = None  # the last step's rollouts (num_iterations reuse)
        self._pending: AsyncRollouts | None = None  # async: the next step's rollouts, being generated
        self._resample: Iterator[dict[str, Any]] | None = None
        self._logits_to_keep_ok = True
        self._last_group: dict[str, Any] | None = None
        self.add_callback(RolloutProgress())
        self._setup_reference_sync()
        if (self.mu > 1 or self.rlhf.dynamic_sample) and not hasattr(self.train_dataset, "__len__"):
            raise ValueError("--num_iterations > 1 and --dynamic_sample need a map-style dataset (drop --streaming)")

    # ----------------------------------------------------------------------------- data

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        ds = train_dataset if train_dataset is not None else self.train_dataset
        if self.mu == 1 or not hasattr(ds, "__len__"):
            return super()._get_train_sampler(train_dataset)
        block = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        return RepeatBlockSampler(len(ds), block, self.mu, seed=self.args.data_seed or self.args.seed)

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        """One optimizer step's micro-batches as rollout batches, sampled up front (before the first backward).

        So the step's trained tokens can be counted over every micro-batch and process (dapo/cispo's
        normaliser, returned as ``num_items_in_batch``); with ``--num_iterations`` > 1 a step that repeats
        the last one's prompts reuses its rollouts; with ``--async_generate`` the step trains on rollouts
        generated while the previous step trained, and hands the engine its successor's prompts.
        """
        rows, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self._async:
            batches = self._async_batches(rows, epoch_iterator, num_batches, device)
        elif self.state.global_step % self.mu != 0 and self._step_batches is not None \
                and len(self._step_batches) == len(rows):
            batches = self._step_batches
        else:
            batches = [self._rollout(r, "train") for r in rows]
        self._step_batches = batches
        return batches, self._step_tokens(batches) if self.token_level else None

    def _step_tokens(self, batches: list[dict[str, Any]]) -> Tensor:
        """Trained completion tokens of the step over every process, divided by the number of processes (DDP
        averages gradients over them): sum over the step of ``loss_micro`` is then the global token mean."""
        local = sum(float(b["completion_mask"].sum()) for b in batches)
        total = global_sum(torch.tensor(local, dtype=torch.float64, device=collective_device()))
        return (total / world_size()).to(self.args.device, torch.float32)

    def _async_batches(self, rows: list, epoch_iterator: Any, num_batches: int, device: Any) -> list:
        """Train on the rollouts started one step ago; start the next step's with the current weights.

        At the first step of an epoch nothing is pending: this step's rows are sampled now and the next
        step's rows are fetched early (every later call fetches one step ahead, so the last call of the
        epoch fetches nothing and starts nothing)."""
        if self._pending is None:
            batches = [self._rollout(r, "train") for r in rows]
            upcoming, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        else:
            batches = [self._finish_rollout(part) for part in self._pending.result()]
            upcoming = rows
        self._pending = None
        if upcoming:
            engine = self._get_engine()
            self._sync_weights(engine)
            self._pending = AsyncRollouts(lambda r: self._sample_prepared(self._prepared_prompts(r), engine), upcoming)
        return batches

    def _prepare_inputs(self, inputs: Any) -> dict[str, Any]:
        if isinstance(inputs, dict):  # already a rollout batch
            return inputs
        return self._rollout(inputs, "train" if self.model.training else "eval")

    def floating_point_ops(self, inputs: Any) -> int:
        return super().floating_point_ops({"input_ids": inputs["input_ids"]} if isinstance(inputs, dict) else {})

    def _wait_pending(self) -> None:
        """Let a background rollout finish (its results are dropped): training ended before it was used."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def train(self, *args: Any, **kwargs: Any):
        try:
            return super().train(*args, **kwargs)
        finally:
            self._wait_pending()

    def _resample_rows(self, n: int) -> list[dict[str, Any]]:
        """``n`` more prompt rows, drawn at random from the training set (dynamic sampling)."""
        if self._resample is None:
            def forever() -> Iterator[dict[str, Any]]:
                g = torch.Generator().manual_seed(self.args.seed + 1 + self.accelerator.process_index)
                while True:
                    for i in torch.randperm(len(self.train_dataset), generator=g).tolist():
                        yield self.train_dataset[i]
            self._resample = forever()
        return [next(self._resample) for _ in range(n)]

    # ----------------------------------------------------------------------------- engine

    def _policy(self) -> Any:
        return self.accelerator.unwrap_model(self.model)

    def _tokenizer(self) -> Any:
        """The tokenizer (a vision-language model's processing class is its processor, which holds it)."""
        return getattr(self.processing_class, "tokenizer", self.processing_class)

    def _get_engine(self) -> Any:
        if self._engine is not None:
            return self._engine
        policy, args = self._policy(), self.rlhf
        batch = args.rollout_batch_size or self.args.per_device_train_batch_size * self.G
        if args.rollout_url:
            from lmforge.rlhf.rollout import RolloutClient

            self._engine = RolloutClient(args.rollout_url, api_key=args.rollout_api_key, wait=60.0)
            logger.info("GRPO rollouts: the rollout server at %s (weights pushed after each optimizer step)",
                        args.rollout_url)
        elif args.infer_backend == "native":
            from lmforge.infer import get_engine

            kw = dict(tokenizer=self._tokenizer(), template=self.template, max_num_seqs=batch,
                      gpu_memory_utilization=args.rollout_gpu_memory_utilization)
            if self._has_adapters():
                # The native engine keeps some of its model's tensors (o_proj, down_proj, norms) as they are:
                # built on a LoRA policy it would share the frozen base, and the merged weights pushed into it
                # would overwrite that base. It loads its own copy instead and gets the merged weights pushed.
                self._engine = get_engine("native", model=args.model, hub=args.hub, revision=args.revision,
                                          torch_dtype=args.torch_dtype, model_kwargs=args.model_kwargs,
                                          trust_remote_code=args.trust_remote_code, **kw)
            else:  # full/freeze: shared tensors are the policy's own; the fused ones are refreshed by pushes
                self._engine = get_engine("native", model_obj=policy, **kw)
                self._synced_step = self.state.global_step  # built from the policy as it is now
            logger.info("GRPO rollouts: the native engine (weights pushed after each optimizer step)")
        else:
            from lmforge.infer.hf import HfEngine

            if self._async:  # generation overlaps training: the engine needs weights of its own
                copy_ = copy.deepcopy(policy)
                copy_ = copy_.merge_and_unload() if hasattr(copy_, "merge_and_unload") else copy_
                self._engine = HfEngine(model_obj=copy_.eval().requires_grad_(False), tokenizer=self._tokenizer(),
                                        template=self.template, max_batch_size=batch)
                logger.info("GRPO rollouts: the hf engine on a copy of the policy (async; weights pushed each step)")
            else:
                self._engine = HfEngine(model_obj=policy, tokenizer=self._tokenizer(), template=self.template,
                                        max_batch_size=batch)
                logger.info("GRPO rollouts: the hf engine on the training model itself (no weight copy)")
        return self._engine

    def _sync_weights(self, engine: Any) -> None:
        """Push the policy's weights to a non-colocated engine once per optimizer step (before its next rollout)."""
        if self._colocated or self._synced_step == self.state.global_step:
            return
        t0 = time.perf_counter()
        if not self.rlhf.rollout_url or self.accelerator.is_main_process:
            engine.update_weights(policy_named_weights(self._policy()))
        if self.rlhf.rollout_url:
            self.accelerator.wait_for_everyone()
        self._synced_step = self.state.global_step
        self.metric_store.add("train", "rollout/sync_seconds", time.perf_counter() - t0)

    # ----------------------------------------------------------------------------- rollouts

    def _request_config(self, logprobs: bool = False) -> Any:
        from lmforge.infer.protocol import RequestConfig

        a = self.rlhf
        return RequestConfig(max_tokens=a.max_completion_length, temperature=a.temperature, top_p=a.top_p,
                             top_k=a.top_k, repetition_penalty=a.repetition_penalty, logprobs=logprobs)

    @staticmethod
    def _rollout_prompt(row: dict[str, Any]) -> RolloutPrompt:
        if PROMPT_COLUMN not in row:
            raise KeyError(f"GRPO rows need a {PROMPT_COLUMN!r} column: load the data with "
                           "lmforge.rlhf.grpo_trainer.prompt_rows as the transform (rlhf_main does)")
        tools = row.get(TOOLS_COLUMN)
        extra = {k: v for k, v in row.items() if k not in _NOT_REWARD_INPUTS}
        return RolloutPrompt(json.loads(row[PROMPT_COLUMN]), json.loads(tools) if tools else None,
                             list(row["input_ids"]), extra, list(row.get("images") or []),
                             [list(v) for v in row.get("videos") or []])

    def _rollout_seeds(self, prompts: list[RolloutPrompt]) -> list[int]:
        """Each prompt's sampling seed, from ``--seed``, the step and the prompt itself: the same prompt at the
        same step samples the same completions on any process and in any batch, so N processes roll out
        what one would (and a run can be repeated)."""
        step = self.state.global_step
        return [stable_seed(self.args.seed, step, p.messages, p.prompt_ids, *([p.images] if p.images else []),
                            *([p.videos] if p.videos else [])) for p in prompts]

    def _prepared_prompts(self, rows: list[dict[str, Any]]) -> list[RolloutPrompt]:
        return [self._rollout_prompt(r) for r in rows]

    def _sample_prepared(self, prompts: list[RolloutPrompt], engine: Any) -> Sampled:
        """Rollouts of ``prompts`` from ``engine`` and their reward table [B*G, F] (NaN: not scored). Touches no
        training state, so it may run in a background thread (``--async_generate``: then the engine's own
        log-probs of the sampled tokens come back as the behaviour policy's)."""
        t0 = time.perf_counter()
        episodes = run_rollouts(engine, prompts, self._request_config(logprobs=self._async),
                                num_generations=self.G, scheduler=self.scheduler, seeds=self._rollout_seeds(prompts))
        seconds = time.perf_counter() - t0
        columns: dict[str, list[Any]] = {k: [p.row.get(k) for p in prompts for _ in range(self.G)]
                                         for k in prompts[0].row}
        columns.update(prompts=[p.messages for p in prompts for _ in range(self.G)],
                       messages=[e.messages for e in episodes],
                       completion_lengths=[e.generated_tokens for e in episodes])
        table = score_completions(self.reward_funcs, [e.completion for e in episodes], columns)
        return Sampled(prompts, episodes, table, seconds, sum(e.generated_tokens for e in episodes))

    def _sample(self, rows: list[dict[str, Any]]) -> Sampled:
        """Rollouts of ``rows`` now, from the engine with the policy's current weights."""
        policy = self._policy()
        was_training = policy.training  # before the engine is built: HfEngine puts its model in eval mode
        engine = self._get_engine()
        self._sync_weights(engine)
        prompts = self._prepared_prompts(rows)
        if self._colocated:
            policy.eval()
        try:
            return self._sample_prepared(prompts, engine)
        finally:
            policy.train(was_training)

    def _rollout(self, rows: list[dict[str, Any]], split: str) -> dict[str, Any]:
        sampled = self._sample(rows)
        if self.rlhf.dynamic_sample and split == "train":
            sampled = self._dynamic_sample(rows, sampled)
        return self._finish_rollout(sampled, split)

    def _advantages(self, table: Tensor) -> Tensor:
        """Advantages of a reward table; the batch std (``--scale_rewards batch``) is that of every process's
        scored rewards, reduced before it divides anything."""
        a = self.rlhf
        w = torch.tensor(self.reward_weights, dtype=table.dtype)
        stds = None
        if a.scale_rewards == "batch":
            if a.reward_aggregation == "sum":
                cols = [weighted_rewards(table, self.reward_weights)]
            else:
                cols = [table[:, j] for j in range(table.shape[1])]
            stds = torch.tensor([BatchStd(*global_sum(BatchStd.local(c).to(collective_device())).tolist()).std()
                                 for c in cols])
        return reward_advantages(table, w, self.G, a.scale_rewards, a.reward_aggregation, stds)

    def _finish_rollout(self, sampled: Sampled, split: str = "train") -> dict[str, Any]:
        """Advantages, tensors, old and reference log-probs and metrics of sampled rollouts (main thread)."""
        prompts, episodes, table = sampled.prompts, sampled.episodes, sampled.table
        total = weighted_rewards(table, self.reward_weights)
        advantages = self._advantages(table)
        batch = self._tensorize(prompts, episodes)
        batch["advantages"] = advantages.to(self.args.device)
        truncated = torch.tensor([e.finish_reason == "length" for e in episodes], device=self.args.device)
        if self.rlhf.mask_truncated_completions:
            batch["completion_mask"] = truncated_mask(batch["completion_mask"], truncated)
        model = self.model
        with torch.no_grad():
            if "sampling_logps" in batch:  # async: the engine's log-probs are the behaviour policy's
                batch["old_logps"] = batch.pop("sampling_logps")
            elif self.mu > 1 and split == "train":
                batch["old_logps"] = self._completion_logps(model, batch)
            if self.beta:
                with self._reference(model) as ref:
                    batch["ref_logps"] = self._completion_logps(ref, batch)
        self._log_rollout(split, episodes, table, total, sampled.seconds, sampled.tokens)
        first = prompts[0].messages
        self._last_group = {"prompt": first, "completions": [e.messages[len(first):] for e in episodes[:self.G]],
                            "rewards": total[:self.G].tolist(), "advantages": advantages[:self.G].tolist()}
        return batch

    def _dynamic_sample(self, rows: list[dict[str, Any]], sampled: Sampled) -> Sampled:
        """Keep groups whose rewards differ; sample more prompts (up to ``--max_resample_times`` rounds) until
        there are as many groups as prompts asked for. When none differ, the batch is kept as it is (its
        advantages are all 0: only the KL term trains)."""
        G, want = self.G, len(rows)
        keep_p: list[RolloutPrompt] = []
        keep_e: list[Episode] = []
        keep_t: list[Tensor] = []
        seconds, tokens, rounds = sampled.seconds, sampled.tokens, 0

        def take(s: Sampled) -> None:
            total = weighted_rewards(s.table, self.reward_weights)
            for k in (~zero_std_groups(total, G)).nonzero().flatten().tolist():
                if len(keep_p) < want:
                    keep_p.append(s.prompts[k])
                    keep_e.extend(s.episodes[k * G:(k + 1) * G])
                    keep_t.append(s.table[k * G:(k + 1) * G])

        take(sampled)
        while len(keep_p) < want and rounds < self.rlhf.max_resample_times:
            rounds += 1
            more = self._sample(self._resample_rows(want))
            seconds, tokens = seconds + more.seconds, tokens + more.tokens
            take(more)
        self.metric_store.add("train", "dynamic_sample/kept_groups", len(keep_p) / want)
        self.metric_store.add("train", "dynamic_sample/rounds", rounds)
        if not keep_p:
            logger.warning("dynamic_sample: every group of this micro-batch had equal rewards after %d extra "
                           "rounds; training on it with zero advantages", rounds)
            return sampled._replace(seconds=seconds, tokens=tokens)
        for i, e in enumerate(keep_e):  # the kept groups' prompts are renumbered 0..n-1
            e.prompt_index = i // G
        return Sampled(keep_p, keep_e, torch.cat(keep_t), seconds, tokens)

    def _sequence(self, e: Episode, p: RolloutPrompt) -> tuple[list[int], list[int], list[int]]:
        """(prompt ids, completion ids, completion mask): the sampled ids, or for a multi-turn trajectory its
        template encoding (with the prompt ``p``'s tools, images and videos) cut at the first trained token, the
        mask being the template's labels."""
        if not e.multi_turn:
            return list(e.prompt_ids or []), e.completion_ids, [1] * len(e.completion_ids)
        messages = list(e.messages)
        while messages and messages[-1]["role"] not in ("assistant", "tool_call"):
            messages.pop()  # a trajectory cut short on a tool result: nothing after the last model turn trains
        enc = self.train_template.encode({"messages": messages, "tools": p.tools, "images": p.images or None,
                                          "videos": p.videos or None})
        ids, labels = list(enc["input_ids"]), list(enc["labels"])
        first = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(ids))
        return ids[:first], ids[first:], [int(t != IGNORE_INDEX) for t in labels[first:]]

    def _tensorize(self, prompts: list[RolloutPrompt], episodes: list[Episode]) -> dict[str, Tensor]:
        """Left-padded prompts, then right-padded completions: ``[pad.. prompt | completion ..pad]``, and on
        image and video rows the pixels of each sequence's prompt media
        (:func:`lmforge.rlhf.grpo_batch.rollout_pixels`)."""
        pad = self.processing_class.pad_token_id if self.processing_class is not None else 0
        seqs = [self._sequence(e, prompts[e.prompt_index]) for e in episodes]
        dev = self.args.device
        out = prompt_completion_batch(seqs, pad, dev)
        if any(p.images or p.videos for p in prompts):
            out.update(rollout_pixels(self.template.vision, self._vision_family(), out["input_ids"],
                                      [p.images for p in prompts], [e.prompt_index for e in episodes],
                                      [p.videos for p in prompts]))
        C = out["completion_ids"].shape[1]
        if all(e.sampling_logps is not None for e in episodes):
            if any(len(e.sampling_logps) != len(c) for e, (_, c, _) in zip(episodes, seqs)):
                raise RuntimeError("the engine returned a log-prob count that differs from its token count")
            out["sampling_logps"] = torch.tensor([e.sampling_logps + [0.0] * (C - len(e.sampling_logps))
                                                  for e in episodes], device=dev, dtype=torch.float32)
        return out

    def _vision_family(self) -> Any:
        from lmforge.model.vision import require_family

        return require_family(self._policy())

    def _completion_logits(self, model: Any, batch: dict[str, Tensor]) -> Tensor:
        """[B, C, V] logits that predict the completion tokens, at the sampling temperature (pixels included)."""
        if self._logits_to_keep_ok:
            try:
                return completion_logits(model, batch, self.rlhf.temperature, logits_to_keep=True)
            except TypeError:  # a model without logits_to_keep: full logits, sliced
                self._logits_to_keep_ok = False
        return completion_logits(model, batch, self.rlhf.temperature, logits_to_keep=False)

    def _completion_logps(self, model: Any, batch: dict[str, Tensor]) -> Tensor:
        """[B, C] log-probs of the completion tokens under ``model`` at the sampling temperature."""
        return selective_log_softmax(self._completion_logits(model, batch), batch["completion_ids"])

    # ----------------------------------------------------------------------------- loss

    def _pg_mask(self, logps: Tensor, entropies: Tensor | None, inputs: dict[str, Any], split: str) -> Tensor | None:
        """Which trained tokens the policy term covers: the top-entropy ones (``--top_entropy_quantile``, the
        threshold taken over every process's tokens) and not the off-policy negative sequences
        (``--off_policy_mask_threshold``); None when neither is on."""
        a, mask = self.rlhf, inputs["completion_mask"]
        out = None
        if entropies is not None:
            local = entropies.detach()[mask > 0].float().cpu()
            pooled = torch.cat(gather_objects(local))
            out = entropy_mask(entropies.detach(), mask, entropy_threshold(pooled, a.top_entropy_quantile))
            self.metric_store.add(split, "entropy/threshold_frac_kept", out.sum() / mask.sum().clamp(min=1))
        if a.off_policy_mask_threshold is not None and "old_logps" in inputs:
            keep = off_policy_sequence_mask(logps, inputs["old_logps"], inputs["advantages"], mask,
                                            a.off_policy_mask_threshold)
            self.metric_store.add(split, "off_policy/masked_ratio", (~keep).float())
            rows = keep.to(mask.dtype)[:, None].expand_as(mask)
            out = rows if out is None else out * rows
        return out

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        a = self.rlhf
        logits = self._completion_logits(model, inputs)
        logps = selective_log_softmax(logits, inputs["completion_ids"])
        entropies = token_entropy(logits.detach()) if a.top_entropy_quantile < 1.0 else None
        del logits
        mask = inputs["completion_mask"]
        split = "train" if model.training else "eval"
        out = grpo_token_loss(logps, inputs.get("old_logps", logps.detach()), inputs["advantages"], mask,
                              epsilon_low=a.epsilon, epsilon_high=a.epsilon_high, beta=self.beta,
                              ref_logps=inputs.get("ref_logps"), loss_type=a.resolved_grpo_loss_type,
                              max_completion_length=a.max_completion_length,
                              importance_sampling_level=a.importance_sampling_level, delta=a.delta,
                              sapo_temperatures=(a.sapo_temperature_pos, a.sapo_temperature_neg),
                              pg_mask=self._pg_mask(logps, entropies, inputs, split),
                              normalizer=num_items_in_batch if model.training and self.token_level else None)
        n = mask.sum().clamp(min=1)
        store = self.metric_store
        if out.kl is not None:
            store.add(split, "kl", (out.kl.detach() * mask).sum() / n)
        low, high = (out.low_clipped.float() * mask).sum() / n, (out.high_clipped.float() * mask).sum() / n
        store.add(split, "clip_ratio/low_mean", low)
        store.add(split, "clip_ratio/high_mean", high)
        store.add(split, "clip_ratio/region_mean", low + high)
        return (out.loss, {}) if return_outputs else out.loss

    def prediction_step(self, model: Any, inputs: Any, prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None):
        """Evaluation samples the validation prompts as training does and reports the same metrics (``eval_``)."""
        batch = self._rollout(inputs, "eval") if not isinstance(inputs, dict) else inputs
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, batch)
        return loss.detach(), None, None

    # ----------------------------------------------------------------------------- metrics

    def _log_rollout(self, split: str, episodes: list[Episode], table: Tensor, total: Tensor, seconds: float,
                     tokens: int) -> None:
        """Rollout metrics, each reduced over every process (means from sums and counts, stds from sums of
        squares). ``reward`` and its spreads cover the scored completions; ``completions/unscored_ratio`` counts
        the ones no reward function could judge (advantage 0, left out of the group statistics)."""
        store, G = self.metric_store, self.G
        ok = scored(total)
        store.add(split, "reward", total[ok])
        store.add(split, "completions/unscored_ratio", (~ok).float())
        groups = total.view(-1, G)
        stds = [g[~g.isnan()].std() for g in groups if int((~g.isnan()).sum()) > 1]
        store.add(split, "reward_std", torch.stack(stds) if stds else torch.zeros(0))
        store.add(split, "frac_reward_zero_std", zero_std_groups(total, G).float())
        store.add(split, "rollout/groups", float(groups.shape[0]), reduce="sum")  # the progress line counts them
        for j, (name, _) in enumerate(self.reward_funcs):
            col = table[:, j]
            done = col[~col.isnan()]
            store.add(split, f"rewards/{name}/mean", done)
            store.add(split, f"rewards/{name}/std", done, reduce="std")
        lengths = torch.tensor([float(e.generated_tokens) for e in episodes])
        store.add(split, "completions/mean_length", lengths)
        store.add(split, "completions/min_length", lengths, reduce="min")
        store.add(split, "completions/max_length", lengths, reduce="max")
        store.add(split, "completions/clipped_ratio", torch.tensor([float(e.finish_reason == "length")
                                                                    for e in episodes]))
        if self.scheduler is not None:
            store.add(split, "completions/mean_turns", torch.tensor([float(e.turns) for e in episodes]))
        store.add(split, "rollout/tokens_per_s", tokens / seconds if seconds > 0 else 0.0)
        store.add(split, "rollout/seconds", seconds)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        split, _ = self.metric_store.pop_into(logs)
        if split == "train" and self.rlhf.log_completions and self._last_group is not None \
                and self.args.should_save:
            self._write_completions()
        super().log(logs, start_time)

    def _write_completions(self) -> None:
        path = Path(self.args.output_dir) / "completions.jsonl"
        row = {"step": self.state.global_step, **self._last_group}
        row["rewards"] = [r if math.isfinite(r) else None for r in row["rewards"]]
        with path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
