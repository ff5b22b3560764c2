"""``preference``: collect people's feedback on answers, and turn it into preference data.

Feedback is one of two kinds, each a JSON line appended to a feedback file under a file lock (several
server workers or processes may write at once; nothing is ever rewritten):

- a choice between two answers: ``{"messages", "answers": [a, b], "choice": 0|1}`` -> a DPO pair
  ``{"messages": [..., chosen], "rejected_response": rejected}``;
- a rating of one answer: ``{"messages", "response", "rating": "up"|"down"}`` -> a KTO row
  ``{"messages": [..., response], "label": true|false}``.

``PreferenceAgent.compare`` samples the two answers a page shows side by side. ``preference_rows`` turns
the file into training rows for ``lmforge rlhf --rlhf_type dpo|kto`` (``lmforge preference train`` runs
the rounds, see ``lmforge.toolkit.preference_rounds``), holding out every ``holdout``-th record (by a
hash of its id, so a record stays on its side as the file grows) to evaluate each round against the last.
"""
from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from lmforge.agents.base import Agent, AgentError, AgentReply, check_messages
from lmforge.registry import AGENTS

RATINGS = {"up": True, "down": False}


class FeedbackStore:
    """An append-only JSONL of feedback records, written under ``<file>.lock``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def _lock(self) -> Any:
        from filelock import FileLock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.path) + ".lock", timeout=30)

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        record = validate_feedback(record)
        record.setdefault("id", uuid.uuid4().hex)
        record.setdefault("time", time.strftime("%Y-%m-%dT%H:%M:%S"))
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock():
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
        return record

    def records(self) -> Iterator[dict[str, Any]]:
        if not self.path.is_file():
            return
        with self.path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield validate_feedback(json.loads(line))
                except (json.JSONDecodeError, AgentError) as e:
                    raise AgentError(f"{self.path}:{n}: {e}") from None

    def stats(self) -> dict[str, int]:
        out = {"choices": 0, "ratings": 0, "up": 0, "down": 0}
        for r in self.records():
            if "choice" in r:
                out["choices"] += 1
            else:
                out["ratings"] += 1
                out["up" if r["rating"] == "up" else "down"] += 1
        return out


def validate_feedback(record: Any) -> dict[str, Any]:
    """A feedback record checked field by field (the error names the field)."""
    if not isinstance(record, dict):
        raise AgentError("feedback: expected a JSON object")
    out = {k: v for k, v in record.items() if k in ("id", "time", "agent", "round", "meta")}
    for key in ("id", "time", "agent"):
        if key in out and not (isinstance(out[key], str) and 0 < len(out[key]) <= 100):
            raise AgentError(f"feedback.{key}: expected a string of at most 100 characters")
    if "meta" in out and not (isinstance(out["meta"], dict) and len(json.dumps(out["meta"])) <= 4096):
        raise AgentError("feedback.meta: expected a JSON object of at most 4 KB")
    out["messages"] = check_messages(record.get("messages"))
    if "choice" in record or "answers" in record:
        answers = record.get("answers")
        if not (isinstance(answers, list) and len(answers) == 2 and all(isinstance(a, str) for a in answers)):
            raise AgentError("feedback.answers: expected two answer strings")
        if record.get("choice") not in (0, 1) or isinstance(record.get("choice"), bool):
            raise AgentError("feedback.choice: expected 0 or 1 (the index of the preferred answer)")
        if answers[0] == answers[1]:
            raise AgentError("feedback.answers: the two answers are the same; there is nothing to prefer")
        out.update(answers=answers, choice=record["choice"])
    elif "rating" in record:
        if record["rating"] not in RATINGS:
            raise AgentError("feedback.rating: expected 'up' or 'down'")
        if not isinstance(record.get("response"), str):
            raise AgentError("feedback.response: expected the rated answer as a string")
        out.update(response=record["response"], rating=record["rating"])
    else:
        raise AgentError("feedback: expected either {answers: [a, b], choice} or {response, rating}")
    return out


def held_out(record: dict[str, Any], holdout: int) -> bool:
    """Every ``holdout``-th record (by a hash of its id) is kept for evaluation; 0 holds out nothing."""
    if holdout <= 0:
        return False
    return int(hashlib.sha256(str(record["id"]).encode()).hexdigest(), 16) % holdout == 0


def preference_rows(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """Training rows: ``dpo`` wants pairs (choices, and an up and a down rating of the same conversation);
    ``kto`` takes every judgement as a labelled row (a choice gives one of each)."""
    rows: list[dict[str, Any]] = []
    ups: dict[str, list[str]] = {}
    downs: dict[str, list[str]] = {}
    for r in records:
        msgs = r["messages"]
        if "choice" in r:
            chosen, rejected = r["answers"][r["choice"]], r["answers"][1 - r["choice"]]
            if kind == "dpo":
                rows.append({"messages": [*msgs, {"role": "assistant", "content": chosen}], "rejected_response": rejected})
            else:
                rows += [{"messages": [*msgs, {"role": "assistant", "content": chosen}], "label": True},
                         {"messages": [*msgs, {"role": "assistant", "content": rejected}], "label": False}]
        else:
            if kind == "kto":
                rows.append({"messages": [*msgs, {"role": "assistant", "content": r["response"]}],
                             "label": RATINGS[r["rating"]]})
            else:
                key = json.dumps(msgs, sort_keys=True)
                (ups if r["rating"] == "up" else downs).setdefault(key, []).append(r["response"])
    for key, good in ups.items():  # dpo: pair the up and down ratings of the same conversation
        for a, b in zip(good, downs.get(key, [])):
            rows.append({"messages": [*json.loads(key), {"role": "assistant", "content": a}], "rejected_response": b})
    return rows


@AGENTS.register("preference")
class PreferenceAgent(Agent):
    """Answers like a plain chat, and offers two sampled answers to choose from (``compare``); feedback goes
    to ``feedback_file``."""

    name = "preference"
    description = "chat that learns from feedback: thumbs up/down or a choice between two answers"

    def __init__(self, generator: Any, *, feedback_file: str | Path | None = None, compare_temperature: float = 1.0,
                 **settings: Any):
        super().__init__(generator, **settings)
        if feedback_file is None:
            raise AgentError("agent preference: pass --feedback_file (a JSONL the feedback is appended to)")
        self.store = FeedbackStore(feedback_file)
        self.compare_temperature = float(compare_temperature)

    def compare(self, messages: list[dict[str, Any]], seed: int | None = None) -> dict[str, Any]:
        """Two answers sampled for the same conversation (asked again up to 3 times until they differ)."""
        messages = check_messages(messages)
        for attempt in range(3):
            answers = self._generate(messages, n=2, temperature=self.compare_temperature,
                                     seed=None if seed is None else seed + attempt)
            if len(answers) == 2 and answers[0] != answers[1]:
                break
        return {"messages": messages, "answers": answers, "differ": answers[0] != answers[1]}

    def record(self, feedback: dict[str, Any]) -> dict[str, Any]:
        return self.store.append({**feedback, "agent": self.name})

    def chat(self, messages: list[dict[str, Any]]) -> AgentReply:
        messages = check_messages(messages)
        return AgentReply(self._generate(messages)[0], meta={"feedback": "POST /v1/agents/preference/feedback"})

    def info(self) -> dict[str, Any]:
        return {**super().info(), "feedback_file": str(self.store.path), **self.store.stats()}
