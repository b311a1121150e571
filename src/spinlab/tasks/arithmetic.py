"""Synthetic grade-school arithmetic word problems: the embedded default SFT data set.

Every example is ``{"prompt": str, "response": str, "answer": str}``. The data is generated
here from small word lists and seeded random streams, so nothing is downloaded and every
answer can be checked exactly.

p_data is known: each template has exactly one fixed phrasing for its solution, and the
prompt determines all the numbers, so the reference response is a deterministic function of
the prompt. For every prompt the real-data distribution p_data(y | x) is therefore a point
mass (a delta) on that one response, which makes it easy to see how far a fine-tuned model
has moved towards it.

Responses are short step-by-step solutions that always end with ``The answer is N.``; every
arithmetic step is written as ``a op b = c`` with op in ``* + - /``.

Splits are disjoint by prompt. Each split is drawn from its own stream,
``random.Random(f"{seed}-{split}")``, and rejects prompts already taken by a split of higher
priority (test, then validation, then train), so test and validation rows do not change when
``n_train`` changes.
"""

import random
import re
from decimal import Decimal, InvalidOperation

from spinlab.errors import ConfigError

SPLITS = ("train", "validation", "test")
# Highest priority first: a later split may never reuse an earlier split's prompts.
_PRIORITY = ("test", "validation", "train")

NAMES = (
    "Sam", "Mia", "Leo", "Ava", "Noah", "Emma", "Omar", "Lily",
    "Ben", "Zoe", "Ravi", "Nina", "Tom", "Sara", "Kai", "Ella",
)  # fmt: skip
ITEMS = (
    "pens", "apples", "books", "pencils", "cards", "stickers", "marbles", "cookies",
    "oranges", "toys", "cups", "balls", "notebooks", "candles", "plates", "shells",
)  # fmt: skip
CONTAINERS = ("boxes", "bags", "baskets", "jars", "trays", "crates")
# (unit singular, unit plural, smaller unit, factor, prompt); "{item}" is filled from ITEMS.
UNITS = (
    ("kilometer", "kilometers", "meters", 1000,
     "{name} runs {a} kilometers. How many meters does {name} run?"),
    ("hour", "hours", "minutes", 60,
     "{name} reads for {a} hours. How many minutes does {name} read?"),
    ("minute", "minutes", "seconds", 60,
     "{name} jogs for {a} minutes. How many seconds does {name} jog?"),
    ("meter", "meters", "centimeters", 100,
     "{name} cuts a rope {a} meters long. How many centimeters long is the rope?"),
    ("kilogram", "kilograms", "grams", 1000,
     "{name} carries a bag of {a} kilograms. How many grams does the bag weigh?"),
    ("week", "weeks", "days", 7,
     "{name} travels for {a} weeks. How many days does {name} travel?"),
    ("day", "days", "hours", 24,
     "{name} camps for {a} days. How many hours does {name} camp?"),
    ("foot", "feet", "inches", 12,
     "{name} builds a fence {a} feet long. How many inches long is the fence?"),
    ("dozen", "dozen", "{item}", 12,
     "{name} buys {a} dozen {item}. How many {item} does {name} buy?"),
)  # fmt: skip

LO, HI = 2, 20  # operand range for most templates
_SPAN = HI - LO + 1


def _price(rng: random.Random) -> tuple[str, str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, p = rng.randint(LO, HI), rng.randint(LO, HI)
    r = a * p
    return (
        f"{name} buys {a} {item} at {p} dollars each. How many dollars does {name} spend?",
        f"{a} {item} at {p} dollars each cost {a} * {p} = {r} dollars. The answer is {r}.",
        r,
    )


def _groups(rng: random.Random) -> tuple[str, str, int]:
    box, item = rng.choice(CONTAINERS), rng.choice(ITEMS)
    a, b = rng.randint(LO, HI), rng.randint(LO, HI)
    r = a * b
    return (
        f"There are {a} {box} with {b} {item} in each. How many {item} are there in total?",
        f"{a} {box} of {b} {item} make {a} * {b} = {r} {item}. The answer is {r}.",
        r,
    )


def _add(rng: random.Random) -> tuple[str, str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(LO, HI), rng.randint(LO, HI)
    r = a + b
    return (
        f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
        f"{name} has {a} + {b} = {r} {item} now. The answer is {r}.",
        r,
    )


_SUB_MAX = 30


def _sub(rng: random.Random) -> tuple[str, str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a = rng.randint(2 * LO, _SUB_MAX)
    b = rng.randint(LO, a - LO)  # result >= 2 keeps "N items left" plural
    r = a - b
    return (
        f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?",
        f"{name} has {a} - {b} = {r} {item} left. The answer is {r}.",
        r,
    )


_TWO_HI = 12  # smaller numbers so the two-step problem stays short and mental


def _two_step(rng: random.Random) -> tuple[str, str, int]:
    name = rng.choice(NAMES)
    x, y = rng.sample(ITEMS, 2)
    a, p, b, q = (rng.randint(LO, _TWO_HI) for _ in range(4))
    s1, s2 = a * p, b * q
    r = s1 + s2
    prompt = (
        f"{name} buys {a} {x} at {p} dollars each and {b} {y} at {q} dollars each. "
        f"How many dollars does {name} spend?"
    )
    response = (
        f"{a} * {p} = {s1} and {b} * {q} = {s2}, so the total is {s1} + {s2} = {r} dollars. "
        f"The answer is {r}."
    )
    return prompt, response, r


def _convert(rng: random.Random) -> tuple[str, str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    one, many, small, factor, prompt = rng.choice(UNITS)
    small = small.format(item=item)
    a = rng.randint(LO, HI)
    r = a * factor
    response = (
        f"1 {one} is {factor} {small}, so {a} {many} is {a} * {factor} = {r} {small}. The answer is {r}."
    )
    return prompt.format(name=name, a=a, item=item), response, r


_DIV_K = (2, 10)  # number of friends
_DIV_Q = (2, 12)  # share per friend


def _divide(rng: random.Random) -> tuple[str, str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    k, q = rng.randint(*_DIV_K), rng.randint(*_DIV_Q)
    n = k * q  # built from the quotient so the division is always exact
    prompt = f"{name} shares {n} {item} equally among {k} friends. How many {item} does each friend get?"
    return prompt, f"Each friend gets {n} / {k} = {q} {item}. The answer is {q}.", q


_N, _I = len(NAMES), len(ITEMS)
# (sampler, upper bound on its distinct prompts); the bound lets an impossible request fail
# at once instead of after a long search.
TEMPLATES = (
    (_price, _N * _I * _SPAN**2),
    (_groups, len(CONTAINERS) * _I * _SPAN**2),
    (_add, _N * _I * _SPAN**2),
    (_sub, _N * _I * sum(a - 2 * LO + 1 for a in range(2 * LO, _SUB_MAX + 1))),
    (_two_step, _N * _I * (_I - 1) * (_TWO_HI - LO + 1) ** 4),
    (_convert, _N * (len(UNITS) - 1 + _I) * _SPAN),
    (_divide, _N * _I * (_DIV_K[1] - _DIV_K[0] + 1) * (_DIV_Q[1] - _DIV_Q[0] + 1)),
)
PROMPT_SPACE = sum(size for _, size in TEMPLATES)


def _sample_rows(rng: random.Random, n: int, taken: set[str], templates=TEMPLATES) -> list[dict]:
    """Draw ``n`` rows with prompts not in ``taken``; adds the new prompts to ``taken``."""
    rows: list[dict] = []
    # Bounded so an exhausted prompt space raises instead of looping forever.
    max_attempts = 50 * n + 1000
    for _ in range(max_attempts):
        if len(rows) == n:
            return rows
        sampler, _ = rng.choice(templates)
        prompt, response, answer = sampler(rng)
        if prompt in taken:
            continue
        taken.add(prompt)
        rows.append({"prompt": prompt, "response": response, "answer": str(answer)})
    if len(rows) == n:
        return rows
    raise ValueError(
        f"could not draw {n} distinct prompts after {max_attempts} attempts "
        f"(got {len(rows)}); the prompt space is exhausted, ask for fewer examples"
    )


class ArithmeticTask:
    """Train/validation/test splits of arithmetic word problems, disjoint by prompt."""

    def __init__(self, n_train: int = 2000, n_validation: int = 200, n_test: int = 200, seed: int = 0):
        sizes = {"train": n_train, "validation": n_validation, "test": n_test}
        for split, n in sizes.items():
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ConfigError(f"data.source.n_{split} must be a non-negative int, got {n!r}")
        total = sum(sizes.values())
        if total > PROMPT_SPACE:
            raise ConfigError(
                f"data.source: requested {total} examples but at most {PROMPT_SPACE} distinct prompts exist"
            )
        self.seed = seed
        self.sizes = sizes
        taken: set[str] = set()
        self._rows = {
            split: _sample_rows(random.Random(f"{seed}-{split}"), sizes[split], taken) for split in _PRIORITY
        }

    @staticmethod
    def is_correct(response: str, answer: str) -> bool:
        """Answers are checkable: the evaluation grades generated responses with this."""
        return is_correct(response, answer)

    def load(self, split: str) -> list[dict]:
        if split not in self._rows:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        # Copies, so a caller editing rows cannot corrupt later loads.
        return [dict(row) for row in self._rows[split]]


_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
_FINAL_RE = re.compile(r"the answer is\s*:?\s*\$?\s*(" + _NUMBER + ")", re.IGNORECASE | re.ASCII)
# The lookbehind keeps "10-3" from reading as the number -3.
_ANY_RE = re.compile(r"(?<!\d)" + _NUMBER, re.ASCII)


def _normalize(number: str) -> str:
    # String surgery rather than int(): int() refuses numbers over 4300 digits.
    sign, number = ("-", number[1:]) if number.startswith("-") else ("", number)
    whole, dot, frac = number.replace(",", "").partition(".")
    whole = whole.lstrip("0") or "0"
    if whole == "0" and not frac.strip("0"):
        sign = ""  # "-0" is just "0"
    return sign + whole + dot + frac


def extract_answer(text: str) -> str | None:
    """The number after the last "The answer is", else the last number in ``text``, else None."""
    finals = _FINAL_RE.findall(text)
    if finals:
        return _normalize(finals[-1])
    numbers = _ANY_RE.findall(text)
    if numbers:
        return _normalize(numbers[-1])
    return None


def is_correct(response: str, answer: str) -> bool:
    """Whether the answer extracted from ``response`` equals ``answer`` numerically."""
    predicted = extract_answer(response)
    if predicted is None:
        return False
    try:
        return Decimal(predicted) == Decimal(answer.replace(",", "").strip())
    except InvalidOperation:
        return False
