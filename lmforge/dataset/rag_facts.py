"""Fact kinds for ``builtin:rag-reader``: for each kind of value, the many ways a document states it and the
several ways a person asks for it.

A ``Fact`` is one value (the answer span) about one subject, with templates of three shapes: predicates that
follow the subject (``weighs {W}``; joined by ``rag_reader`` into sentences of one to three facts), whole
sentences in other orders (value first, passive, fronted phrases, ``X: value``), and questions. A label and a
short cell value let the same fact appear in a list, a ``Label: value`` block or a table. Templates are plain
format strings so that a test can count which of them rows use (``{S}`` subject, ``{W}`` the value as written,
``{Sc}``/``{Wc}`` capitalised; when the text capitalises a value the answer copies it capitalised).

The kinds and phrasings are written for generality (quantities of a dozen dimensions, times, dates,
schedules, people, places, reasons, requirements, identifiers), not after any particular document.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from lmforge.dataset import rag_lexicon as lx


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


@dataclass
class Fact:
    kind: str
    subject: str                      # as written mid-sentence: "the north kiln", "Kelmor Library", "refund requests"
    key: str                          # (subject, key) is unique in a row: one answer per question
    value: str                        # the span the answer copies
    label: str                        # "Weight": for lists, "Label: value" blocks and table headers
    preds: tuple[str, ...]            # follow the subject: "weighs {W}"
    sentences: tuple[str, ...]        # whole sentences
    questions: tuple[str, ...]
    slots: dict = field(default_factory=dict)
    cell: str = ""                    # the value in a table or list ("18" where prose says "18 beds")
    plural: bool = False
    family: str = ""                  # its entry in KINDS, and the variant drawn there
    variant: str = ""

    def fields(self, written: str | None = None) -> dict:
        w = self.slots.get("W", self.value) if written is None else written
        return {**self.slots, "S": self.subject, "Sc": cap(self.subject), "W": w, "Wc": cap(w)}

    def render(self, template: str) -> tuple[str, str]:
        """The filled template and the span in it (capitalised where the template starts a sentence with it)."""
        f = self.fields()
        span = cap(self.value) if "{Wc}" in template and f["W"].startswith(self.value) else self.value
        text = template.format(**f)
        return (text[:-1] if text.endswith("..") else text.replace(".. ", ". ").replace("..,", ".,")), span

    def ask(self, template: str) -> str:
        return template.format(**self.fields())


# ----------------------------------------------------------------------------- quantities
# dimension: units (written forms), number range, label, predicates, extra sentences, questions
DIMS = {
    "weight": (("kilograms", "kg", "grams", "g", "tonnes", "pounds", "lb"), (1, 2500), "Weight",
               ("weighs {W}", "has a weight of {W}", "comes in at {W}", "weighs in at {W}", "is {W} in weight"),
               ("At {W}, {S} {filler}.", "Weighing {W}, {S} {filler}.", "{Sc} is heavy: {W}."),
               ("How heavy is {S}?", "How much does {S} weigh?", "What is the weight of {S}?", "What does {S} weigh?")),
    "capacity": (("litres", "l", "millilitres", "ml", "cubic metres", "m³", "gallons"), (1, 9000), "Capacity",
                 ("holds {W}", "can hold {W}", "has a capacity of {W}", "takes {W}", "can take up to {W}",
                  "has room for {W}"),
                 ("Up to {W} fit in {S}.", "{Sc} has a {W} capacity.", "With a capacity of {W}, {S} {filler}."),
                 ("How much can {S} hold?", "What is the capacity of {S}?", "How much does {S} hold?",
                  "How big is the capacity of {S}?")),
    "size": (("metres", "m", "centimetres", "cm", "millimetres", "mm", "feet", "inches"), (1, 950), None,
             ("is {W} {adj}", "measures {W} in {attr}", "has a {attr} of {W}", "is {W} in {attr}"),
             ("{Sc} has a {attr} of {W}.", "The {attr} of {S} is {W}.", "{Sc} ({attr}: {W}) {filler}."),
             ("How {adj} is {S}?", "What is the {attr} of {S}?", "What {attr} is {S}?")),
    "power": (("watts", "W", "kilowatts", "kW", "horsepower", "hp"), (1, 5000), "Power",
              ("is rated at {W}", "draws {W}", "has a power rating of {W}", "runs on {W}", "uses {W} of power"),
              ("{Sc} draws {W} when running.", "The power rating of {S} is {W}."),
              ("How much power does {S} draw?", "What is the power rating of {S}?", "How powerful is {S}?")),
    "speed": (("km/h", "kilometres per hour", "miles per hour", "mph", "knots", "metres per second", "m/s"),
              (2, 300), "Top speed",
              ("has a top speed of {W}", "can reach {W}", "goes at up to {W}", "travels at {W}", "is limited to {W}"),
              ("The top speed of {S} is {W}.", "{Sc} is not allowed to go faster than {W}."),
              ("How fast can {S} go?", "What is the top speed of {S}?", "How fast is {S}?",
               "What speed is {S} limited to?")),
    "temperature": (("°C", "degrees", "degrees Celsius", "°F", "degrees Fahrenheit", "C"), (-40, 400), "Temperature",
                    ("is kept at {W}", "runs at {W}", "heats up to {W}", "is set to {W}", "works at {W}"),
                    ("The temperature of {S} is set to {W}.", "{Sc} should stay at {W}.", "Keep {S} at {W}."),
                    ("At what temperature is {S} kept?", "What temperature is {S} set to?",
                     "What is the temperature of {S}?", "How warm is {S}?")),
    "pressure": (("bar", "psi", "kPa", "pascals", "atmospheres"), (1, 400), "Pressure",
                 ("runs at {W}", "is pumped to {W}", "works at a pressure of {W}", "is filled to {W}"),
                 ("The working pressure of {S} is {W}.", "{Sc} must not go above {W}."),
                 ("What pressure does {S} run at?", "At what pressure does {S} work?", "What is the pressure of {S}?")),
    "energy": (("kilowatt-hours", "kWh", "watt-hours", "megajoules", "units of electricity"), (1, 900), "Energy use",
               ("uses {W} {per}", "consumes {W} {per}", "needs {W} {per}", "gets through {W} {per}"),
               ("{Sc} uses about {W} {per}.", "Energy use of {S}: {W} {per}."),
               ("How much energy does {S} use {per}?", "How much electricity does {S} consume {per}?",
                "What is the energy use of {S} {per}?")),
    "price": ((), (1, 900), "Price",
              ("costs {W}", "is priced at {W}", "sells for {W}", "can be hired for {W} {per}", "costs {W} to hire"),
              ("The price of {S} is {W}.", "{Sc} is on sale for {W}.", "It costs {W} to rent {S}."),
              ("How much does {S} cost?", "What is the price of {S}?", "What does {S} cost?",
               "How much is {S}?")),
    "data": (("megabits per second", "Mbit/s", "Mbps", "gigabits per second", "Gbit/s", "kilobits per second"),
             (1, 999), "Speed",
             ("runs at {W}", "offers {W}", "gives about {W}", "delivers up to {W}", "is limited to {W}"),
             ("The speed of {S} is {W}.", "Download speed on {S}: {W}."),
             ("How fast is {S}?", "What is the speed of {S}?", "What download speed does {S} give?")),
    "area": (("square metres", "m²", "hectares", "acres", "square feet", "sq m"), (2, 9000), "Area",
             ("covers {W}", "has a floor area of {W}", "is {W} in size", "takes up {W}", "spreads over {W}"),
             ("The area of {S} is {W}.", "{Sc} covers roughly {W}.", "{Sc}, at {W}, {filler}."),
             ("How big is {S}?", "What is the area of {S}?", "How much space does {S} cover?",
              "What floor area does {S} have?")),
    "duration": (("minutes", "hours", "days", "weeks", "seconds", "mins", "hrs"), (1, 240), "Duration",
                 ("lasts {W}", "takes {W}", "runs for {W}", "is {W} long", "goes on for {W}"),
                 ("{Sc} lasts about {W}.", "Allow {W} for {S}.", "Expect {S} to take {W}."),
                 ("How long does {S} last?", "How long is {S}?", "How long does {S} take?",
                  "What is the duration of {S}?")),
    "distance": (("kilometres", "km", "miles", "metres", "m", "minutes' walk"), (1, 900), "Distance",
                 ("is {W} from {O}", "lies {W} away from {O}", "is {W} by road from {O}", "sits {W} from {O}"),
                 ("{O_c} is {W} from {S}.", "From {S} to {O} is {W}.", "The distance from {S} to {O} is {W}."),
                 ("How far is {S} from {O}?", "What is the distance from {S} to {O}?",
                  "How far is it from {S} to {O}?")),
}
SIZE_ATTRS = (("length", "long"), ("height", "tall"), ("width", "wide"), ("depth", "deep"), ("height", "high"))
PERS = ("per day", "a day", "each week", "per hour", "an hour", "a month", "per night", "per year")
RATES = (("oil", ("litres", "l", "gallons")), ("feed", ("kilograms", "kg", "sacks")),
         ("fuel", ("litres", "gallons")), ("paper", ("sheets", "reams", "boxes")), ("coffee", ("kilograms", "bags")),
         ("gas", ("cubic metres", "m³", "bottles")), ("ink", ("cartridges", "litres")))


def quantity(rng: random.Random, units: tuple[str, ...], lo: int, hi: int) -> str:
    """A number with a unit: plain, with a qualifier, or a range; units as words or symbols."""
    unit = rng.choice(units)
    a = lx.number(rng, lo, hi)
    glue = "" if unit in ("°C", "°F", "C", "%") or (unit in ("m", "l", "g", "kg", "km") and rng.random() < 0.2) else " "
    shape = rng.random()
    if shape < 0.12:
        b = lx.number(rng, lo, hi)
        return rng.choice((f"{a}-{b}{glue}{unit}", f"between {a} and {b}{glue}{unit}", f"{a} to {b}{glue}{unit}"))
    v = f"{a}{glue}{unit}"
    if shape < 0.24:
        return f"{rng.choice(('about', 'up to', 'at least', 'at most', 'roughly', 'nearly', 'over', 'under'))} {v}"
    return v


def make_quantity(rng: random.Random, subject: str, variant: str, ctx) -> Fact:
    units, (lo, hi), label, preds, sentences, questions = DIMS[variant]
    slots = {"filler": rng.choice(lx.FILLERS), "per": rng.choice(PERS)}
    if variant == "size":
        slots["attr"], slots["adj"] = rng.choice(SIZE_ATTRS)
        label = cap(slots["attr"])
    if variant == "energy":
        label = f"{label} {slots['per']}"
    if variant == "distance":
        slots["O"] = ctx.other_venue()
        slots["O_c"] = cap(slots["O"])
    if variant == "energy" and rng.random() < 0.5:  # a consumption rate of some stuff instead of energy
        stuff, units = rng.choice(RATES)
        slots["stuff"] = stuff
        label = f"{cap(stuff)} use {slots['per']}"
        preds = ("uses {W} of " + stuff + " {per}", "gets through {W} of " + stuff + " {per}",
                 "needs {W} of " + stuff + " {per}")
        sentences = ("{Sc} uses {W} of " + stuff + " {per}.", cap(stuff) + " use of {S}: {W} {per}.")
        questions = ("How much " + stuff + " does {S} use {per}?", "How much " + stuff + " does {S} need {per}?")
    value = lx.money(rng) if variant == "price" else quantity(rng, units, lo, hi)
    key = variant + (":" + slots.get("attr", "") + slots.get("stuff", "") + (slots["per"] if variant == "energy" else ""))
    return Fact("quantity:" + variant, subject, key, value, label, preds, sentences, questions, slots, value)


# ----------------------------------------------------------------------------- counts, hours, times, schedules
COUNT_NOUNS = ("seats", "beds", "tables", "lanes", "computers", "rooms", "desks", "lockers", "showers",
               "parking spaces", "bikes", "boats", "pianos", "easels", "courts", "stalls", "screens", "cots",
               "benches", "ovens", "sinks", "hooks", "chairs", "tents", "stables", "pitches", "printers", "beehives")
COUNT_ADJS = ("", "", "", "double", "spare", "covered", "private", "indoor", "outdoor", "shared", "heated",
              "folding", "numbered", "electric")


def make_count(rng: random.Random, subject: str, variant: str, ctx) -> Fact:
    noun = variant
    n = lx.number(rng, 2, 400, words=0.3, decimals=0)
    adj = rng.choice(COUNT_ADJS)
    value = f"{n} {adj + ' ' if adj else ''}{noun}"
    return Fact("count", subject, "count:" + noun, value, cap(noun),
                ("has {W}", "offers {W}", "is equipped with {W}", "contains {W}", "has room for {W}", "provides {W}"),
                ("There are {W} in {S}.", "{Wc} are available in {S}.", "In {S} you will find {W}.",
                 "{Sc} now has {W}, {filler_n}."),
                ("How many {noun} are there in {S}?", "How many {noun} does {S} have?",
                 "What is the number of {noun} in {S}?", "How many {noun} can {S} offer?"),
                {"noun": noun, "filler_n": rng.choice(("more than last year", "all in good condition",
                                                       "booked on a first-come basis", "after the refit"))}, n)


DAY_PARTS = ("", "", "on weekdays ", "every day ", "Monday to Friday ", "at weekends ", "on Saturdays ", "daily ")


def make_hours(rng: random.Random, subject: str, variant: str, ctx) -> Fact:
    written, span = lx.clock_range(rng)
    days = rng.choice(DAY_PARTS)
    return Fact("hours", subject, "hours", span, "Opening hours",
                ("is open " + days + "{W}", "opens " + days + "{W}", "is staffed " + days + "{W}",
                 "welcomes visitors " + days + "{W}"),
                ("Opening hours for {S}: " + days + "{W}.", "{Sc}'s hours are " + days + "{W}.",
                 cap(days) + "{S} is open {W}." if days else "You can visit {S} {W}.",
                 "{Sc} keeps these hours: {W}."),
                ("What are the opening hours of {S}?", "When is {S} open?", "During which hours is {S} open?",
                 "What hours is {S} open?", "When can I visit {S}?"),
                {"W": written}, span)


def make_clock(rng: random.Random, subject: str, variant: str, ctx) -> Fact:
    value = lx.clock(rng)
    if variant == "start":
        return Fact("clock:start", subject, "clock:start", value, "Starts",
                    ("starts at {W}", "begins at {W}", "kicks off at {W}", "gets going at {W}", "is at {W}"),
                    ("At {W}, {S} begins.", "{Sc} is scheduled for {W}.", "Be there for {S} at {W}.",
                     "{Wc}: start of {S}."),
                    ("What time does {S} start?", "When does {S} begin?", "At what time is {S}?",
                     "What time is {S}?"), {}, value)
    return Fact("clock:end", subject, "clock:end", value, "Ends",
                ("ends at {W}", "finishes at {W}", "is over by {W}", "wraps up at {W}", "closes at {W}"),
                ("{Sc} finishes no later than {W}.", "By {W}, {S} is over.", "{Sc} has to end at {W}."),
                ("When does {S} end?", "What time does {S} finish?", "How late does {S} go on?",
                 "At what time is {S} over?"), {}, value)


CARE = (("cleaned", "cleans"), ("serviced", "services"), ("inspected", "inspects"), ("emptied", "empties"),
        ("calibrated", "calibrates"), ("refilled", "refills"), ("oiled", "oils"), ("checked", "checks"),
        ("washed", "washes"), ("updated", "updates"), ("backed up", "backs up"), ("repainted", "repaints"),
        ("tuned", "tunes"), ("polished", "polishes"), ("disinfected", "disinfects"), ("descaled", "descales"))
VENUE_CARE = (("cleaned", "cleans"), ("inspected", "inspects"), ("restocked", "restocks"), ("swept", "sweeps"),
              ("aired", "airs"), ("audited", "audits"), ("locked", "locks"), ("repainted", "repaints"),
              ("disinfected", "disinfects"), ("opened up", "opens up"), ("checked", "checks"))


def make_schedule(rng: random.Random, subject: str, variant: str, ctx) -> Fact:
    value = lx.schedule(rng)
    if variant == "held":  # events
        return Fact("schedule:held", subject, "schedule:held", value, "When",
                    ("is held {W}", "takes place {W}", "meets {W}", "runs {W}", "happens {W}"),
                    ("{Wc}, {S} is held.", "{Sc} — {W}.", "We hold {S} {W}.", "There is {S} {W}."),
                    ("How often is {S} held?", "When does {S} take place?", "How often does {S} happen?",
                     "When is {S} held?", "How frequently does {S} run?"), {}, value)
    done, does = variant.split("/")
    role = ctx.role()
    return Fact("schedule:care", subject, "care:" + done, value, cap(done),
                ("is " + done + " {W}", "gets " + done + " {W}", "has to be " + done + " {W}",
                 "must be " + done + " {W}", "is " + done + " by the {role} {W}"),
                ("{Wc}, {S} is " + done + ".", "The {role} " + does + " {S} {W}.", "{Sc} — " + done + " {W}.",
                 "Please make sure {S} is " + done + " {W}."),
                ("How often is {S} " + done + "?", "When is {S} " + done + "?",
                 "How frequently does {S} get " + done + "?", "When does {S} need to be " + done + "?"),
                {"role": role}, value)


SEASONS = ("spring", "summer", "autumn", "winter")


def make_date(rng: random.Random, subject: str, variant: str, ctx) -> Fact:
    value = lx.date(rng)
    if variant == "event":
        return Fact("date:event", subject, "date", value, "Date",
                    ("will be held on {W}", "is on {W}", "takes place on {W}", "is planned for {W}",
                     "has been moved to {W}"),
                    ("On {W}, {S} {filler_e}.", "Date of {S}: {W}.", "Save the date: {S} is on {W}.",
                     "{Wc} is the date of {S}." if value[:1].isdigit() else "Mark {W} for {S}."),
                    ("When is {S}?", "On what date is {S}?", "What is the date of {S}?",
                     "When will {S} take place?"),
                    {"filler_e": rng.choice(("opens to everyone", "starts early", "returns", "moves indoors"))}, value)
    if variant == "deadline":
        return Fact("date:deadline", subject, "deadline", value, "Deadline",
                    ("must be submitted by {W}", "are due by {W}", "close on {W}", "must reach us before {W}"),
                    ("The deadline for {S} is {W}.", "Send {S} in before {W}.", "{Wc} is the last day for {S}."
                     if value[:1].isdigit() else "The last day for {S} is {W}."),
                    ("What is the deadline for {S}?", "By when must {S} be submitted?", "When are {S} due?",
                     "When is the last day for {S}?"), {}, value, plural=True)
    verb, y = variant, rng.randint(1850, 2040)
    year = rng.choice((str(y), str(y), f"{rng.choice(lx.MONTHS)} {y}", f"the {rng.choice(SEASONS)} of {y}",
                       f"the {y // 10 * 10}s" if rng.random() < 0.5 else str(y)))
    return Fact("date:year", subject, "year:" + verb, year, cap(verb),
                ("was " + verb + " in {W}", "was first " + verb + " in {W}", "has been in place since {W}"
                 if verb == "installed" else "dates from {W}"),
                ("{Sc} was " + verb + " in {W}.", "In {W}, {S} was " + verb + ".", cap(verb) + ": {W}."),
                ("When was {S} " + verb + "?", "In which year was {S} " + verb + "?", "When was {S} first " + verb + "?"),
                {}, year)


# ----------------------------------------------------------------------------- people
def make_person(rng: random.Random, subject: str, variant: str, ctx) -> Fact:
    name, role = ctx.person(), ctx.role()
    slots = {"role": role, "W": name}
    if variant == "approve":  # requests (plural subject)
        return Fact("person:approve", subject, "approve", name, "Approved by",
                    ("are approved by {W}", "go to {W} for approval", "are signed off by {W}",
                     "are signed off by the {role}, {W}", "need the approval of {W}"),
                    ("{Wc} approves {S}.", "Only {W} can approve {S}.", "Approval for {S}: {W}.",
                     "Send {S} to {W}, the {role}.", "The {role}, {W}, decides on {S}."),
                    ("Who approves {S}?", "Who signs off {S}?", "Who do {S} go to?", "Who can approve {S}?",
                     "Who receives {S}?", "Who decides on {S}?"), slots, name, plural=True)
    if variant == "role":  # the subject is the role itself
        return Fact("person:role", subject, "who", name, "Name",
                    ("is {W}", "is currently {W}", "this year is {W}"),
                    ("{Wc} is {S}.", "{Wc} works as {S}.", "{Sc}, {W}, {filler}.", "{Sc}: {W}."),
                    ("Who is {S}?", "What is the name of {S}?", "Who works as {S}?", "Who is {S} at the moment?"),
                    {**slots, "filler": rng.choice(("joined last spring", "answers most questions",
                                                    "is away in August", "keeps the keys"))}, name)
    lead = variant == "lead"  # events are led; venues and objects are run or looked after
    return Fact("person:" + variant, subject, "manager", name, rng.choice(("Manager", "Contact", "Responsible")),
                (("is led by {W}", "is organised by {W}", "is run by {W}", "is hosted by {W}") if lead else
                 ("is run by {W}", "is managed by {W}", "is looked after by {W}", "is the responsibility of {W}",
                  "is looked after by the {role}, {W}")),
                ("{Wc} runs {S}.", "{Wc}, the {role}, is in charge of {S}.", "The {role}, {W}, looks after {S}.",
                 "Ask {W} about anything to do with {S}.", "{Sc}: contact {W} ({role})."),
                ("Who runs {S}?", "Who is in charge of {S}?", "Who is responsible for {S}?",
                 "Who should I talk to about {S}?", "Who looks after {S}?"), slots, name)


# ----------------------------------------------------------------------------- places, routes, sources
def _prep(where: str) -> str:
    if where[:1].isdigit():
        return "at"
    if any(w in where.split()[:4] for w in ("shelf", "rack", "landing", "workbench", "trolley", "floor")):
        return "on"
    return "in"


def make_place(rng: random.Random, subject: str, variant: str, ctx) -> Fact:
    where = lx.place(rng)
    p = _prep(where)
    slots = {"P": p, "Pc": cap(p)}
    if variant == "kept":
        return Fact("place:kept", subject, "where", where, rng.choice(("Location", "Kept in", "Stored")),
                    ("is kept " + p + " {W}", "is stored " + p + " {W}", "lives " + p + " {W}",
                     "can be found " + p + " {W}", "sits " + p + " {W}", "is parked " + p + " {W}"),
                    ("You will find {S} " + p + " {W}.", "{Pc} {W} you will find {S}.", "Location of {S}: {W}.",
                     "We keep {S} " + p + " {W}.", "{Sc} goes back " + p + " {W} after use."),
                    ("Where is {S} kept?", "Where can I find {S}?", "Where is {S} stored?", "Where is {S}?",
                     "What is the location of {S}?"), slots, where)
    if variant == "venue":
        return Fact("place:venue", subject, "where", where, rng.choice(("Location", "Address", "Where")),
                    ("is " + p + " {W}", "is located " + p + " {W}", "has moved to {W}", "is now " + p + " {W}"),
                    ("You can find {S} " + p + " {W}.", "Address of {S}: {W}.", "{Pc} {W} is {S}.",
                     "Look for {S} " + p + " {W}."),
                    ("Where is {S}?", "Where is {S} located?", "Where can I find {S}?", "What is the address of {S}?"),
                    slots, where)
    return Fact("place:meet", subject, "where", where, rng.choice(("Meeting point", "Place", "Venue")),
                ("is held " + p + " {W}", "meets " + p + " {W}", "takes place " + p + " {W}", "starts from {W}"),
                ("Meeting point for {S}: {W}.", "We gather " + p + " {W} for {S}.", "{Sc} moves to {W} this year.",
                 "Everyone meets " + p + " {W} for {S}."),
                ("Where is {S} held?", "Where does {S} meet?", "Where does {S} take place?",
                 "Where is the meeting point for {S}?", "Where should I go for {S}?"), slots, where)


def make_route(rng: random.Random, subject: str, variant: str, ctx) -> Fact:
    how = lx.means(rng)
    return Fact("route", subject, "route", how, "Getting there",
                ("can be reached {W}", "is best reached {W}", "is served {W}"),
                ("Visitors reach {S} {W}.", "Getting to {S}: {W}.", "Most people come to {S} {W}.",
                 "The easiest way to {S} is {W}.", "{Wc} is how most guests get to {S}."),
                ("How do I get to {S}?", "How does one get to {S}?", "How can {S} be reached?",
                 "How do visitors travel to {S}?"), {}, how)


SUPPLIES = ("flour", "firewood", "honey", "cheese", "wool", "timber", "coffee", "paper", "ice", "compost", "bread",
            "paint", "hay", "sand", "milk", "clay", "printer ink", "fish", "gravel", "soap", "tea", "rice", "salt",
            "sugar", "straw", "grain", "lamp oil", "fruit", "stationery", "bedding", "chalk", "yarn")


def make_origin(rng: random.Random, subject: str, variant: str, ctx) -> Fact:
    src = lx.origin(rng)
    return Fact("origin", subject, "origin", src, rng.choice(("Source", "Supplier", "From")),
                ("comes from {W}", "is supplied by {W}", "is bought from {W}", "is delivered by {W}",
                 "is sourced from {W}", "arrives from {W}"),
                ("We get {S} from {W}.", "{Sc} is brought in from {W}.", "Supplier of {S}: {W}.",
                 "All of {S} is ordered from {W}."),
                ("Where does {S} come from?", "Where do we get {S}?", "What is the source of {S}?",
                 "Where is {S} bought?", "Who supplies {S}?"), {}, src)


def make_requirement(rng: random.Random, subject: str, variant: str, ctx) -> Fact:
    need = lx.requirement(rng)
    return Fact("requirement", subject, "need", need, "Requirement",
                ("requires {W}", "is only allowed with {W}", "needs {W}"),
                ("Before {S}, you need {W}.", "You must have {W} before {S}.", "Requirements for {S}: {W}.",
                 "{Wc} is required for {S}.", "Nobody may start {S} without {W}."),
                ("What is required for {S}?", "What do you need for {S}?",
                 "What must I have before {S}?", "What is needed for {S}?"), {}, need)


ID_PREDS = {
    "reach": ("is reached on {W}", "can be contacted on {W}", "answers on {W}", "uses {W}"),
    "leave": ("leaves from {W}", "departs from {W}", "boards at {W}", "uses {W}"),
    "in": ("is in {W}", "takes place in {W}", "uses {W}", "is assigned {W}"),
}
ID_GROUP = {"extension": "reach", "line": "reach", "channel": "reach", "frequency": "reach", "code": "reach",
            "platform": "leave", "gate": "leave", "pier": "leave", "berth": "leave", "stand": "leave", "bay": "leave"}


def make_ident(rng: random.Random, subject: str, variant: str, ctx) -> Fact:
    kind, ident = lx.ident(rng)
    group = ID_GROUP.get(kind, "in")
    return Fact("ident", subject, "ident:" + kind, ident, cap(kind), ID_PREDS[group],
                ("For {S}, use {W}.", "{Sc} has been given {W}.", "{Wc} is for {S}." if not ident[:1].isdigit()
                 else "Use {W} for {S}.", "The {kind} for {S} is {W}."),
                ("Which {kind} is {S} on?", "What {kind} does {S} use?", "What is the {kind} for {S}?",
                 "Which {kind} do I need for {S}?"), {"kind": kind}, ident)


def make_reason(rng: random.Random, subject: str, variant: str, ctx) -> Fact:
    why, day = lx.reason(rng), rng.choice(lx.DAYS)
    return Fact("reason", subject, "closed:" + day, why, f"Closed on {day}s",
                ("is closed on {day}s because of {W}", "is closed on {day}s for {W}", "shuts on {day}s due to {W}"),
                ("Because of {W}, {S} is closed on {day}s.", "{day}s: {S} closed ({W}).",
                 "On {day}s {S} stays shut for {W}."),
                ("Why is {S} closed on {day}s?", "Why does {S} close on {day}s?",
                 "For what reason is {S} shut on {day}s?"), {"day": day}, why)


CONDITIONS = (("temperature", ("°C", "degrees")), ("current", ("amps", "A")),
              ("water level", ("metres", "centimetres", "cm")), ("pressure", ("bar", "psi")),
              ("noise level", ("decibels", "dB")), ("queue", ("people",)), ("humidity", ("%", "percent")),
              ("load", ("kilograms", "kg", "tonnes")), ("number of guests", ("guests", "people")))
STOPS = ("switched off", "stopped", "closed", "cancelled", "shut down", "paused", "moved indoors", "locked")
RISES = ("rises above", "goes above", "exceeds", "drops below", "falls under", "reaches", "goes over", "is more than")


def make_threshold(rng: random.Random, subject: str, variant: str, ctx) -> Fact:
    cond, units = rng.choice(CONDITIONS)
    stop, rise = rng.choice(STOPS), rng.choice(RISES)
    unit = rng.choice(units)
    value = f"{lx.number(rng, 1, 120, decimals=0.1 if unit not in ('people', 'guests') else 0)}" + \
        ("" if unit in ("%", "°C") else " ") + unit if rng.random() < 0.85 else lx.number(rng, 2, 90, decimals=0)
    return Fact("threshold", subject, "threshold:" + stop, value, f"{cap(stop)} at",
                ("is " + stop + " when the {cond} " + rise + " {W}", "gets " + stop + " once the {cond} " + rise + " {W}",
                 "is " + stop + " if the {cond} " + rise + " {W}"),
                ("If the {cond} " + rise + " {W}, {S} is " + stop + ".", "At a {cond} of {W}, {S} is " + stop + ".",
                 "When the {cond} " + rise + " {W}, the {role} has {S} " + stop + "."),
                ("At what {cond} is {S} " + stop + "?", "When is {S} " + stop + "?",
                 "What {cond} gets {S} " + stop + "?"), {"cond": cond, "role": ctx.role()}, value)


# ----------------------------------------------------------------------------- which kinds fit which subjects
# kind name -> (maker, subject types, variants: a table column shares one, weight when a subject draws a kind)
CARE_VARIANTS = tuple(f"{a}/{b}" for a, b in CARE)
KINDS = {
    "quantity": (make_quantity, ("object",), ("weight", "capacity", "size", "power", "speed", "temperature",
                                              "pressure", "energy", "price", "data"), 5),
    "venue-quantity": (make_quantity, ("venue",), ("area", "distance", "size", "temperature"), 2),
    "event-quantity": (make_quantity, ("event",), ("duration", "price", "distance"), 2),
    "count": (make_count, ("venue",), COUNT_NOUNS, 2),
    "hours": (make_hours, ("venue",), ("hours",), 2),
    "clock": (make_clock, ("event",), ("start", "end"), 3),
    "care": (make_schedule, ("object",), CARE_VARIANTS, 2),
    "venue-care": (make_schedule, ("venue",), tuple(f"{a}/{b}" for a, b in VENUE_CARE), 1),
    "held": (make_schedule, ("event",), ("held",), 2),
    "date": (make_date, ("event",), ("event",), 1),
    "deadline": (make_date, ("request",), ("deadline",), 1),
    "year": (make_date, ("object", "venue"), ("built", "opened", "bought", "installed", "restored", "founded"), 1),
    "approve": (make_person, ("request",), ("approve",), 2),
    "role": (make_person, ("role",), ("role",), 1),
    "manager": (make_person, ("object", "venue"), ("manager",), 1),
    "lead": (make_person, ("event",), ("lead",), 1),
    "kept": (make_place, ("object",), ("kept",), 2),
    "venue-place": (make_place, ("venue",), ("venue",), 1),
    "meet": (make_place, ("event",), ("meet",), 1),
    "route": (make_route, ("venue",), ("route",), 1),
    "origin": (make_origin, ("supply",), ("origin",), 1),
    "requirement": (make_requirement, ("activity",), ("need",), 1),
    "ident": (make_ident, ("venue", "event"), ("ident",), 1),
    "reason": (make_reason, ("venue",), ("reason",), 1),
    "threshold": (make_threshold, ("object", "event"), ("threshold",), 1),
}
KINDS_FOR = {t: [k for k, (_, types, _, _) in KINDS.items() if t in types]
             for t in ("object", "venue", "event", "request", "role", "supply", "activity")}


def pick_kind(rng: random.Random, subject_type: str) -> str:
    kinds = KINDS_FOR[subject_type]
    return rng.choices(kinds, [KINDS[k][3] for k in kinds])[0]


def make_fact(rng: random.Random, kind: str, subject: str, ctx, variant: str | None = None) -> Fact:
    maker, _, variants, _ = KINDS[kind]
    variant = variant or rng.choice(variants)
    fact = maker(rng, subject, variant, ctx)
    fact.family, fact.variant = kind, variant
    return fact
