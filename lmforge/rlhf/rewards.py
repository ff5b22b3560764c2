"""Outcome reward functions (ORMs): the built-ins of the ``REWARDS`` registry, and reward models as rewards.

A reward is a callable ``fn(completions, **kwargs) -> list[float | None]``: one value per
completion, ``None`` where it does not apply (left out of that function's mean; it counts as 0
in the weighted sum). A completion that *no* function scored is unscored: GRPO gives it advantage 0
and leaves it out of its group's statistics. The keyword lists, one entry per completion, are every extra column of the
dataset (``solution``, say) plus:

- ``prompts``: the conversation the model answered (canonical messages);
- ``messages``: the whole trajectory, the generated turns (and tool calls/results) included;
- ``completion_lengths``: tokens the model generated (all turns).

Register a function, or a class whose instances are such callables, from a plugin file
(``--external_plugins my_rewards.py``)::

    from lmforge.registry import REWARDS

    @REWARDS.register("ends_politely")
    def ends_politely(completions, **kwargs):
        return [1.0 if c.rstrip().endswith("Thank you.") else 0.0 for c in completions]

A class is built once with ``--reward_kwargs '{"NAME": {...}}'``; its ``__init__`` also receives
``max_completion_length`` when it names that parameter and the user did not set it.
"""
from __future__ import annotations

import inspect
import logging
import math
import re
from typing import Any, Callable, Sequence

from lmforge.registry import REWARDS

__all__ = ["RewardError", "answers_match", "build_reward_funcs",
           "score_completions", "RewardModelScorer", "AccuracyReward", "FormatReward", "CosineReward",
           "LengthReward", "RepetitionReward", "weighted_rewards"]

logger = logging.getLogger(__name__)

RewardFn = Callable[..., Sequence[Any]]


class RewardError(ValueError):
    """A reward that cannot run (a missing column, a bad setting); the message names the reward."""


# ----------------------------------------------------------------------------- answers


def answers_match(completion: str | None, solution: Any, percent: str = "number") -> bool:
    """Do the final answers of ``completion`` and ``solution`` agree?

    See :mod:`lmforge.rlhf.answers`: each text is first read whole as a math value (a solution written as
    ``\\frac{3}{4}`` is 3/4, not its last number), else its answer is its last ``\\boxed{}``, what follows
    ``####``, or its last number; answers are compared as numbers (``1,000`` = ``1000.0``, ``3/4`` =
    ``\\frac{3}{4}``, ``10^{3}`` = ``1000``, ``x = 5`` = ``5``), else as whitespace- and case-normalised text.
    ``percent="fraction"`` reads ``50\\%`` as 0.5 (for tasks whose answers are fractions).
    """
    from lmforge.rlhf.answers import math_answers_match

    return math_answers_match(completion, solution, percent)


# ----------------------------------------------------------------------------- built-in rewards


@REWARDS.register("accuracy")
class AccuracyReward:
    """1 when the reply's final answer equals the ``solution`` column's, else 0.

    See :func:`answers_match` for how answers are found and compared. ``strict: true`` asks for the
    whole reply (stripped) to equal the solution (the exact-match metric of ``builtin:arith``);
    ``percent: "fraction"`` reads ``50\\%`` as 0.5, for tasks that say so (default: as 50).
    """

    def __init__(self, strict: bool = False, column: str = "solution", percent: str = "number"):
        from lmforge.rlhf.answers import PERCENT_MODES

        if percent not in PERCENT_MODES:
            raise RewardError(f"reward 'accuracy': percent must be one of {', '.join(PERCENT_MODES)}, got {percent!r}")
        self.strict, self.column, self.percent = strict, column, percent

    def __call__(self, completions: list[str], **kwargs: Any) -> list[float | None]:
        solutions = kwargs.get(self.column)
        if solutions is None:
            raise RewardError(f"reward 'accuracy' needs a {self.column!r} column in the dataset (the reference "
                              f"answer); columns here: {sorted(k for k in kwargs if k not in _INTERNAL)}")
        out: list[float | None] = []
        for c, s in zip(completions, solutions):
            if s is None:
                out.append(None)
            elif self.strict:
                out.append(float(c is not None and c.strip() == str(s).strip()))
            else:
                out.append(float(answers_match(c, s, self.percent)))
        return out


@REWARDS.register("format")
class FormatReward:
    """1 when the whole reply (stripped) matches ``pattern`` (a regex; DOTALL), else 0.

    The default asks for DeepSeek-R1's ``<think>...</think><answer>...</answer>`` layout; set
    another with ``--reward_kwargs '{"format": {"pattern": "\\\\d+"}}'``.
    """

    DEFAULT = r"<think>.*?</think>\s*<answer>.*?</answer>"

    def __init__(self, pattern: str | None = None):
        try:
            self.regex = re.compile(pattern or self.DEFAULT, re.DOTALL)
        except re.error as e:
            raise RewardError(f"reward 'format': bad pattern {pattern!r}: {e}") from None

    def __call__(self, completions: list[str], **kwargs: Any) -> list[float]:
        return [float(bool(c is not None and self.regex.fullmatch(c.strip()))) for c in completions]


def _lengths(completions: list[str], kwargs: dict[str, Any]) -> list[int]:
    lengths = kwargs.get("completion_lengths")
    return list(lengths) if lengths is not None else [len(c or "") for c in completions]


@REWARDS.register("cosine")
class CosineReward:
    """Length-scaled correctness (Yeo et al. 2025, "Demystifying Long Chain-of-Thought Reasoning", arXiv:2502.03373).

    ``r(L) = r_end + (r_start - r_end) (1 + cos(pi L / max_len)) / 2``: a right answer earns
    ``max_value_correct`` at length 0 falling to ``min_value_correct`` at ``max_len`` (shorter is
    better); a wrong one ``min_value_wrong`` at length 0 rising to ``max_value_wrong`` (a wrong answer
    given after more thought is penalised less). ``L`` is in tokens (characters when the caller gives no
    ``completion_lengths``); ``max_len`` defaults to ``--max_completion_length``.
    """

    def __init__(self, max_len: int | None = None, min_value_wrong: float = -1.0, max_value_wrong: float = -0.5,
                 min_value_correct: float = 0.5, max_value_correct: float = 1.0, max_completion_length: int | None = None,
                 column: str = "solution"):
        self.max_len = max_len or max_completion_length or 1024
        self.wrong = (min_value_wrong, max_value_wrong)
        self.correct = (max_value_correct, min_value_correct)
        self.accuracy = AccuracyReward(column=column)

    def __call__(self, completions: list[str], **kwargs: Any) -> list[float | None]:
        right = self.accuracy(completions, **kwargs)
        out: list[float | None] = []
        for ok, n in zip(right, _lengths(completions, kwargs)):
            if ok is None:
                out.append(None)
                continue
            start, end = self.correct if ok else self.wrong
            x = min(n, self.max_len) / self.max_len
            out.append(end + (start - end) * (1 + math.cos(math.pi * x)) / 2)
        return out


@REWARDS.register("length")
class LengthReward:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13).

    0 up to ``max_len - cache`` tokens, then falling linearly to -1 at ``max_len``, -1 beyond:
    replies near the length limit are discouraged before they get truncated. ``max_len`` defaults
    to ``--max_completion_length``, ``cache`` to a fifth of it.
    """

    def __init__(self, max_len: int | None = None, cache: int | None = None, max_completion_length: int | None = None):
        self.max_len = max_len or max_completion_length or 1024
        self.cache = cache if cache is not None else max(1, self.max_len // 5)
        if not 0 < self.cache <= self.max_len:
            raise RewardError(f"reward 'length': cache ({self.cache}) must be in 1..max_len ({self.max_len})")

    def __call__(self, completions: list[str], **kwargs: Any) -> list[float]:
        free = self.max_len - self.cache
        return [0.0 if n <= free else (-1.0 if n > self.max_len else (free - n) / self.cache)
                for n in _lengths(completions, kwargs)]


@REWARDS.register("repetition")
class RepetitionReward:
    """N-gram repetition penalty (Yeo et al. 2025): ``max_penalty x (1 - distinct n-grams / n-grams)``.

    Words are split on whitespace; a reply shorter than ``ngram_size`` words gets 0. ``max_penalty``
    must be <= 0.
    """

    def __init__(self, ngram_size: int = 3, max_penalty: float = -1.0):
        if max_penalty > 0:
            raise RewardError(f"reward 'repetition': max_penalty must be <= 0, got {max_penalty}")
        if ngram_size < 1:
            raise RewardError(f"reward 'repetition': ngram_size must be >= 1, got {ngram_size}")
        self.n, self.max_penalty = ngram_size, max_penalty

    def __call__(self, completions: list[str], **kwargs: Any) -> list[float]:
        out = []
        for c in completions:
            words = (c or "").lower().split()
            grams = [tuple(words[i:i + self.n]) for i in range(len(words) - self.n + 1)]
            out.append(0.0 if not grams else self.max_penalty * (1 - len(set(grams)) / len(grams)))
        return out


# ----------------------------------------------------------------------------- reward models


class RewardModelScorer:
    """A sequence-classification reward model (an ``rlhf_type rm`` checkpoint) as a reward.

    ``path`` is a full checkpoint (``config.json`` of a ``*ForSequenceClassification``) or a LoRA
    checkpoint of one (its ``args.json`` names the base). Each completion is appended to its prompt
    as the assistant reply, rendered with the reward model's own chat template, and scored by the
    head at the last token, as the reward model was trained.
    """

    def __init__(self, path: str, *, device: str | None = None, batch_size: int = 16, torch_dtype: str = "auto"):
        self.name = f"rm_{_slug(path)}"
        self.model, self.template = _load_reward_model(path, device, torch_dtype)
        self.batch_size = batch_size
        self.device = next(self.model.parameters()).device

    def conversations(self, completions: list[str], prompts: list[list[dict]]) -> list[list[dict]]:
        return [[*p, {"role": "assistant", "content": c or ""}] for c, p in zip(completions, prompts)]

    def score_conversations(self, conversations: list[list[dict]], tools: list[Any] | None = None) -> list[float]:
        import torch

        from lmforge.trainers.collator import Collator

        collate = Collator(self.template.tokenizer.pad_token_id)
        out: list[float] = []
        for s in range(0, len(conversations), self.batch_size):
            rows = []
            for k, conv in enumerate(conversations[s:s + self.batch_size]):
                enc = self.template.encode({"messages": conv, "tools": tools[s + k] if tools else None})
                rows.append({"input_ids": enc["input_ids"], "labels": enc["input_ids"]})
            batch = collate(rows)
            with torch.no_grad():
                logits = self.model(input_ids=batch["input_ids"].to(self.device),
                                    attention_mask=batch["attention_mask"].to(self.device)).logits
            out += logits[:, 0].float().tolist()
        return out

    def __call__(self, completions: list[str], **kwargs: Any) -> list[float]:
        prompts = kwargs.get("prompts")
        if prompts is None:
            raise RewardError(f"reward {self.name}: the caller passed no 'prompts' to score the replies against")
        return self.score_conversations(self.conversations(completions, prompts), kwargs.get("tools"))


def _slug(path: str) -> str:
    from pathlib import Path

    p = Path(path)
    name = p.name if not p.name.startswith("checkpoint-") else f"{p.parent.name}-{p.name}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def _load_reward_model(path: str, device: str | None, torch_dtype: str) -> tuple[Any, Any]:
    """(model in eval mode, Template in train mode) for a reward-model checkpoint."""
    from pathlib import Path

    from lmforge.arguments import read_args_json
    from lmforge.model.hub import resolve_model_dir
    from lmforge.model.loader import default_device, load_tokenizer, resolve_dtype
    from lmforge.template import get_template

    device = device or default_device()
    folder = Path(path)
    train_args = read_args_json(folder) if folder.is_dir() else {}
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        from lmforge.model import get_model_tokenizer
        from lmforge.rlhf.reward_model import reward_model_from_causal_lm

        base = train_args.get("model")
        if not base:
            raise RewardError(f"--reward_model {path}: a LoRA checkpoint without an args.json naming its base model")
        causal, tokenizer = get_model_tokenizer(base, torch_dtype=torch_dtype, device=device)
        model = PeftModel.from_pretrained(reward_model_from_causal_lm(causal, tokenizer), str(folder))
    else:
        from transformers import AutoConfig, AutoModelForSequenceClassification

        folder = resolve_model_dir(path)
        config = AutoConfig.from_pretrained(str(folder))
        if not any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
            raise RewardError(f"--reward_model {path}: not a sequence-classification model (architectures "
                              f"{config.architectures}); train one with lmforge rlhf --rlhf_type rm")
        tokenizer = load_tokenizer(folder)
        model = AutoModelForSequenceClassification.from_pretrained(
            str(folder), dtype=resolve_dtype(torch_dtype, device, config)).to(device)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    template = get_template(tokenizer, train_args.get("template"), system=train_args.get("system"), max_length=None,
                            agent_template=train_args.get("agent_template"))
    template.set_mode("train")
    return model.eval().requires_grad_(False), template


# ----------------------------------------------------------------------------- building and scoring

_INTERNAL = ("prompts", "messages", "completion_lengths")


def _instantiate(name: str, obj: Any, kwargs: dict[str, Any], max_completion_length: int | None) -> RewardFn:
    if isinstance(obj, type):
        params = inspect.signature(obj.__init__).parameters
        kw = dict(kwargs)
        if "max_completion_length" in params and "max_completion_length" not in kw:
            kw["max_completion_length"] = max_completion_length
        try:
            return obj(**kw)
        except TypeError as e:
            raise RewardError(f"--reward_kwargs for reward {name!r}: {e}") from None
    if kwargs:
        raise RewardError(f"--reward_kwargs: reward {name!r} is a plain function and takes no settings")
    return obj


def build_reward_funcs(names: Sequence[str], *, reward_kwargs: dict[str, dict] | None = None,
                       reward_models: Sequence[str] = (), max_completion_length: int | None = None,
                       device: str | None = None) -> list[tuple[str, RewardFn]]:
    """``[(name, callable)]`` for ``--reward_funcs`` (registered names) then ``--reward_model`` paths."""
    reward_kwargs = dict(reward_kwargs or {})
    unused = set(reward_kwargs) - set(names)
    if unused:
        raise RewardError(f"--reward_kwargs names {sorted(unused)}, which are not in --reward_funcs {list(names)}")
    out: list[tuple[str, RewardFn]] = []
    for name in names:
        if name not in REWARDS:
            raise RewardError(f"--reward_funcs: {REWARDS.unknown_message(name)}")
        kw = reward_kwargs.get(name) or {}
        if not isinstance(kw, dict):
            raise RewardError(f"--reward_kwargs[{name!r}] must be a JSON object, got {kw!r}")
        out.append((name, _instantiate(name, REWARDS.get(name), kw, max_completion_length)))
    for path in reward_models:
        scorer = RewardModelScorer(path, device=device)
        out.append((scorer.name, scorer))
    if len({n for n, _ in out}) != len(out):
        raise RewardError(f"--reward_funcs/--reward_model: a reward is named twice ({[n for n, _ in out]})")
    return out


def score_completions(reward_funcs: Sequence[tuple[str, RewardFn]], completions: list[str],
                      columns: dict[str, list[Any]]) -> Any:
    """A float tensor [N, F]: reward f of completion n, NaN where a function returned None."""
    import torch

    n = len(completions)
    table = torch.full((n, len(reward_funcs)), float("nan"))
    for j, (name, fn) in enumerate(reward_funcs):
        try:
            values = list(fn(completions, **columns))
        except RewardError:
            raise
        except Exception as e:  # noqa: BLE001 - a user's reward: name it in the error
            raise RewardError(f"reward {name!r} failed: {type(e).__name__}: {e}") from e
        if len(values) != n:
            raise RewardError(f"reward {name!r} returned {len(values)} values for {n} completions")
        for i, v in enumerate(values):
            if v is not None:
                try:
                    table[i, j] = float(v)
                except (TypeError, ValueError):
                    raise RewardError(f"reward {name!r} returned {v!r} for completion {i}; expected a number or None") from None
    return table


def weighted_rewards(table: Any, weights: Sequence[float] | None) -> Any:
    """[N]: the weighted sum over functions, a NaN (not applicable) counted as 0; NaN where no function
    scored the completion at all (GRPO leaves such a completion out of its group's statistics)."""
    import torch

    w = torch.tensor(list(weights) if weights else [1.0] * table.shape[1], dtype=table.dtype)
    if w.numel() != table.shape[1]:
        raise RewardError(f"--reward_weights has {w.numel()} values for {table.shape[1]} rewards")
    total = torch.nan_to_num(table * w, nan=0.0).sum(dim=1)
    return torch.where(torch.isnan(table).all(dim=1), torch.full_like(total, float("nan")), total)
