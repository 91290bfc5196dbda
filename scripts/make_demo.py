#!/usr/bin/env python3
"""Generate the bundled demo dataset ``qbco/data/demo.jsonl``.

The dataset imitates thumbs-up / thumbs-down feedback logs on prompts whose
answers can be checked automatically.  Every line is one JSON object::

    {"prompt": str, "completion": str, "label": bool, "task": str,
     "split": "train" | "eval", "check": {...}}

* ``label`` is ``true`` for a thumbs-up (correct, helpful, short answer) and
  ``false`` for a thumbs-down.  Thumbs-down completions are, in roughly equal
  thirds, *wrong* (helpful format, wrong answer), *evasive* or *rude*.
* Each prompt has 2 or 3 completions and at least one thumbs-down; most
  prompts also have one thumbs-up, so they provide (up, down) pairs.
* About 40% of the rows are thumbs-up (as in HelpSteer2).
* The train/eval split is by prompt and stratified by task.
* ``check`` says what a right answer to the prompt is (a spec of
  ``qbco.eval.tasks``: the number, the word, the exact text or the list
  format), so that generated answers can be scored; every thumbs-up
  completion passes its check and every thumbs-down one fails it.  It is
  derived from the task data alone and draws no random numbers, so the
  other fields are exactly those of the file before it had checks.

The generator is stdlib-only and fully deterministic: running

    python scripts/make_demo.py

reproduces the committed file byte for byte (seed 0 by default).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Callable, Dict, List

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "qbco" / "data" / "demo.jsonl"

UP_SHARE = 0.40  # target share of thumbs-up rows
NO_UP_SHARE = 0.07  # share of prompts that have no thumbs-up completion at all
EVAL_SHARE = 0.20  # share of prompts (per task) in the eval split

DOWN_KINDS = ("wrong", "evasive", "rude")

# --------------------------------------------------------------------------
# Evasive and rude phrasings (no digits, so numeric checks can ignore them)
# --------------------------------------------------------------------------

EVASIVE_GENERIC = [
    "I'm not sure. You could look that up online.",
    "I don't really know, sorry.",
    "Hmm, hard to say. Maybe ask someone else.",
    "I'd rather not guess on that one.",
    "That's a tricky one. I can't help with it right now.",
    "You might want to check another source for that.",
    "I'm not able to answer that, unfortunately.",
    "Good question! I'm honestly not sure.",
]

EVASIVE_TASK = {
    "arithmetic": [
        "You could use a calculator for that.",
        "Math isn't really my strong suit, sorry.",
    ],
    "units": [
        "Conversions can be tricky. Try an online converter.",
        "It depends on the units, so I can't really say.",
    ],
    "capitals": [
        "Geography isn't my area. Try an atlas.",
        "Capitals change sometimes, so I can't say for sure.",
    ],
    "format": [
        "I can't really do that kind of request.",
        "Sorry, I don't do formatting tasks.",
    ],
    "spelling": [
        "You could check a dictionary for that.",
        "I'm not confident about spelling, sorry.",
    ],
    "opposites": [
        "Words can have many opposites, so it's hard to say.",
        "Try a thesaurus for that.",
    ],
}

RUDE_GENERIC = [
    "That's a silly question. Work it out yourself.",
    "Seriously? Even a child knows this.",
    "Figure it out on your own.",
    "I'm not wasting my time on this.",
    "Why would you ask me something so obvious?",
    "Ask someone else. I'm busy.",
    "Use your own brain for once.",
    "What a pointless question.",
]

RUDE_TASK = {
    "arithmetic": ["Do your own homework.", "Did you skip math class?"],
    "units": ["Just look at a conversion chart, it's not hard."],
    "capitals": ["Look at a map like everyone else."],
    "format": ["Do it yourself, it's not hard.", "I'm not your typist."],
    "spelling": ["Buy a dictionary and stop asking me."],
    "opposites": ["Open a thesaurus and stop bothering me."],
}

# --------------------------------------------------------------------------
# Task data
# --------------------------------------------------------------------------

# (country as used in a sentence, capital, other well-known cities of it)
CAPITALS = [
    ("France", "Paris", ["Lyon", "Marseille"]),
    ("Germany", "Berlin", ["Munich", "Hamburg", "Frankfurt"]),
    ("Italy", "Rome", ["Milan", "Naples"]),
    ("Spain", "Madrid", ["Barcelona", "Seville"]),
    ("Portugal", "Lisbon", ["Porto"]),
    ("the United Kingdom", "London", ["Manchester", "Birmingham"]),
    ("Ireland", "Dublin", ["Cork"]),
    ("the Netherlands", "Amsterdam", ["Rotterdam"]),
    ("Belgium", "Brussels", ["Antwerp"]),
    ("Switzerland", "Bern", ["Zurich", "Geneva"]),
    ("Austria", "Vienna", ["Salzburg"]),
    ("Poland", "Warsaw", ["Krakow"]),
    ("Sweden", "Stockholm", ["Gothenburg"]),
    ("Norway", "Oslo", ["Bergen"]),
    ("Denmark", "Copenhagen", ["Aarhus"]),
    ("Finland", "Helsinki", ["Tampere"]),
    ("Greece", "Athens", ["Thessaloniki"]),
    ("Turkey", "Ankara", ["Istanbul"]),
    ("Russia", "Moscow", ["Saint Petersburg"]),
    ("the Czech Republic", "Prague", ["Brno"]),
    ("Hungary", "Budapest", ["Debrecen"]),
    ("Iceland", "Reykjavik", []),
    ("Egypt", "Cairo", ["Alexandria"]),
    ("Nigeria", "Abuja", ["Lagos"]),
    ("Kenya", "Nairobi", ["Mombasa"]),
    ("Morocco", "Rabat", ["Casablanca", "Marrakesh"]),
    ("Ethiopia", "Addis Ababa", []),
    ("China", "Beijing", ["Shanghai"]),
    ("Japan", "Tokyo", ["Osaka", "Kyoto"]),
    ("South Korea", "Seoul", ["Busan"]),
    ("India", "New Delhi", ["Mumbai"]),
    ("Pakistan", "Islamabad", ["Karachi"]),
    ("Vietnam", "Hanoi", ["Ho Chi Minh City"]),
    ("Thailand", "Bangkok", ["Chiang Mai"]),
    ("Saudi Arabia", "Riyadh", ["Jeddah"]),
    ("Iran", "Tehran", ["Isfahan"]),
    ("Australia", "Canberra", ["Sydney", "Melbourne"]),
    ("New Zealand", "Wellington", ["Auckland"]),
    ("Canada", "Ottawa", ["Toronto", "Vancouver", "Montreal"]),
    ("the United States", "Washington, D.C.", ["New York", "Los Angeles"]),
    ("Mexico", "Mexico City", ["Guadalajara"]),
    ("Brazil", "Brasilia", ["Rio de Janeiro", "Sao Paulo"]),
    ("Argentina", "Buenos Aires", ["Cordoba"]),
    ("Chile", "Santiago", ["Valparaiso"]),
    ("Peru", "Lima", ["Cusco"]),
    ("Colombia", "Bogota", ["Medellin"]),
]

# (from unit plural, to unit plural, factor, plausible wrong factors)
CONVERSIONS = [
    ("kilometers", "meters", 1000, [100, 10]),
    ("meters", "centimeters", 100, [10, 1000]),
    ("centimeters", "millimeters", 10, [100]),
    ("hours", "minutes", 60, [100, 30]),
    ("minutes", "seconds", 60, [100]),
    ("days", "hours", 24, [12, 20]),
    ("weeks", "days", 7, [5, 10]),
    ("years", "months", 12, [10]),
    ("kilograms", "grams", 1000, [100]),
    ("liters", "milliliters", 1000, [100]),
    ("feet", "inches", 12, [10]),
    ("yards", "feet", 3, [2, 12]),
    ("gallons", "quarts", 4, [2, 8]),
    ("pounds", "ounces", 16, [12, 10]),
    ("dozens", "items", 12, [10]),
]

# (word, antonym, near-synonym used as a plausible wrong answer or None)
OPPOSITES = [
    ("hot", "cold", "warm"),
    ("big", "small", "large"),
    ("happy", "sad", "glad"),
    ("fast", "slow", "quick"),
    ("early", "late", "soon"),
    ("open", "closed", "unlocked"),
    ("full", "empty", "packed"),
    ("rich", "poor", "wealthy"),
    ("strong", "weak", "powerful"),
    ("win", "lose", "succeed"),
    ("buy", "sell", "purchase"),
    ("push", "pull", "shove"),
    ("true", "false", "correct"),
    ("begin", "end", "start"),
    ("above", "below", "over"),
    ("inside", "outside", "within"),
    ("increase", "decrease", "grow"),
    ("ancient", "modern", "old"),
    ("wet", "dry", "damp"),
    ("clean", "dirty", "tidy"),
    ("loud", "quiet", "noisy"),
    ("thick", "thin", "dense"),
    ("wide", "narrow", "broad"),
    ("safe", "dangerous", "secure"),
    ("cheap", "expensive", "inexpensive"),
    ("north", "south", None),
    ("day", "night", None),
    ("always", "never", "often"),
    ("asleep", "awake", "sleepy"),
    ("entrance", "exit", "doorway"),
    ("float", "sink", "drift"),
    ("love", "hate", "adore"),
    ("friend", "enemy", "buddy"),
    ("maximum", "minimum", None),
    ("positive", "negative", None),
    ("visible", "invisible", "clear"),
    ("arrive", "depart", "reach"),
    ("generous", "selfish", "kind"),
]

# (correct spelling, common misspelling)
SPELLINGS = [
    ("receive", "recieve"),
    ("separate", "seperate"),
    ("definitely", "definately"),
    ("necessary", "neccessary"),
    ("occurrence", "occurence"),
    ("accommodate", "accomodate"),
    ("embarrass", "embarass"),
    ("believe", "beleive"),
    ("calendar", "calender"),
    ("tomorrow", "tommorow"),
    ("weird", "wierd"),
    ("government", "goverment"),
    ("environment", "enviroment"),
    ("beginning", "begining"),
    ("library", "libary"),
    ("address", "adress"),
    ("argument", "arguement"),
    ("existence", "existance"),
    ("foreign", "foriegn"),
    ("grammar", "grammer"),
    ("guarantee", "garantee"),
    ("immediately", "immediatly"),
    ("independent", "independant"),
    ("knowledge", "knowlege"),
    ("millennium", "millenium"),
    ("occasion", "ocassion"),
    ("privilege", "priviledge"),
    ("recommend", "reccomend"),
    ("rhythm", "rythm"),
    ("successful", "succesful"),
]

# Answers a checker also accepts (never a thumbs-up completion: those use the first name only).
CAPITAL_ALSO = {"Washington, D.C.": ["Washington"], "New Delhi": ["Delhi"]}
OPPOSITE_ALSO = {
    "big": ["little", "tiny"], "open": ["shut"], "begin": ["finish"], "arrive": ["leave"], "win": ["losing"],
    "generous": ["stingy", "mean"], "safe": ["unsafe"], "true": ["untrue"], "ancient": ["new"],
    "loud": ["silent"], "increase": ["reduce"], "always": ["seldom", "rarely"], "float": ["sinking"],
}

LETTER_COUNT_WORDS = [
    "ocean", "banana", "elephant", "window", "pencil", "computer",
    "mountain", "sky", "garden", "yellow", "river", "butterfly",
]

LIST_CATEGORIES = [
    ("fruits", ["apple", "banana", "cherry", "grape", "mango", "orange", "pear", "peach", "plum"]),
    ("colors", ["red", "blue", "green", "yellow", "purple", "pink", "black", "white"]),
    ("animals", ["dog", "cat", "horse", "lion", "tiger", "rabbit", "elephant", "zebra"]),
    ("vegetables", ["carrot", "potato", "onion", "pea", "broccoli", "spinach", "cabbage"]),
    ("planets", ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Neptune"]),
    ("musical instruments", ["piano", "guitar", "violin", "drum", "flute", "trumpet", "cello"]),
    ("birds", ["eagle", "owl", "sparrow", "robin", "parrot", "penguin", "crow"]),
    ("flowers", ["rose", "tulip", "daisy", "lily", "orchid", "sunflower"]),
    ("metals", ["iron", "copper", "gold", "silver", "zinc", "tin"]),
    ("sports", ["soccer", "tennis", "basketball", "golf", "hockey", "baseball"]),
]

CASE_WORDS = [
    "ocean", "mountain", "river", "garden", "window", "planet", "coffee",
    "guitar", "forest", "rocket", "pencil", "silver", "thunder", "island",
    "bridge", "candle", "dragon", "violin", "winter", "harbor",
]

NUMBER_WORDS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
    "nine", "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen",
    "sixteen", "seventeen", "eighteen", "nineteen",
]
TENS_WORDS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

TASK_SIZES = {  # number of distinct prompts per task
    "arithmetic": 75,
    "units": 55,
    "capitals": len(CAPITALS),
    "format": 60,
    "spelling": len(SPELLINGS) + len(LETTER_COUNT_WORDS),
    "opposites": len(OPPOSITES),
}

Item = Dict[str, object]  # task, prompt, up, wrong (callable rng -> str), check (a qbco.eval.tasks spec)


def _num_to_words(n: int) -> str:
    if n < 20:
        return NUMBER_WORDS[n]
    tens, ones = divmod(n, 10)
    return TENS_WORDS[tens] + ("-" + NUMBER_WORDS[ones] if ones else "")


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def _item(task: str, prompt: str, up: str, wrong: Callable[[random.Random], str], check: dict) -> Item:
    return {"task": task, "prompt": prompt, "up": up, "wrong": wrong, "check": check}


# --------------------------------------------------------------------------
# Per-task item builders
# --------------------------------------------------------------------------

def _arithmetic_items(rng: random.Random, n: int) -> List[Item]:
    prompt_tpls = ["What is {a} {op} {b}?", "Calculate {a} {op} {b}.", "Compute {a} {op} {b}."]
    answer_tpls = ["{a} {op} {b} = {r}.", "{a} {op} {b} is {r}.", "The answer is {r}."]
    ops = {"add": ["+", "plus"], "sub": ["-", "minus"], "mul": ["*", "times"]}
    items: List[Item] = []
    seen = set()
    kinds = ["add", "sub", "mul"]
    while len(items) < n:
        kind = kinds[len(items) % 3]
        if kind == "add":
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            r = a + b
            offsets = [-10, -2, -1, 1, 2, 10]
        elif kind == "sub":
            a = rng.randint(10, 99)
            b = rng.randint(2, a - 1)
            r = a - b
            offsets = [-10, -2, -1, 1, 2, 10]
        else:
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            r = a * b
            offsets = sorted({-a, -b, -1, 1, a, b, 10})
        if (kind, a, b) in seen:
            continue
        seen.add((kind, a, b))
        op = rng.choice(ops[kind])
        prompt = rng.choice(prompt_tpls).format(a=a, op=op, b=b)
        tpl = rng.choice(answer_tpls)
        up = tpl.format(a=a, op=op, b=b, r=r)

        def wrong(rg, a=a, b=b, op=op, r=r, tpl=tpl, offsets=offsets):
            cands = [r + d for d in offsets if r + d >= 0 and d != 0]
            return tpl.format(a=a, op=op, b=b, r=rg.choice(cands))

        items.append(_item("arithmetic", prompt, up, wrong, {"kind": "number", "value": r}))
    return items


def _units_items(rng: random.Random, n: int) -> List[Item]:
    prompt_tpls = [
        "How many {to} are in {n} {frm}?",
        "Convert {n} {frm} to {to}.",
        "How many {to} is {n} {frm}?",
    ]
    answer_tpls = ["{n} {frm} is {r} {to}.", "{n} {frm} equals {r} {to}.", "That is {r} {to}."]
    items: List[Item] = []
    seen = set()
    while len(items) < n:
        frm, to, f, wrong_factors = CONVERSIONS[len(items) % len(CONVERSIONS)]
        q = rng.randint(2, 15)
        if (frm, q) in seen:
            continue
        seen.add((frm, q))
        r = q * f
        prompt = rng.choice(prompt_tpls).format(n=q, frm=frm, to=to)
        tpl = rng.choice(answer_tpls)
        up = tpl.format(n=q, frm=frm, to=to, r=r)
        cands = sorted({q * wf for wf in wrong_factors} | {(q + 1) * f, (q - 1) * f, r + 1, r - 1})
        cands = [c for c in cands if c > 0 and c != r]

        def wrong(rg, q=q, frm=frm, to=to, tpl=tpl, cands=cands):
            return tpl.format(n=q, frm=frm, to=to, r=rg.choice(cands))

        items.append(_item("units", prompt, up, wrong, {"kind": "number", "value": r}))
    return items


def _capitals_items(rng: random.Random) -> List[Item]:
    prompt_tpls = [
        "What is the capital of {c}?",
        "Which city is the capital of {c}?",
        "Name the capital city of {c}.",
    ]
    answer_tpls = ["The capital of {c} is {x}.", "{x} is the capital of {c}."]
    all_capitals = [cap for _, cap, _ in CAPITALS]
    items: List[Item] = []
    for country, capital, others in CAPITALS:
        prompt = rng.choice(prompt_tpls).format(c=country)
        tpl = rng.choice(answer_tpls)
        up = tpl.format(c=country, x=capital)
        # Prefer other cities of the same country; fall back to another capital.
        cands = list(others) or [x for x in all_capitals if x != capital]

        def wrong(rg, country=country, tpl=tpl, cands=cands):
            return tpl.format(c=country, x=rg.choice(cands))

        names = [capital, *CAPITAL_ALSO.get(capital, [])]
        wrongs = sorted(({*others, *all_capitals} - set(names)) - {country})
        items.append(_item("capitals", prompt, up, wrong, {"kind": "mentions", "any": names, "wrong": wrongs}))
    return items


def _format_items(rng: random.Random, n: int) -> List[Item]:
    items: List[Item] = []
    counts = ["two", "three", "four"]
    count_n = {"two": 2, "three": 3, "four": 4}
    seps = [("commas", ", "), ("semicolons", "; ")]

    # 1) Lists with a given number of items and separator.
    combos = [(ci, k, si) for ci in range(len(LIST_CATEGORIES)) for k in counts for si in range(len(seps))]
    rng.shuffle(combos)
    used_cats = set()
    n_lists = 14
    for ci, k, si in combos:
        if len(items) >= n_lists:
            break
        if (ci, si) in used_cats:  # avoid near-duplicate prompts
            continue
        used_cats.add((ci, si))
        cat, pool = LIST_CATEGORIES[ci]
        sep_name, sep = seps[si]
        m = count_n[k]
        prompt = f"List {k} {cat}, separated by {sep_name}."
        chosen = rng.sample(pool, m + 1)
        up = sep.join(chosen[:m])
        other_sep = seps[1 - si][1]
        other_pool = LIST_CATEGORIES[(ci + 1) % len(LIST_CATEGORIES)][1]

        def wrong(rg, chosen=chosen, m=m, sep=sep, other_sep=other_sep, other_pool=other_pool):
            style = rg.randrange(4)
            if style == 0:  # wrong number of items
                return sep.join(chosen[: m + rg.choice([-1, 1])])
            if style == 1:  # wrong separator
                return other_sep.join(chosen[:m])
            if style == 2:  # ignores the list format
                return " and ".join(chosen[:m]).capitalize() + " are good examples."
            return sep.join(rg.sample(other_pool, m))  # wrong category

        check = {"kind": "list", "count": m, "separator": sep, "of": sorted(pool)}
        items.append(_item("format", prompt, up, wrong, check))

    # 2) Upper / lower case.
    words = list(CASE_WORDS)
    rng.shuffle(words)
    for w in words[:10]:
        prompt = f"Write the word '{w}' in all capital letters."

        def wrong(rg, w=w):
            return rg.choice([w, w.capitalize(), f"Sure: {w}.", w[: len(w) // 2].upper() + w[len(w) // 2:]])

        items.append(_item("format", prompt, w.upper(), wrong, {"kind": "exact", "value": w.upper()}))
    for w in words[10:16]:
        prompt = f"Write the word '{w.upper()}' in all lowercase letters."

        def wrong(rg, w=w):
            return rg.choice([w.upper(), w.capitalize(), f"Sure: {w.upper()}."])

        items.append(_item("format", prompt, w, wrong, {"kind": "exact", "value": w}))

    # 3) Number words to digits.
    nums = rng.sample(range(21, 100), 8)
    for x in nums:
        words_x = _num_to_words(x)
        prompt = f"Write the number '{words_x}' using digits only."

        def wrong(rg, x=x, words_x=words_x):
            return rg.choice([
                f"{words_x.capitalize()} is {x}.",
                str(x + rg.choice([-1, 1, 10])),
                str(x)[::-1] if x % 11 else str(x + 1),
                words_x,
            ])

        items.append(_item("format", prompt, str(x), wrong, {"kind": "exact", "value": str(x)}))

    # 4) Yes / no questions.
    seen = set()
    while len(items) < n:
        kind = rng.choice(["odd", "even", "prime", "greater"])
        a = rng.randint(3, 60)
        b = rng.randint(3, 60) if kind == "greater" else 0
        if (kind, a, b) in seen or a == b:
            continue
        seen.add((kind, a, b))
        if kind == "odd":
            q, truth, desc = f"is {a} an odd number?", a % 2 == 1, "an odd number"
        elif kind == "even":
            q, truth, desc = f"is {a} an even number?", a % 2 == 0, "an even number"
        elif kind == "prime":
            q, truth, desc = f"is {a} a prime number?", _is_prime(a), "a prime number"
        else:
            q, truth, desc = f"is {a} greater than {b}?", a > b, f"greater than {b}"
        prompt = f"Answer with only yes or no: {q}"
        up = "Yes." if truth else "No."
        verbose = f"Yes, {a} is {desc}." if truth else f"No, {a} is not {desc}."

        def wrong(rg, truth=truth, verbose=verbose):
            return rg.choice(["No." if truth else "Yes.", verbose])

        check = {"kind": "exact", "value": "yes" if truth else "no", "case": False}
        items.append(_item("format", prompt, up, wrong, check))
    return items


def _spelling_items(rng: random.Random) -> List[Item]:
    items: List[Item] = []
    answer_tpls = ["The correct spelling is '{x}'.", "'{x}' is the correct spelling."]
    for good, bad in SPELLINGS:
        a, b = (good, bad) if rng.random() < 0.5 else (bad, good)
        prompt = rng.choice([
            f"Which is spelled correctly: '{a}' or '{b}'?",
            f"What is the correct spelling: '{a}' or '{b}'?",
        ])
        tpl = rng.choice(answer_tpls)

        def wrong(rg, bad=bad):
            return rg.choice(answer_tpls).format(x=bad)

        check = {"kind": "choice", "right": good, "wrong": bad}
        items.append(_item("spelling", prompt, tpl.format(x=good), wrong, check))
    for w in LETTER_COUNT_WORDS:
        prompt = f"How many letters are in the word '{w}'?"
        k = len(w)

        def wrong(rg, w=w, k=k):
            return f"The word '{w}' has {k + rg.choice([-2, -1, 1, 2])} letters."

        items.append(_item("spelling", prompt, f"The word '{w}' has {k} letters.", wrong, {"kind": "number", "value": k}))
    return items


def _opposites_items(rng: random.Random) -> List[Item]:
    items: List[Item] = []
    prompt_tpls = ["What is the opposite of '{w}'?", "Give an antonym of '{w}'."]
    answer_tpls = ["The opposite of '{w}' is '{x}'.", "An antonym of '{w}' is '{x}'."]
    all_antonyms = [ant for _, ant, _ in OPPOSITES]
    for w, ant, syn in OPPOSITES:
        pi = rng.randrange(len(prompt_tpls))
        prompt = prompt_tpls[pi].format(w=w)
        tpl = answer_tpls[pi]
        cands = ([syn] if syn else []) + [x for x in all_antonyms if x != ant]

        def wrong(rg, w=w, tpl=tpl, syn=syn, cands=cands):
            x = syn if syn and rg.random() < 0.6 else rg.choice(cands)
            return tpl.format(w=w, x=x)

        right = [ant, *OPPOSITE_ALSO.get(w, [])]
        wrongs = sorted(({syn} if syn else set()) | set(all_antonyms) - set(right) - {w})
        check = {"kind": "mentions", "any": right, "wrong": wrongs}
        items.append(_item("opposites", prompt, tpl.format(w=w, x=ant), wrong, check))
    return items


def build_items(rng: random.Random) -> List[Item]:
    items = (
        _arithmetic_items(rng, TASK_SIZES["arithmetic"])
        + _units_items(rng, TASK_SIZES["units"])
        + _capitals_items(rng)
        + _format_items(rng, TASK_SIZES["format"])
        + _spelling_items(rng)
        + _opposites_items(rng)
    )
    prompts = [it["prompt"] for it in items]
    assert len(prompts) == len(set(prompts)), "duplicate prompts"
    return items


# --------------------------------------------------------------------------
# Assembling rows
# --------------------------------------------------------------------------

def _down_completion(rng: random.Random, item: Item, kind: str) -> str:
    task = item["task"]
    if kind == "wrong":
        return item["wrong"](rng)  # type: ignore[operator]
    if kind == "evasive":
        return rng.choice(EVASIVE_GENERIC + EVASIVE_TASK[task])
    return rng.choice(RUDE_GENERIC + RUDE_TASK[task])


def build_rows(seed: int = 0) -> List[dict]:
    rng = random.Random(seed)
    items = build_items(rng)
    n = len(items)

    # Structure per prompt: (has_up, n_down), with 2 or 3 rows per prompt.
    n_no_up = round(NO_UP_SHARE * n)
    n_up_prompts = n - n_no_up
    n_three = round(n_up_prompts / UP_SHARE) - 2 * n  # prompts with 3 rows
    n_three = max(0, min(n_three, n_up_prompts))
    order = list(range(n))
    rng.shuffle(order)
    structure = {}
    for rank, idx in enumerate(order):
        if rank < n_no_up:
            structure[idx] = (False, 2)
        elif rank < n_no_up + n_three:
            structure[idx] = (True, 2)
        else:
            structure[idx] = (True, 1)

    # Balanced down kinds: equal thirds, shuffled.
    n_down = sum(nd for _, nd in structure.values())
    kinds = [DOWN_KINDS[i % 3] for i in range(n_down)]
    rng.shuffle(kinds)

    # Split by prompt, stratified by task.
    split = {}
    by_task: Dict[str, List[int]] = {}
    for idx, it in enumerate(items):
        by_task.setdefault(it["task"], []).append(idx)  # type: ignore[arg-type]
    for task in sorted(by_task):
        idxs = list(by_task[task])
        rng.shuffle(idxs)
        n_eval = max(1, round(EVAL_SHARE * len(idxs)))
        for j, idx in enumerate(idxs):
            split[idx] = "eval" if j < n_eval else "train"

    rows = []
    k = 0
    for idx, it in enumerate(items):
        has_up, nd = structure[idx]
        comps = []
        if has_up:
            comps.append((it["up"], True))
        seen = {it["up"]}
        for _ in range(nd):
            kind = kinds[k]
            k += 1
            for attempt in range(50):
                # Fall back to another kind if one kind runs out of variants.
                use = kind if attempt < 20 else DOWN_KINDS[(DOWN_KINDS.index(kind) + attempt) % 3]
                c = _down_completion(rng, it, use)
                if c not in seen:
                    break
            else:  # pragma: no cover - never happens with the data above
                raise RuntimeError(f"could not find a distinct completion for {it['prompt']!r}")
            seen.add(c)
            comps.append((c, False))
        for c, label in comps:
            rows.append({
                "prompt": it["prompt"],
                "completion": c,
                "label": label,
                "task": it["task"],
                "split": split[idx],
                "check": it["check"],
            })
    rows.sort(key=lambda r: (r["split"], r["task"], r["prompt"], r["completion"]))
    return rows


def write_rows(rows: List[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with open(out, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output JSONL path (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    args = ap.parse_args(argv)
    rows = build_rows(args.seed)
    write_rows(rows, args.out)
    n_up = sum(r["label"] for r in rows)
    print(f"wrote {len(rows)} rows ({n_up / len(rows):.3f} thumbs-up) to {args.out}")


if __name__ == "__main__":
    main()
