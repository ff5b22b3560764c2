"""``builtin:rag-reader``: teach a model to answer from retrieved passages, in the rag agent's own prompt.

Each row is what ``RagAgent.prompt`` builds: the agent's system prompt followed by numbered passages
(``[1] (file.md) text``), then the question; the answer is a span copied from one passage. The documents
are made up per row, chunked by the index's own ``chunk_text``, and the passages are the chunk holding the
answer plus chunks that share words with the question (as a retriever's near misses do), in any order.

A reader trained on one phrasing learns that phrasing's shape, not copying: it answers "2 kilowatt-hours"
where the text says "480", because its documents always put a number there. So the documents vary as real
ones do: prose whose sentences state the value before or after the subject, in the active or the passive,
one to three facts a sentence, a pronoun for the subject; bullet lists, ``Label: value`` blocks under a
heading, tables as text; markdown or plain headings; wrapped or long lines. Values vary in kind and form
(``rag_facts``, ``rag_lexicon``): quantities of a dozen dimensions with or without units, decimals and
ranges, times in several conventions, dates, schedules, people, places of any length, reasons, routes.
Subjects share words (the north kiln, the south kiln) so the question, not a word match, picks the fact.

Nothing here comes from a shipped document set (``tests/test_rag_reader.py`` checks the station documents
against the generated text): a model trained on it answers questions about documents it has never seen.
Rows carry ``solution`` (the first answer) and ``source`` (its file); ``train`` and ``test`` are drawn from
different seeds; ``generate_rag_reader(split, n, seed)`` makes any number.
"""
from __future__ import annotations

import random
import re
import textwrap
from dataclasses import dataclass

from lmforge.dataset import rag_lexicon as lx
from lmforge.dataset.rag_facts import KINDS_FOR, SUPPLIES, Fact, cap, make_fact, pick_kind

TYPES = ("object", "venue", "event", "request", "role", "supply", "activity")
TYPE_WEIGHTS = (6, 5, 4, 2, 1, 1, 1)
EVENT_ADJS = ("weekly", "monthly", "annual", "summer", "winter", "spring", "autumn", "junior", "senior", "Friday",
              "evening", "morning", "members'", "lunchtime", "open")
REQUEST_ADJS = ("urgent", "late", "staff", "student", "group", "weekend", "overseas")
HEADINGS = {"object": ("Equipment", "Machines", "Kit", "Tools and equipment", "What we have"),
            "venue": ("Facilities", "Rooms", "Places", "Around the site", "Spaces"),
            "event": ("Events", "What's on", "Calendar", "Activities", "Programme"),
            "request": ("Requests", "Forms and approvals", "Admin", "Paperwork"),
            "role": ("People", "Contacts", "Who's who", "Staff"),
            "supply": ("Supplies", "Deliveries", "Stock"), "activity": ("Rules", "Before you start", "Safety")}
TITLES = ("{P} {V} handbook", "Notes for {g}", "{V} guide", "Welcome to {P}", "House rules", "Information for {g}",
          "{P} {V}: the basics", "FAQ", "{P} newsletter", "About the {v}", "{P} {V} notes", "Practical information",
          "Guide for {g}", "{P} site manual", "Things to know")
GROUPS = ("new members", "volunteers", "visitors", "staff", "guests", "students", "tenants", "crew", "parents")


@dataclass
class Shown:
    """One fact as it appears in a document: the span to copy and what the answering passage must contain."""
    fact: Fact
    span: str
    anchors: tuple[str, ...]
    template: str
    style: str
    doc: str = ""


class _Row:
    """The made-up world of one row: its subjects, people and roles, each used once."""

    def __init__(self, rng: random.Random):
        self.rng, self.subjects, self.names, self.roles, self.keys = rng, {}, set(), set(), set()
        self.types = rng.choices(TYPES, TYPE_WEIGHTS, k=3)  # the row's documents talk about the same things

    def role(self) -> str:
        for _ in range(20):
            r = self.rng.choice(lx.ROLES)
            if r not in self.roles:
                break
        self.roles.add(r)
        return r

    def person(self) -> str:
        p = lx.person(self.rng)
        while p in self.names:
            p = lx.person(self.rng)
        self.names.add(p)
        return p

    def other_venue(self) -> str:
        return f"the {self.rng.choice(lx.VENUES)}"

    def subject(self, kind: str) -> str | None:
        """A new subject of ``kind``; often a sibling of one already in the row (same noun, other modifier)."""
        rng = self.rng
        for _ in range(10):
            same = [s for s, k in self.subjects.items() if k == kind]
            s = self._subject(kind, _head(rng.choice(same)) if same and rng.random() < 0.55 else None)
            low = core(s).lower()  # no subject inside another: "the kiln" would be ambiguous beside "the north kiln"
            if s and not any(low in core(o).lower() or core(o).lower() in low for o in self.subjects):
                if kind == "role":
                    self.roles.add(s[4:])
                self.subjects[s] = kind
                return s
        return None

    def _subject(self, kind: str, head: str | None) -> str:
        rng, r = self.rng, self.rng.random()
        if kind == "object":
            head = head or rng.choice(lx.OBJECTS)
            if r < 0.2:
                return f"the {head}"
            if r < 0.35:
                return f"{head} {rng.randint(1, 12)}"
            if r < 0.5:
                return f"the {lx.word(rng)} {head}"
            if r < 0.62:
                return f"the {head} in the {rng.choice(lx.VENUES)}"
            return f"the {rng.choice(lx.SIDES + lx.COLOURS + lx.SIZES)} {head}"
        if kind == "venue":
            head = head or rng.choice(lx.VENUES)
            if r < 0.35:
                return f"the {head}"
            if r < 0.6:
                return f"the {rng.choice(lx.SIDES)} {head}"
            return f"the {lx.word(rng)} {head}" if r < 0.8 else f"{lx.word(rng)} {head.title()}"
        if kind == "event":
            head = head or rng.choice(lx.EVENTS)
            if r < 0.4:
                return f"the {head}"
            return f"the {rng.choice(EVENT_ADJS)} {head}" if r < 0.8 else f"the {lx.word(rng)} {head}"
        if kind == "request":
            head = head or rng.choice(lx.REQUESTS)
            return head if r < 0.6 else f"{rng.choice(REQUEST_ADJS)} {head}"
        if kind == "role":
            return f"the {rng.choice([x for x in lx.ROLES if x not in self.roles] or lx.ROLES)}"
        if kind == "supply":
            return f"the {rng.choice(SUPPLIES)}"
        if r < 0.6:
            return rng.choice(lx.ACTIVITIES)
        return rng.choice((f"using the {rng.choice(lx.OBJECTS)}", f"working in the {rng.choice(lx.VENUES)}",
                           f"joining the {rng.choice(lx.EVENTS)}", f"booking the {rng.choice(lx.VENUES)}"))

    def fact(self, subject: str, kind: str | None = None, variant: str | None = None,
             key: str | None = None) -> Fact | None:
        """A new fact about ``subject`` whose question no other fact of the row answers."""
        for _ in range(8):
            k = kind or pick_kind(self.rng, self.subjects[subject])
            f = make_fact(self.rng, k, subject, self, variant)
            if (subject, f.key) not in self.keys and (key is None or f.key == key):
                self.keys.add((subject, f.key))
                return f
        return None


_HEADS = sorted(lx.OBJECTS + lx.VENUES + lx.EVENTS + lx.REQUESTS, key=len, reverse=True)


def _head(subject: str) -> str:
    """The noun a sibling shares: ``the north kiln`` -> ``kiln``; ``kiln 2`` -> ``kiln``."""
    low = subject.lower()
    return next((noun for noun in _HEADS if noun in low), subject.split()[-1])


def core(subject: str) -> str:
    """The subject without its article, as a heading, list item or table row names it."""
    return subject.removeprefix("the ")


# ----------------------------------------------------------------------------- document sections
def _prose(row: _Row, subjects: list[str]) -> tuple[list[str], list[Shown]]:
    """Sentences of one to three facts: joined predicates, other sentence shapes, a pronoun now and then."""
    rng, sentences, shown = row.rng, [], []
    facts = {s: [f for f in (row.fact(s) for _ in range(rng.choice((1, 1, 2, 2, 3)))) if f] for s in subjects}
    singles = [s for s in subjects if len(facts[s]) == 1]
    if len(singles) >= 2 and rng.random() < 0.3:  # two subjects in one sentence
        a, b = rng.sample(singles, 2)
        (fa,), (fb,) = facts.pop(a), facts.pop(b)
        pa, pb = rng.choice(fa.preds), rng.choice(fb.preds)
        (ta, sa), (tb, sb) = fa.render("{Sc} " + pa), fb.render("{S} " + pb)
        glue = rng.choice((", while ", "; ", " and ", ", whereas "))
        sentences.append(f"{ta}{glue}{tb}.")
        shown += [Shown(fa, sa, (core(a),), "pred:" + pa, "prose:two-subjects"),
                  Shown(fb, sb, (core(b),), "pred:" + pb, "prose:two-subjects")]
    for s, fs in facts.items():
        rng.shuffle(fs)
        if len(fs) >= 2 and rng.random() < 0.45:
            picked = [rng.choice(f.preds) for f in fs]
            parts = [f.render(t) for f, t in zip(fs, picked)]
            preds = [p for p, _ in parts]
            shape = rng.randrange(3) if len(fs) == 2 else 3
            body = (f"{preds[0]} and {preds[1]}", f"{preds[0]}, and {preds[1]}",
                    f", which {preds[0]}, {preds[1]}", ", ".join(preds[:-1]) + f" and {preds[-1]}")[shape]
            sentences.append(cap(s) + ("" if body.startswith(",") else " ") + body + ".")
            shown += [Shown(f, span, (core(s),), "pred:" + t, f"prose:join{shape}")
                      for f, t, (_, span) in zip(fs, picked, parts)]
            continue
        for i, f in enumerate(fs):
            if rng.random() < 0.5:
                t = rng.choice(f.preds)
                lead = "It" if i and not f.plural and not s[:1].isupper() and rng.random() < 0.3 else "{Sc}"
                text, span = f.render(f"{lead} {t}.")
                shown.append(Shown(f, span, (core(s),), "pred:" + t, "prose:" + ("pronoun" if lead == "It" else "pred")))
            else:
                t = rng.choice(f.sentences)
                text, span = f.render(t)
                shown.append(Shown(f, span, (core(s),), t, "prose:sentence"))
            sentences.append(text)
    if rng.random() < 0.2:
        sentences.insert(rng.randrange(len(sentences) + 1), rng.choice((
            f"This page was last updated in {rng.choice(lx.MONTHS)}.", "Please read this before your first visit.",
            "Ask at reception if anything is unclear.", f"Thanks to {lx.person(rng)} for the photos.")))
    width = rng.choice((0, 0, 70, 80, 90, 100, 110, 120))
    cut = rng.randint(1, max(1, len(sentences) - 1)) if len(sentences) > 3 and rng.random() < 0.5 else len(sentences)
    paras = [" ".join(sentences[:cut]), " ".join(sentences[cut:])]
    return [textwrap.fill(p, width) if width else p for p in paras if p], shown


def _kv(row: _Row, subjects: list[str]) -> tuple[list[str], list[Shown]]:
    """One subject under a heading, then ``Label: value`` lines."""
    rng, s = row.rng, subjects[0]
    facts = [f for f in (row.fact(s) for _ in range(rng.randint(2, 4))) if f]
    if not facts:
        return [], []
    head = rng.choice(("### {}", "**{}**", "{}:", "{}", "## {}", "{} —"))
    line = rng.choice(("{}: {}", "- {}: {}", "* {}: {}", "{} — {}", "- {} = {}", "{}:  {}"))
    lines = [head.format(cap(core(s)))] + [line.format(f.label, f.cell) for f in facts]
    shown = [Shown(f, f.cell, (core(s), f.label), line, "kv") for f in facts]
    return ["\n".join(lines)], shown


def _same_key_facts(row: _Row, subjects: list[str], kind: str | None = None) -> list[tuple[str, Fact]]:
    """Facts of one key (one table column, one list) about several subjects."""
    first = row.fact(subjects[0], kind)
    if first is None:
        return []
    kind = first.family
    out = [(subjects[0], first)]
    for s in subjects[1:]:
        f = row.fact(s, kind, first.variant, first.key) if kind in KINDS_FOR[row.subjects[s]] else None
        if f is not None and f.label == first.label:
            out.append((s, f))
    return out


def _list(row: _Row, subjects: list[str]) -> tuple[list[str], list[Shown]]:
    """A labelled list: one kind of value for several subjects."""
    rng = row.rng
    facts = _same_key_facts(row, subjects)
    if not facts:
        return [], []
    label = facts[0][1].label
    head = rng.choice(("{}:", "## {}", "**{}**", "{} at a glance:", "{} by item:", "{}"))
    line = rng.choice(("- {s}: {v}", "- {s} — {v}", "* {v} ({s})", "{n}. {s}: {v}", "- {s}, {v}", "• {s}: {v}"))
    lines = [head.format(label)] + [line.format(s=cap(core(s)), v=f.cell, n=i) for i, (s, f) in enumerate(facts, 1)]
    return ["\n".join(lines)], [Shown(f, f.cell, (core(s), label), line, "list") for s, f in facts]


def _table(row: _Row, subjects: list[str]) -> tuple[list[str], list[Shown]]:
    """A table written as text (markdown pipes or space-aligned columns): subjects by rows, kinds by columns."""
    rng = row.rng
    cols = []
    kinds = [k for k in KINDS_FOR[row.subjects[subjects[0]]]]
    for _ in range(rng.randint(1, 3)):
        facts = _same_key_facts(row, subjects, rng.choice(kinds))
        if len(facts) == len(subjects) and len(facts) > 1:
            cols.append(facts)
    if not cols:
        return [], []
    first = rng.choice(("Item", "Name", "What", "", "Where", "Which"))
    header = [first] + [c[0][1].label for c in cols]
    body = [[cap(core(s))] + [c[i][1].cell for c in cols] for i, (s, _) in enumerate(cols[0])]
    if rng.random() < 0.6:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        style = "table:pipes"
    else:
        w = [max(len(r[j]) for r in [header] + body) + 2 for j in range(len(header))]
        lines = ["".join(c.ljust(w[j]) for j, c in enumerate(r)).rstrip() for r in [header] + body]
        style = "table:columns"
    shown = [Shown(f, f.cell, (core(s), c[0][1].label), style, style) for c in cols for s, f in c]
    return ["\n".join(lines)], shown


def _bullets(row: _Row, subjects: list[str]) -> tuple[list[str], list[Shown]]:
    """One fact a bullet, as a sentence."""
    rng, lines, shown = row.rng, [], []
    mark = rng.choice(("- ", "* ", "• ", "{n}. ", "{n}) "))
    for s in subjects:
        f = row.fact(s)
        if f is None:
            continue
        t = rng.choice(f.preds + f.sentences) if rng.random() < 0.7 else rng.choice(f.sentences)
        text, span = f.render(t if t in f.sentences else "{Sc} " + t + rng.choice((".", "", ".")))
        lines.append(mark.format(n=len(lines) + 1) + text)
        shown.append(Shown(f, span, (core(s),), t, "bullets"))
    return (["\n".join(lines)] if lines else []), shown


STYLES = (_prose, _prose, _prose, _prose, _kv, _list, _table, _bullets)


def _document(row: _Row, used_names: set[str]) -> tuple[str, str, list[Shown]]:
    """A made-up document: file name, text (a title, sections under optional headings), what it states."""
    rng = row.rng
    kinds = rng.sample(row.types, rng.choice((1, 2)))
    blocks, shown = [], []
    for _ in range(rng.choice((1, 2, 2, 3))):
        kind = rng.choice(kinds)
        style = rng.choice(STYLES)
        pool = [s for s, k in row.subjects.items() if k == kind and rng.random() < 0.6]
        subjects = [s for s in pool + [row.subject(kind) for _ in range(rng.randint(1, 3))] if s][:4]
        if style is _kv:
            subjects = subjects[:1]
        if not subjects:
            continue
        paras, facts = style(row, subjects)
        if not paras:
            continue
        if rng.random() < 0.4:
            heading = rng.choice(HEADINGS[kind] + (cap(core(subjects[0])),))
            paras[0] = rng.choice(("## {}\n\n", "### {}\n\n", "{}\n\n", "**{}**\n\n", "## {}\n")).format(heading) + paras[0]
        blocks += paras
        shown += facts
    title = rng.choice(TITLES).format(P=lx.word(rng), V=rng.choice(("Club", "Centre", "Farm", "Museum", "School",
                                                                    "Harbour", "Hotel", "Library", "Works", "Trust")),
                                      v=rng.choice(lx.VENUES), g=rng.choice(GROUPS))
    head = rng.choice(("# {}\n\n", "# {}\n\n", "{}\n" + "=" * len(title) + "\n\n", "{}\n\n", "", "**{}**\n\n"))
    text = head.format(title) + "\n\n".join(blocks) + "\n"
    slug = re.sub(r"[^a-z0-9]+", rng.choice(("-", "_")), title.lower()).strip("-_") or "notes"
    name = rng.choice(("{}.md", "{}.md", "{}.txt", "docs/{}.md", "{}-" + str(rng.randint(2019, 2040)) + ".md",
                       "notes/{}.md")).format(slug)
    while name in used_names:
        name = name.replace(".", f"-{rng.randint(2, 9)}.", 1)
    for s in shown:
        s.doc = name
    return name, text, shown


# ----------------------------------------------------------------------------- rows
def _norm(text: str) -> str:
    return " ".join(text.split())


_STOP = set("the and for are was what when where who whom which how does did can much many long often with from "
            "that this there their its into per each any all our you your have has had out about after before".split())


def _words(text: str) -> set[str]:
    """Content words, to rank distractors as a retriever would (by what they share with the question)."""
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) > 2 and w not in _STOP}


def _question(rng: random.Random, f: Fact) -> tuple[str, str]:
    t = rng.choice(f.questions)
    q = f.ask(t)
    r = rng.random()
    if r < 0.08:
        q = q[:1].lower() + q[1:]
    elif r < 0.12:
        q = q.rstrip("?")
    elif r < 0.16:
        q = rng.choice(("Quick question: ", "Please tell me: ", "Sorry, ", "One more thing: ")) + q[:1].lower() + q[1:]
    return q, t


def _holds(p: dict, s: Shown) -> bool:
    return s.span in p["norm"] and all(a.lower() in p["low"] for a in s.anchors)


def _answerable(s: Shown, passages: list[dict]) -> bool:
    """Some passage of its document holds the span with its anchors, and no other document's passage holds it."""
    holding = [p for p in passages if s.span in p["norm"]]
    return bool(holding) and all(p["source"] == s.doc for p in holding) and any(_holds(p, s) for p in holding)


def _row(rng: random.Random, chunk_size: int, chunk_overlap: int, max_turns: int,
         passage_counts: tuple[int, ...], max_chars: int) -> dict | None:
    from lmforge.agents.index import chunk_text
    from lmforge.agents.rag import DEFAULT_SYSTEM, system_prompt

    row, names, shown, chunks = _Row(rng), set(), [], []
    for _ in range(rng.choice((2, 2, 3))):
        name, text, facts = _document(row, names)
        names.add(name)
        shown += facts
        chunks += [{"source": name, "text": text[s:e], "norm": _norm(text[s:e]), "low": _norm(text[s:e]).lower()}
                   for s, e in chunk_text(text, chunk_size, chunk_overlap)]
    targets = [(s, [c for c in chunks if c["source"] == s.doc and _holds(c, s)]) for s in shown]
    targets = [(s, held) for s, held in targets if held]
    if not targets:
        return None
    target, held = rng.choice(targets)
    question, qt = _question(rng, target.fact)
    answer_chunk = rng.choice(held)
    qwords = _words(question)
    others = sorted((c for c in chunks if c is not answer_chunk),
                    key=lambda c: -len(qwords & _words(c["low"])) - 0.8 * rng.random())
    if rng.random() < 0.15:
        rng.shuffle(others)
    passages = [answer_chunk] + others[:rng.choice(passage_counts) - 1]
    while len(passages) > 1 and sum(len(p["text"]) for p in passages) > max_chars:
        passages.pop()
    rng.shuffle(passages)
    if not _answerable(target, passages):
        return None
    turns, seen = [(question, target, qt)], {question}
    extra = [s for s in shown if s is not target and _answerable(s, passages)]
    for s in rng.sample(extra, min(len(extra), rng.randint(0, max_turns - 1))):
        q, t = _question(rng, s.fact)
        if q not in seen and s.span != target.span:
            turns.append((q, s, t))
            seen.add(q)
    messages = [{"role": "system", "content": system_prompt(DEFAULT_SYSTEM, passages)}]  # RagAgent.prompt's
    for q, s, _ in turns:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": s.span}]
    meta = {"kind": target.fact.kind, "template": target.template, "style": target.style, "question": qt,
            "label": target.fact.label}
    return {"messages": messages, "solution": target.span, "source": target.doc, "meta": meta}


def generate_rag_reader(split: str = "train", n: int = 20000, seed: int = 0, chunk_size: int = 200,
                        chunk_overlap: int = 50, max_turns: int = 3,
                        passage_counts: tuple[int, ...] = (1, 1, 2, 2, 2, 3), max_chars: int = 660,
                        meta: bool = False) -> list[dict]:
    """``n`` rows (see the module docstring); ``train`` and ``test`` never share a seed.

    A row asks up to ``max_turns`` questions about the same passages (each answered from one document), so
    one long prompt carries several answers to learn from; its first turn is a whole single-question agent
    prompt, and ``solution``/``source`` are that turn's. The number of passages is drawn from
    ``passage_counts`` (fewer when they would pass ``max_chars``). ``meta`` keeps, per row, which kind,
    template, style and question template the first answer came from (for tests and statistics)."""
    if split not in ("train", "test"):
        raise ValueError(f"rag-reader split must be 'train' or 'test', got {split!r}")
    rng, rows = random.Random(f"rag-reader:{split}:{seed}"), []
    while len(rows) < n:
        r = _row(rng, chunk_size, chunk_overlap, max_turns, passage_counts, max_chars)
        if r is not None:
            if not meta:
                del r["meta"]
            rows.append(r)
    return rows


def reader_answer_correct(text: str | None, solution: str) -> bool:
    """The reply holds the span (case and whitespace aside) and is not much longer: copying a whole
    passage does not count."""
    if text is None:
        return False
    got, want = _norm(text).lower().rstrip(". "), _norm(solution).lower()
    return want in got and len(got) <= len(want) + 24
