"""``builtin:rag-reader``: teach a model to answer from retrieved passages, in the rag agent's own prompt.

Each row is what ``RagAgent.prompt`` builds: the agent's system prompt followed by numbered passages
(``[1] (file.md) text``), then the question; the answer is a span copied from one passage. The documents
are made up per row (invented names, random numbers, times and places, shuffled nouns), chunked by the
index's own ``chunk_text``, and the passages are the chunk holding the answer plus distractor chunks of
the same kinds of facts, so the only way to answer is to find the sentence the question is about and copy
the value of the kind the question asks for (how much, when, who, where, which). Nothing here comes from
a shipped document set: a model trained on it answers questions about documents it has never seen.

Rows carry ``solution`` (the span) and ``source`` (the file it is in). ``train`` and ``test`` are drawn from
different seeds; ``generate_rag_reader(split, n, seed)`` makes any number.
"""
from __future__ import annotations

import random
import textwrap

NOUNS = ("generator", "boiler", "pump", "freezer", "workshop", "library", "archive", "greenhouse", "antenna",
         "telescope", "laboratory", "kitchen", "garage", "warehouse", "clinic", "office", "hangar", "sauna",
         "gym", "laundry", "radio", "printer", "heater", "furnace", "compressor", "crane", "ferry", "tractor",
         "snowplough", "drone", "sensor", "camera", "battery", "tank", "valve", "boat", "bus", "van", "lift",
         "shed", "depot", "cellar", "tower", "bridge", "harbour", "runway", "chapel", "school", "museum", "kiosk",
         "bakery", "canteen", "pharmacy", "studio", "theatre", "mast", "turbine", "filter", "scanner", "locker",
         "kettle", "oven", "dryer", "ladder", "trailer", "sled", "tent", "cabin", "dormitory", "pool", "stable",
         "barn", "mill", "press", "forge", "loom", "engine", "well", "fountain", "clock", "bell", "lantern")
ADJS = ("old", "new", "main", "north", "south", "east", "west", "upper", "lower", "small", "large", "spare",
        "outer", "inner", "blue", "green", "central", "second", "back", "front", "night", "summer", "winter",
        "public", "private", "mobile", "electric", "wooden", "steel", "heavy")
UNITS = ("litres", "kilograms", "days", "metres", "hours", "minutes", "weeks", "kilometres", "people", "boxes",
         "tonnes", "kilowatt-hours", "metres per second", "litres per hour", "megabits per second", "crates",
         "seats", "beds", "sacks", "bottles", "degrees", "watts", "pages", "parcels", "euros")
THINGS = ("cabinet", "box", "drawer", "container", "shelf", "crate", "cupboard", "locker", "basket", "chest")
COLOURS = ("red", "yellow", "green", "blue", "white", "black", "grey", "orange", "brown", "purple")
PREPS = ("beside", "behind", "near", "under", "in front of", "next to", "opposite")
VERBS = ("tested", "cleaned", "checked", "inspected", "emptied", "serviced", "painted", "repaired", "refilled",
         "replaced", "updated", "counted", "opened", "locked", "moved", "weighed")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_ON, _OFF = "bdfghklmnprstvz", "aeiou"


def _name(rng: random.Random) -> str:
    word = "".join(rng.choice(_ON) + rng.choice(_OFF) for _ in range(rng.randint(2, 3)))
    return word.capitalize() + rng.choice(("", "n", "r", "s", "l"))


def _person(rng: random.Random) -> str:
    return ("Dr. " if rng.random() < 0.2 else "") + f"{_name(rng)} {_name(rng)}"


def _clock(rng: random.Random) -> str:
    return f"{rng.randrange(24):02d}:{rng.choice((0, 15, 30, 45)):02d}"


def _when(rng: random.Random) -> str:
    return rng.choice((
        lambda: f"every {rng.choice(DAYS)}", lambda: f"every {rng.choice(DAYS)} at {_clock(rng)}",
        lambda: f"every night at {_clock(rng)}", lambda: f"every {rng.randint(2, 59)} minutes",
        lambda: f"every {rng.choice(('two', 'three', 'four', 'six', 'eight'))} weeks",
        lambda: f"the first day of each month", lambda: f"{rng.choice(('once', 'twice', 'three times'))} a day",
        lambda: f"at {_clock(rng)}", lambda: f"after {_clock(rng)}"))()


def _place(rng: random.Random, thing: str) -> str:
    return f"the {rng.choice(COLOURS)} {rng.choice(THINGS)} {rng.choice(PREPS)} the {thing}"


def _fact(rng: random.Random, subject: str, other: str) -> tuple[str, list[str], str]:
    """One sentence about ``subject``, the questions it answers, and the answer span."""
    kind = rng.randrange(9)
    if kind == 0:
        v = f"{rng.randint(2, 999)} {rng.choice(UNITS)}"
        return (f"The {subject} has a capacity of {v}.",
                [f"What is the capacity of the {subject}?", f"How much can the {subject} hold?"], v)
    if kind == 1:
        unit, n = rng.choice(UNITS), rng.randint(2, 999)
        return (f"Each {subject} is allowed {n} {unit} per day.",
                [f"How many {unit} may each {subject} use per day?", f"How much is each {subject} allowed per day?"],
                f"{n} {unit}")
    if kind == 2:
        v = f"{rng.randint(2, 99)} {rng.choice(UNITS)}"
        return (f"The {subject} is stopped when the {other} exceeds {v}.",
                [f"At what {other} is the {subject} stopped?", f"When is the {subject} stopped?"], v)
    if kind == 3:
        verb, v = rng.choice(VERBS), _when(rng)
        return (f"The {subject} is {verb} {v}.",
                [f"When is the {subject} {verb}?", f"How often is the {subject} {verb}?"], v)
    if kind == 4:
        a, b = _clock(rng), _clock(rng)
        return (f"The {subject} is open from {a} to {b} on weekdays.",
                [f"What are the opening hours of the {subject}?", f"When is the {subject} open?"], f"{a} to {b}")
    if kind == 5:
        p = _person(rng)
        return (rng.choice((f"Requests for the {subject} are approved by {p}.", f"The {subject} is run by {p}.")),
                [f"Who approves requests for the {subject}?", f"Who is in charge of the {subject}?"], p)
    if kind == 6:
        p, role = _person(rng), rng.choice(("coordinator", "manager", "leader", "engineer", "officer"))
        return (f"Questions about the {subject} go to the {other} {role}, {p}.",
                [f"Who do I ask about the {subject}?", f"Who is the {other} {role}?"], p)
    if kind == 7:
        where = _place(rng, other)
        return (rng.choice((f"The {subject} is kept in {where}.",
                            f"Spare parts for the {subject} are stored in {where}.")),
                [f"Where is the {subject} kept?", f"Where are the spare parts for the {subject}?"], where)
    code = f"{rng.choice(('channel', 'room', 'gate', 'platform', 'line'))} {rng.randint(1, 40)}"
    return (f"The {subject} is reached on {code}.", [f"Which {code.split()[0]} reaches the {subject}?",
                                                     f"How do I reach the {subject}?"], code)


def _document(rng: random.Random) -> tuple[str, str, list[tuple[str, str]]]:
    """A made-up document: file name, text (title, wrapped paragraphs), and its (question, answer) pairs."""
    subjects = rng.sample(NOUNS, 6)
    title = f"{rng.choice(ADJS).capitalize()} {rng.choice(NOUNS)} {rng.choice(('rules', 'guide', 'notes', 'handbook'))}"
    paragraphs, qa = [], []
    for para in (subjects[:3], subjects[3:]):
        sentences = []
        for subject in para[:rng.randint(2, 3)]:
            adj_subject = f"{rng.choice(ADJS)} {subject}" if rng.random() < 0.5 else subject
            sentence, questions, answer = _fact(rng, adj_subject, rng.choice(NOUNS))
            sentences.append(sentence)
            qa.append((rng.choice(questions), answer))
        paragraphs.append(textwrap.fill(" ".join(sentences), width=rng.randint(90, 105)))
    name = f"{title.split()[1]}-{title.split()[2]}.md"
    return name, f"# {title}\n\n" + "\n\n".join(paragraphs) + "\n", qa


def _norm(text: str) -> str:
    return " ".join(text.split())


def generate_rag_reader(split: str = "train", n: int = 20000, seed: int = 0, chunk_size: int = 200,
                        chunk_overlap: int = 50, max_turns: int = 3,
                        passage_counts: tuple[int, ...] = (1, 1, 2, 2, 2, 3)) -> list[dict]:
    """``n`` rows (see the module docstring); ``train`` and ``test`` never share a seed.

    A row asks up to ``max_turns`` questions about the same passages (each answered by exactly one of them),
    so one long prompt carries several answers to learn from; its first turn is a whole single-question
    agent prompt, and ``solution``/``source`` are that turn's. The number of passages is drawn from
    ``passage_counts``."""
    from lmforge.agents.index import chunk_text
    from lmforge.agents.rag import DEFAULT_SYSTEM, system_prompt

    if split not in ("train", "test"):
        raise ValueError(f"rag-reader split must be 'train' or 'test', got {split!r}")
    rng, rows = random.Random(f"rag-reader:{split}:{seed}"), []
    while len(rows) < n:
        docs = [_document(rng) for _ in range(2)]
        chunks = [{"source": name, "text": text[s:e], "norm": _norm(text[s:e])} for name, text, _ in docs
                  for s, e in chunk_text(text, chunk_size, chunk_overlap) if not text[s:e].startswith("#")]
        qa = [pair for _, _, pairs in docs for pair in pairs]
        k = rng.choice(passage_counts)
        passages = rng.sample(chunks, min(k, len(chunks)))
        answerable = [(q, a, [p for p in passages if a in p["norm"]]) for q, a in qa]
        answerable = [(q, a, held[0]) for q, a, held in answerable if len(held) == 1]
        if not answerable or len({q for q, _, _ in answerable}) < len(answerable):
            continue
        turns = rng.sample(answerable, min(len(answerable), rng.randint(1, max_turns)))
        messages = [{"role": "system", "content": system_prompt(DEFAULT_SYSTEM, passages)}]  # RagAgent.prompt's
        for q, a, _ in turns:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        rows.append({"messages": messages, "solution": turns[0][1], "source": turns[0][2]["source"]})
    return rows


def reader_answer_correct(text: str | None, solution: str) -> bool:
    """The reply holds the span (case and whitespace aside) and is not much longer: copying a whole
    passage does not count."""
    if text is None:
        return False
    got, want = _norm(text).lower().rstrip(". "), _norm(solution).lower()
    return want in got and len(got) <= len(want) + 24
