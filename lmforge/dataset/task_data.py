"""Built-in data for the task types: ``builtin:arith-retrieval`` (embedding, rerankers) and ``builtin:intents``
(classifiers), written here, deterministic, each with a held-out ``test`` split.

``arith-retrieval``: the query is an arithmetic question, its document the worked answer
(``37 + 45 = 77 + 5 = 82``), and the negatives are first four worked answers of near-miss problems
(one operand off by one, the operands swapped, the other operation, a number with its digits
reversed), then two of random other problems of the split. Telling the near misses apart takes
reading every number in order, so a model that has not learnt the task is near chance and one that
has is near perfect; the random ones are easy negatives. Problems are split as ``builtin:arith``
splits them, so held-out queries are problems no arithmetic training set of lmforge contains.

``intents``: requests to an assistant in four classes (math, weather, time, identity), drawn from
templates with slots filled; many start alike ("What is ..."), so a classifier must read on.
Rows are assigned to ``test`` by a hash of their text.

``intent-retrieval``: the same requests as queries, and as documents descriptions of the four
skills that handle them (several wordings each): the positive describes the request's skill, the
negatives the three others. It is the reranking task a small cross-encoder learns from scratch on a
CPU in a minute: measured here, builtin:tiny as a cross-encoder stays at chance on arith-retrieval's
near misses after 260 steps (comparing numbers across the pair is a circuit it must first build),
while embedding models learn those from the first steps.
"""
from __future__ import annotations

import hashlib
import random

from lmforge.dataset.builtin import BuiltinContext, BuiltinDataset, arith_in_test_split
from lmforge.registry import DATASETS

RETRIEVAL_QUESTIONS = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "How much is {a} {op} {b}?",
                       "Work out {a} {op} {b}.")
NEGATIVES_PER_ROW = 4  # near misses; then RANDOM_NEGATIVES answers of random other problems
RANDOM_NEGATIVES = 2


def worked_answer(a: int, op: str, b: int) -> str:
    """``37 + 45 = 77 + 5 = 82``: the tens of the second number first, then its ones."""
    tens, ones = b - b % 10, b % 10
    step = a + tens if op == "+" else a - tens
    result = a + b if op == "+" else a - b
    return f"{a} {op} {b} = {step} {op} {ones} = {result}"


def _valid(a: int, op: str, b: int) -> bool:
    return 0 <= a <= 99 and 0 <= b <= 99 and (op == "+" or a >= b)


def near_misses(a: int, op: str, b: int, k: int = NEGATIVES_PER_ROW) -> list[tuple[int, str, int]]:
    """``k`` problems that differ from ``a op b`` in one small way, chosen by a seed of the problem."""
    other = "-" if op == "+" else "+"
    candidates = [(a + 1, op, b), (a - 1, op, b), (a, op, b + 1), (a, op, b - 1), (b, op, a), (a, other, b),
                  (int(str(a)[::-1]), op, b), (a, op, int(str(b)[::-1]))]
    seen, out = {(a, op, b)}, []
    for c in candidates:
        if _valid(*c) and c not in seen:
            seen.add(c)
            out.append(c)
    rng = random.Random(f"near-miss:{a}{op}{b}")
    rng.shuffle(out)
    return out[:k]


def generate_arith_retrieval(split: str = "train", seed: int = 0) -> list[dict]:
    """Every ``a + b`` and ``a - b`` (``a >= b``) with operands in 0..99 of ``split``, shuffled by ``seed``."""
    if split not in ("train", "test"):
        raise ValueError(f"arith-retrieval split must be 'train' or 'test', got {split!r}")
    problems = [(a, op, b) for op in ("+", "-") for a in range(100) for b in range(100)
                if _valid(a, op, b) and arith_in_test_split(a, op, b) == (split == "test")]
    rows = []
    for a, op, b in problems:
        phrase = RETRIEVAL_QUESTIONS[int(hashlib.sha256(f"{a}{op}{b}".encode()).hexdigest(), 16) % 4]
        others = [p for p in random.Random(f"random:{a}{op}{b}").sample(problems, RANDOM_NEGATIVES + 1)
                  if p != (a, op, b)][:RANDOM_NEGATIVES]
        rows.append({"query": phrase.format(a=a, op=op, b=b), "response": worked_answer(a, op, b),
                     "rejected_response": [worked_answer(*c) for c in [*near_misses(a, op, b), *others]]})
    random.Random(seed).shuffle(rows)
    return rows


# ------------------------------------------------------------------------------------------ intents

_CITIES = ("Paris", "London", "Berlin", "Rome", "Madrid", "Tokyo", "Beijing", "Cairo", "Lima", "Oslo", "Dublin",
           "Vienna", "Prague", "Lisbon", "Athens", "Delhi", "Seoul", "Sydney", "Toronto", "Boston", "Chicago",
           "Denver", "Miami", "Nairobi", "Lagos", "Dubai", "Bangkok", "Manila")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "Christmas", "New Year")
_GREETINGS = ("", "Hi, ", "Hello! ", "Hey, ", "Quick question: ", "Excuse me, ", "Please tell me: ", "Hi there. ",
              "Good morning! ", "I wonder: ", "One thing: ", "Sorry to bother you, ")
_ENDINGS = ("", " Thanks!", " Just curious.", " I'd like to know.", " Please answer briefly.")
_NAMES = ("ChatGPT", "Claude", "Siri", "Alexa", "Qwen", "Llama", "Gemini", "Cortana", "Jarvis", "HAL")
_COMPANIES = ("OpenAI", "Google", "Meta", "Apple", "Amazon", "Microsoft", "Alibaba", "IBM")
INTENT_TEMPLATES = {
    "math": ("What is {a} plus {b}?", "What is {a} times {b}?", "Calculate {a} - {b}.", "How much is {a} + {b}?",
             "Can you add {a} and {b}?", "Subtract {b} from {a}.", "What do you get if you multiply {a} by {b}?",
             "Is {a} divided by {b} more than {c}?", "What is the square of {a}?", "Sum {a}, {b} and {c}."),
    "weather": ("What is the weather in {city}?", "Will it rain in {city} tomorrow?", "How hot is it in {city}?",
                "Is it sunny in {city} today?", "Do I need an umbrella in {city} on {day}?",
                "What is the forecast for {city} this week?", "How cold will it get in {city} tonight?",
                "Is there snow in {city}?", "What is the temperature in {city} right now?"),
    "time": ("What time is it in {city}?", "What is the date today?", "How many days until {day}?",
             "What day of the week is {day} this year?", "When does the sun set in {city}?",
             "What is the time difference between {city} and {city2}?", "How long is it until {a} o'clock?",
             "Which day comes after {day}?", "What is the current time in {city}?"),
    "identity": ("Who are you?", "What is your name?", "Who made you?", "Are you a human?", "What are you?",
                 "Who trained you?", "Tell me about yourself.", "What should I call you?", "Are you a robot?",
                 "Which company built you?", "Do you have a name?", "Are you {name}?", "Were you made by {company}?",
                 "Is your name {name}?", "Did {company} train you?", "Are you related to {name}?",
                 "Do you work for {company}?"),
}
INTENT_SIZES = {"train": 2000, "test": 400}


def _intent_in_test(text: str) -> bool:
    return int.from_bytes(hashlib.sha256(f"intents:{text}".encode()).digest()[:4], "big") % 1000 < 150


def generate_intents(split: str = "train", seed: int = 0) -> list[dict]:
    """``INTENT_SIZES[split]`` distinct requests ``{"query": ..., "label": "math"|"weather"|"time"|"identity"}``,
    the classes in equal shares; a request text belongs to one split only."""
    if split not in INTENT_SIZES:
        raise ValueError(f"intents split must be 'train' or 'test', got {split!r}")
    n, rng = INTENT_SIZES[split], random.Random(f"intents:{seed}:{split}")
    labels = sorted(INTENT_TEMPLATES)
    rows: list[dict] = []
    seen: set[str] = set()
    while len(rows) < n:
        label = labels[len(rows) % len(labels)]
        cities = rng.sample(_CITIES, 2)
        text = rng.choice(_GREETINGS) + rng.choice(INTENT_TEMPLATES[label]).format(
            a=rng.randint(2, 99), b=rng.randint(2, 99), c=rng.randint(2, 99), city=cities[0], city2=cities[1],
            day=rng.choice(_DAYS), name=rng.choice(_NAMES), company=rng.choice(_COMPANIES)) + rng.choice(_ENDINGS)
        if text in seen or _intent_in_test(text) != (split == "test"):
            continue
        seen.add(text)
        rows.append({"query": text, "label": label})
    rng.shuffle(rows)
    return rows


SKILLS = {
    "math": ("Calculator for sums and products.", "Does arithmetic with numbers.", "Solves math problems.",
             "Works out calculations."),
    "weather": ("Weather forecasts for any city.", "Tells if it is hot, cold or rainy.",
                "Current weather and forecasts.", "Rain, snow and temperature lookup."),
    "time": ("Clock and calendar with time zones.", "Tells the time and the date.", "Counts days until a date.",
             "World clock and calendar."),
    "identity": ("Answers questions about the assistant.", "Tells the assistant's name and maker.",
                 "Describes this AI and who built it.", "About the assistant itself."),
}


def generate_intent_retrieval(split: str = "train", seed: int = 0) -> list[dict]:
    """The ``intents`` requests with a description of their skill as the positive and one of each other skill's
    as the negatives (wordings drawn by a seed of the request)."""
    rows = []
    for row in generate_intents(split, seed):
        rng = random.Random(f"skills:{row['query']}")
        others = [rng.choice(SKILLS[k]) for k in sorted(SKILLS) if k != row["label"]]
        rows.append({"query": row["query"], "response": rng.choice(SKILLS[row["label"]]), "rejected_response": others})
    return rows


def _load_retrieval(split: str, ctx: BuiltinContext) -> list[dict]:
    return generate_arith_retrieval(split)


def _load_intents(split: str, ctx: BuiltinContext) -> list[dict]:
    return generate_intents(split)


def _load_intent_retrieval(split: str, ctx: BuiltinContext) -> list[dict]:
    return generate_intent_retrieval(split)


DATASETS.register("arith-retrieval", BuiltinDataset(
    "arith-retrieval", _load_retrieval, splits=("train", "test"),
    description="retrieval/reranking: 'What is 37 + 45?' -> its worked answer, with 4 near-miss worked answers and 2 "
                "random ones as negatives (query/response/rejected_response); test: the problems builtin:arith holds "
                "out", version="2"))
DATASETS.register("intents", BuiltinDataset(
    "intents", _load_intents, splits=("train", "test"),
    description="classification: 2,000 requests labelled math, weather, time or identity (query/label); "
                "test: 400 held-out requests"))
DATASETS.register("intent-retrieval", BuiltinDataset(
    "intent-retrieval", _load_intent_retrieval, splits=("train", "test"),
    description="reranking: the intents requests as queries, a description of the skill that handles each as the "
                "positive and of the three other skills as negatives; test: the 400 held-out requests"))
