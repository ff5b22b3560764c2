"""Words and value makers for ``builtin:rag-reader`` (see ``rag_reader``): what the made-up documents talk about.

The lists span many unrelated settings (a hotel, a ferry line, a farm, a school, a software team, a museum,
a sports club, ...) and are mixed freely, and most names, towns and brands are invented syllable strings,
so a reader cannot lean on a domain or on remembered values: it has to find the value in the passage and
copy it. Values come in several written forms each (``7:30 pm``/``19:30``/``19.30``; ``2.5 kg``/``2.5
kilograms``; ``twelve``/``12``), because real documents do not agree on one.

Written for this generator; nothing in it is taken from the shipped station documents, which are the
held-out proof (``tests/test_rag_reader.py`` checks that no long word sequence of theirs is generated).
"""
from __future__ import annotations

import random

# ----------------------------------------------------------------------------- things the facts are about
# Objects have measures, a place where they are kept, a schedule of care and someone responsible.
OBJECTS = (
    "dishwasher", "forklift", "ticket machine", "kiln", "printing press", "rowing boat", "water heater",
    "coffee machine", "projector", "delivery van", "wood chipper", "air compressor", "grain silo", "milk tank",
    "cargo bike", "pressure washer", "label printer", "bread oven", "dough mixer", "cement mixer", "lawn mower",
    "sewing machine", "pottery wheel", "x-ray unit", "dental chair", "hay baler", "chainsaw", "ice machine",
    "popcorn maker", "sound desk", "spotlight", "scoreboard", "rowing machine", "treadmill", "climbing rope",
    "canoe", "kayak", "minibus", "tow truck", "golf cart", "hot tub", "smoker", "fryer", "walk-in fridge",
    "vending machine", "server rack", "backup drive", "laser cutter", "3D printer", "drill press", "lathe",
    "welding set", "paint sprayer", "snow blower", "leaf blower", "water pump", "fuel pump", "hydraulic press",
    "conveyor belt", "cold room", "incubator", "centrifuge", "microscope", "fume cupboard", "autoclave",
    "piano", "church organ", "pipe organ", "harp", "drum kit", "loudspeaker", "mixing desk", "telephone exchange",
    "ferry ramp", "gangway", "life raft", "anchor winch", "fishing net", "beehive", "cider press", "wine barrel",
    "grain dryer", "milking robot", "feed wagon", "sheep trailer", "horse box", "stage lift", "display case",
    "book scanner", "shredder", "photocopier", "franking machine", "cash register", "safe", "key cabinet",
    "bike rack", "trampoline", "ball machine", "pitching machine", "ice resurfacer", "sauna stove", "boiler",
)
# Venues have opening hours, a number of something, a location, a manager, an extension or room number.
VENUES = (
    "reading room", "ticket office", "swimming pool", "gift shop", "canteen", "front desk", "bike workshop",
    "print room", "day nursery", "climbing wall", "car park", "market hall", "post office", "visitor centre",
    "music room", "sports hall", "cafe", "dental surgery", "reception", "lost property office", "tool library",
    "repair cafe", "boathouse", "chapel", "concert hall", "rehearsal room", "pottery studio", "dark room",
    "computer lab", "study hall", "staff room", "first aid room", "bakery", "farm shop", "cheese cellar",
    "wine cellar", "tasting room", "ballroom", "roof terrace", "beer garden", "playground", "skate park",
    "tennis courts", "bowling green", "squash court", "gym", "spa", "steam room", "laundrette", "tailor's shop",
    "pharmacy", "blood bank", "x-ray department", "waiting room", "maternity ward", "archive", "map room",
    "herbarium", "seed bank", "greenhouse", "orchard", "vineyard", "dairy", "stables", "kennels", "aviary",
    "reptile house", "aquarium", "planetarium", "observatory", "lecture theatre", "debating chamber",
    "council office", "town hall", "courtroom", "registry office", "harbour office", "ferry terminal",
    "bus station", "taxi rank", "ticket hall", "left luggage office", "cloakroom", "prayer room", "library",
)
# Events happen at a time, on a date or on a schedule, somewhere, led by someone.
EVENTS = (
    "staff meeting", "choir rehearsal", "book club", "guided tour", "farmers' market", "board meeting",
    "yoga class", "quiz night", "open day", "annual audit", "parents' evening", "harvest festival",
    "chess tournament", "bus tour", "welcome dinner", "pottery class", "swimming lesson", "film night",
    "wine tasting", "jazz concert", "flea market", "blood drive", "beach clean-up", "coding workshop",
    "sprint review", "product demo", "budget review", "team lunch", "cooking class", "dance class",
    "bird walk", "night walk", "story hour", "craft fair", "plant sale", "cheese fair", "sheep shearing",
    "regatta", "fun run", "cycling race", "football training", "netball practice", "trivia evening",
    "poetry reading", "lantern parade", "open rehearsal", "school assembly", "prize giving", "graduation",
    "job fair", "press conference", "town meeting", "planning hearing", "charity auction", "bake sale",
)
# Things people ask for: someone approves them, they have a deadline, they need something first.
REQUESTS = (
    "refund requests", "travel claims", "room bookings", "equipment loans", "parking permits", "key cards",
    "overtime", "press enquiries", "expense reports", "visitor passes", "software licences", "building access",
    "locker rentals", "course changes", "membership applications", "grant applications", "name badges",
    "storage requests", "catering orders", "van bookings", "boat hire", "court bookings", "stall bookings",
    "photo permits", "filming requests", "late returns", "fee waivers", "timetable changes", "lab access",
    "code reviews", "server access", "holiday cover", "shift swaps", "purchase orders", "book requests",
)
ACTIVITIES = (
    "using the kiln", "joining a guided tour", "borrowing a kayak", "driving the forklift", "renting a boat",
    "entering the cold room", "using the climbing wall", "booking the concert hall", "working with the lathe",
    "selling at the market", "handling the animals", "using the laser cutter", "diving in the pool",
    "taking a canoe out", "volunteering at the blood drive", "working in the kitchen", "riding the horses",
    "operating the stage lift", "joining the choir", "using the dark room", "playing in the tournament",
    "starting a new project", "opening a stall", "hosting an event", "working at height", "driving the minibus",
)
ROLES = (
    "head librarian", "finance officer", "site manager", "chief pilot", "head chef", "IT administrator",
    "club secretary", "ward sister", "harbour master", "museum curator", "quality lead", "fleet manager",
    "events manager", "head gardener", "stage manager", "treasurer", "chair", "head teacher", "bursar",
    "farm manager", "team lead", "product owner", "duty manager", "lifeguard captain", "head of sales",
    "volunteer lead", "press officer", "safety officer", "caretaker", "head groundsman", "choir master",
    "kitchen porter", "archivist", "registrar", "clerk", "conductor", "ranger", "vet", "nurse", "pharmacist",
)
MATERIALS = ("oak", "pine", "steel", "copper", "glass", "brick", "clay", "stone", "wool", "linen", "cotton", "tin",
             "brass", "plastic", "cork", "slate", "marble", "bamboo", "leather", "paper", "wax", "iron")
COLOURS = ("red", "yellow", "green", "blue", "white", "black", "grey", "orange", "brown", "purple", "pink",
           "silver", "dark green", "light blue", "navy")
SIZES = ("small", "large", "tall", "low", "narrow", "wide", "long", "short", "big", "little")
SIDES = ("north", "south", "east", "west", "upper", "lower", "front", "back", "left-hand", "right-hand", "main",
         "old", "new", "spare", "second", "outer", "inner", "middle", "top", "bottom", "side", "rear")
CONTAINERS = (
    "cupboard", "shelf", "basement", "attic", "loading bay", "porch", "hallway", "yard", "alcove", "rack",
    "drawer", "crate", "bin", "chest", "trolley", "shed", "corridor", "lobby", "landing", "stairwell",
    "courtyard", "pantry", "vault", "box room", "workbench", "cellar", "locker", "wardrobe", "hut",
    "tent", "barn", "hangar", "outhouse", "lean-to", "boot of the car", "bookcase", "filing cabinet",
    "glass case", "tin box", "plastic tub", "wooden box", "toolbox", "store room", "cloakroom", "kitchenette",
)
RELATIONS = ("beside", "behind", "under", "above", "next to", "opposite", "at the end of", "to the left of",
             "to the right of", "in front of", "inside", "on top of", "in the corner of", "near", "across from", "at the back of",
             "below", "by", "past", "round the corner from", "a few steps from", "just inside", "outside")
FLOORS = ("ground", "first", "second", "third", "fourth", "fifth", "top")
STREETS = ("Street", "Road", "Lane", "Avenue", "Square", "Way", "Quay", "Hill", "Row", "Place", "Gardens")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")
TITLES = ("Dr.", "Prof.", "Ms.", "Mr.", "Mrs.", "Capt.", "Sister", "Father", "Dr", "Rev.")
FILLERS = (
    "is used every day", "was bought second-hand", "is shared by all teams", "needs little looking after",
    "is popular with visitors", "was donated by a former member", "is insured by the club", "came with the building",
    "is older than most of the staff", "is booked weeks ahead", "is rarely out of use", "was moved here recently",
    "is due to be replaced", "has its own logbook", "is marked with a blue label", "is covered when not in use",
)

# ----------------------------------------------------------------------------- invented words
_CONS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kl", "st",
         "tr", "sh", "ch", "th", "w", "j", "y", "sk", "pl", "fr")
_VOWS = ("a", "e", "i", "o", "u", "ai", "ee", "ou", "y", "ia", "ei", "oo")
_ENDS = ("", "", "", "n", "r", "s", "l", "t", "k", "m", "rd", "nd", "st", "th", "x", "ck", "ng", "sen", "ley",
         "ton", "ford", "berg", "wick", "ow", "ard", "ell")


def word(rng: random.Random, lo: int = 1, hi: int = 3) -> str:
    """An invented, pronounceable word (a surname, a town, a brand), capitalised; mostly two syllables."""
    n = min(hi, max(lo, rng.choice((1, 2, 2, 2, 3))))
    w = "".join(rng.choice(_CONS) + rng.choice(_VOWS) for _ in range(n)) + rng.choice(_ENDS)
    if rng.random() < 0.15:
        w = rng.choice(_VOWS[:5]) + w
    return w.capitalize()


def person(rng: random.Random) -> str:
    """A name of one to four words: titles, initials, double-barrelled and particle surnames."""
    first, last = word(rng), word(rng)
    shape = rng.random()
    if shape < 0.35:
        name = f"{first} {last}"
    elif shape < 0.5:
        name = f"{first[0]}. {last}"
    elif shape < 0.6:
        name = f"{first} {word(rng, 1, 2)}-{last}"
    elif shape < 0.7:
        name = f"{first} {rng.choice(('van', 'de', 'von', 'da', 'ter', 'al'))} {last}"
    elif shape < 0.78:
        name = f"{first} {word(rng, 1, 2)} {last}"
    elif shape < 0.84:
        name = f"{first} {rng.choice('ABCDEFGHJKLMNPRSTW')}. {last}"
    else:
        name = f"{first} {last}"
    if rng.random() < 0.25:
        name = f"{rng.choice(TITLES)} {name if rng.random() < 0.7 else last}"
    return name


def town(rng: random.Random) -> str:
    t = word(rng, 1, 3)
    return t if rng.random() < 0.8 else f"{rng.choice(('Upper', 'Lower', 'Old', 'New', 'Port', 'St', 'East'))} {t}"


def number(rng: random.Random, lo: int = 2, hi: int = 999, words: float = 0.1, decimals: float = 0.15) -> str:
    """A number as documents write it: digits, thousands with commas, a decimal, or a word."""
    n = rng.randint(lo, hi) if rng.random() < 0.7 else rng.randint(lo, max(lo, min(hi, 60)))
    if 0 <= n <= 20 and rng.random() < words:
        return WORDS[n]
    if rng.random() < decimals:
        return f"{n}.{rng.choice(('5', '25', '75', str(rng.randint(1, 9)), str(rng.randint(10, 99))))}"
    if n >= 1000 and rng.random() < 0.6:
        return f"{n:,}"
    return str(n)


# ----------------------------------------------------------------------------- times and dates
def clock(rng: random.Random) -> str:
    """A time of day in one of several conventions (24-hour, am/pm, dotted, o'clock)."""
    h, m = rng.randrange(24), rng.choice((0, 0, 0, 15, 30, 30, 45, 10, 20, 40, 50, 5, 25, 35, 55))
    h12, ampm = (h % 12 or 12), ("am" if h < 12 else "pm")
    style = rng.random()
    if style < 0.45:
        return f"{h:02d}:{m:02d}"
    if style < 0.55:
        return f"{h}:{m:02d}"
    if style < 0.63:
        return f"{h:02d}.{m:02d}"
    if style < 0.78:
        return f"{h12}:{m:02d} {ampm}" if m else f"{h12} {ampm}"
    if style < 0.86:
        return f"{h12}:{m:02d} {ampm[0]}.m." if m else f"{h12} {ampm[0]}.m."
    if style < 0.92:
        return f"{h12}{ampm}" if not m else f"{h12}.{m:02d}{ampm}"
    if style < 0.96 and not m:
        return f"{WORDS[h12] if h12 <= 12 else h12} o'clock"
    return rng.choice(("noon", "midday", "midnight")) if rng.random() < 0.5 else f"{h:02d}{m:02d}"


def clock_range(rng: random.Random) -> tuple[str, str]:
    """(as written in the text, the span an answer copies): ``from 9:00 to 17:30`` answers ``9:00 to 17:30``."""
    a, b = clock(rng), clock(rng)
    shape = rng.randrange(6)
    if shape == 0:
        return f"from {a} to {b}", f"{a} to {b}"
    if shape == 1:
        return f"between {a} and {b}", f"between {a} and {b}"
    if shape == 2:
        return f"{a}-{b}", f"{a}-{b}"
    if shape == 3:
        return f"{a} – {b}", f"{a} – {b}"
    if shape == 4:
        return f"from {a} until {b}", f"{a} until {b}"
    return f"{a} to {b}", f"{a} to {b}"


def date(rng: random.Random) -> str:
    d, mo, y = rng.randint(1, 28), rng.randrange(12), rng.randint(1990, 2045)
    return rng.choice((f"{d} {MONTHS[mo]}", f"{MONTHS[mo]} {d}", f"{d} {MONTHS[mo]} {y}", f"{MONTHS[mo]} {d}, {y}",
                       f"{y}-{mo + 1:02d}-{d:02d}", f"{d}/{mo + 1}/{y}", f"the {_nth(d)} of {MONTHS[mo]}",
                       f"{MONTHS[mo][:3]} {d}", f"{MONTHS[mo]} {y}", f"{d}.{mo + 1}.{y}"))


def _nth(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def schedule(rng: random.Random) -> str:
    """How often something happens, in many shapes (every weekday, twice a month, on the 3rd Thursday...)."""
    day, d2 = rng.sample(DAYS, 2)
    n = rng.randint(2, 12)
    shape = rng.randrange(18)
    return (
        f"every {day}", f"on {day}s", f"every {day} and {d2}", f"every {day} at {clock(rng)}",
        f"{rng.choice(('once', 'twice', 'three times', 'four times'))} a {rng.choice(('day', 'week', 'month', 'year'))}",
        f"every {n} {rng.choice(('days', 'weeks', 'months', 'hours', 'minutes'))}",
        f"every {rng.choice(('other', 'second', 'third'))} {rng.choice(DAYS + ('week', 'month', 'year'))}",
        f"on the {rng.choice(ORDINALS[:4] + ('last',))} {day} of {rng.choice(('each', 'every', 'the'))} month",
        f"{rng.choice(('daily', 'weekly', 'monthly', 'yearly', 'hourly', 'nightly', 'fortnightly'))}",
        f"each {rng.choice(('morning', 'evening', 'afternoon', 'night'))} at {clock(rng)}",
        f"every weekday at {clock(rng)}", f"at the end of each {rng.choice(('week', 'month', 'quarter', 'term', 'season'))}",
        f"in {rng.choice(MONTHS)} and {rng.choice(MONTHS)}", f"every {rng.choice(('spring', 'summer', 'autumn', 'winter'))}",
        f"on the {_nth(rng.randint(1, 28))} of every month", f"{rng.choice(('before', 'after'))} every {rng.choice(EVENTS)}",
        f"every {WORDS[n]} {rng.choice(('days', 'weeks', 'months', 'years'))}",
        "at weekends only")[shape]


# ----------------------------------------------------------------------------- places as noun phrases
def _mods(rng: random.Random) -> str:
    out = []
    for pool, p in ((SIZES, 0.15), (COLOURS, 0.35), (MATERIALS, 0.2), (SIDES, 0.25)):
        if rng.random() < p:
            out.append(rng.choice(pool))
    return " ".join(out[:2])


def _np(rng: random.Random, nouns: tuple[str, ...]) -> str:
    mods = _mods(rng)
    return f"the {mods + ' ' if mods else ''}{rng.choice(nouns)}"


def place(rng: random.Random) -> str:
    """Where something is: any noun phrase, one word to a dozen (a shelf, a room by number, an address...)."""
    shape = rng.random()
    if shape < 0.3:
        return f"{_np(rng, CONTAINERS)} {rng.choice(RELATIONS)} {_np(rng, CONTAINERS + VENUES + OBJECTS)}"
    if shape < 0.42:
        return _np(rng, CONTAINERS + VENUES)
    if shape < 0.52:
        return (f"{rng.choice(('room', 'locker', 'bay', 'cupboard', 'shelf', 'cabin', 'unit', 'box'))} "
                f"{rng.choice((str(rng.randint(1, 400)), rng.choice('ABCDEFGH') + str(rng.randint(1, 40))))}"
                f"{'' if rng.random() < 0.4 else ' on the ' + rng.choice(FLOORS) + ' floor'}")
    if shape < 0.6:
        return f"{rng.randint(1, 240)} {word(rng)} {rng.choice(STREETS)}"
    if shape < 0.68:
        return f"the {word(rng)} building" if rng.random() < 0.5 else f"{word(rng)} House"
    if shape < 0.76:
        return f"{_np(rng, CONTAINERS)} of {_np(rng, VENUES)}"
    if shape < 0.84:
        return (f"{_np(rng, CONTAINERS)} {rng.choice(RELATIONS)} {_np(rng, VENUES)} "
                f"{rng.choice(('in', 'on', 'at'))} {word(rng)} {rng.choice(STREETS)}")
    if shape < 0.9:
        return town(rng)
    return f"{rng.choice(('a', 'one', 'any'))} {_mods(rng) or rng.choice(SIZES)} {rng.choice(CONTAINERS)} {rng.choice(RELATIONS)} {_np(rng, VENUES)}"


# ----------------------------------------------------------------------------- short phrases as answers
def requirement(rng: random.Random) -> str:
    return rng.choice((
        f"a signed {rng.choice(('consent', 'safety', 'booking', 'loan', 'entry'))} form",
        f"{rng.choice(('basic', 'advanced', 'half-day', 'two-day', 'online'))} {rng.choice(('first aid', 'safety', 'induction', 'handling', 'rescue'))} training",
        f"written approval from the {rng.choice(ROLES)}", f"a valid {word(rng)} card",
        f"a {rng.choice(('deposit', 'fee'))} of {money(rng)}", f"proof of {rng.choice(('address', 'age', 'insurance', 'membership'))}",
        f"a {rng.choice(('short', 'practical', 'written'))} test with the {rng.choice(ROLES)}",
        f"{rng.choice(('sturdy', 'closed', 'steel-capped'))} shoes and {rng.choice(('gloves', 'goggles', 'a helmet'))}",
        f"at least {number(rng, 2, 20)} hours of supervised practice", f"the {word(rng)} certificate"))


def means(rng: random.Random) -> str:
    """How people or things travel: by what, from where, sometimes how long."""
    how = rng.choice(("by bus", "by ferry", "by train", "on foot", "by bicycle", "by taxi", "by tram", "by boat",
                      "by shuttle bus", "by cable car", "by horse and cart", "by car", "by courier", "by post",
                      "by van", "by helicopter"))
    tail = rng.random()
    if tail < 0.35:
        return how
    if tail < 0.7:
        return f"{how} from {rng.choice((town(rng), _np(rng, VENUES)))}"
    return f"{how} {rng.choice(('along', 'across', 'over', 'through'))} {_np(rng, ('bridge', 'river', 'valley', 'park', 'square', 'harbour', 'hill', 'marsh', 'woods'))}"


def origin(rng: random.Random) -> str:
    return rng.choice((f"a farm near {town(rng)}", f"the {word(rng)} {rng.choice(('quarry', 'mill', 'forest', 'spring', 'dairy', 'works'))}",
                       f"recycled {rng.choice(MATERIALS)}", f"local {rng.choice(('growers', 'suppliers', 'farms', 'makers'))}",
                       f"{_np(rng, CONTAINERS)} {rng.choice(RELATIONS)} {_np(rng, VENUES)}", town(rng),
                       f"{word(rng)} {rng.choice(('Ltd', 'and Sons', 'Brothers', 'Supplies', 'Trading', '& Co'))}",
                       f"{rng.choice(('donations', 'gifts', 'leftovers'))} from {rng.choice(('members', 'neighbours', 'the market', 'local shops'))}"))


def reason(rng: random.Random) -> str:
    return rng.choice((f"repairs to the {rng.choice(CONTAINERS + OBJECTS)}", f"the {rng.choice(EVENTS)}",
                       f"a shortage of {rng.choice(('staff', 'volunteers', 'money', 'parts', 'space'))}",
                       f"{rng.choice(('staff', 'volunteer', 'safety'))} training", "cleaning", "a private booking",
                       f"building work on {rng.choice(('the roof', 'the stairs', 'the floor', 'the windows'))}",
                       f"the {rng.choice(('weekly', 'monthly', 'yearly'))} {rng.choice(('deep clean', 'stock count', 'inspection', 'audit'))}",
                       f"low demand in {rng.choice(MONTHS)}", f"noise from {_np(rng, VENUES)}"))


def ident(rng: random.Random) -> tuple[str, str]:
    """(kind, the identifier as written): ``platform 4``, ``extension 2231``, ``room B12``, ``146.5 MHz``..."""
    kind = rng.choice(("extension", "platform", "gate", "bay", "room", "line", "pier", "desk", "hall", "channel",
                       "code", "stand", "berth", "court", "locker", "frequency"))
    if kind == "frequency":
        return kind, f"{rng.randint(88, 480)}.{rng.randint(0, 99)} MHz"
    if kind in ("extension", "code"):
        return kind, f"{kind} {rng.randint(100, 9999)}"
    return kind, f"{kind} {rng.choice((str(rng.randint(1, 60)), rng.choice('ABCDEF') + str(rng.randint(1, 30)), str(rng.randint(1, 9)) + rng.choice('ABC')))}"


def money(rng: random.Random) -> str:
    n = number(rng, 1, 900, words=0, decimals=0.0)
    cents = rng.choice(("", "", ".50", ".99", ".25", f".{rng.randint(10, 99)}"))
    cur = rng.random()
    if cur < 0.25:
        return f"€{n}{cents}"
    if cur < 0.4:
        return f"${n}{cents}"
    if cur < 0.5:
        return f"£{n}{cents}"
    return f"{n}{cents} {rng.choice(('euros', 'dollars', 'pounds', 'kroner', 'francs', 'crowns'))}"
