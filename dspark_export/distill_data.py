"""Training data for `dspark-export distill`: an offline prompt corpus and the target's answers.

The corpus is built on the spot from what every Python install carries, so it needs no
download and never reads the evaluation prompts in `../shared/eval/`:

- math: grade-school word problems from templates filled with seeded random names, objects and
  numbers (the answer format instruction of the GSM8K benchmark is used, never its questions);
- code: tasks built from standard-library functions (`inspect` signatures and docstrings):
  "complete this function", "write a function that ...", "write tests for ...", "explain ...";
  and, when a mix asks for them (`code_tasks`), typed functions with doctests
  (distill_code_tasks.py);
- chat: explanations and summaries of the language reference (`pydoc_data.topics`) and of
  module docstrings, plus writing, advice and explanation requests from small word lists.

`build_corpus(n, seed)` is deterministic for a given Python version (docstrings change between
versions; `corpus_digest` records exactly which prompts were used). `--prompts FILE` replaces it
(`load_prompts`: jsonl with `prompt` or `turns`, or plain text lines).

`generate_responses` then runs the target greedily on the chat-formatted prompts (continuous
batching over explicit caches, `greedy_batch.py`) and stores prompt + response token ids with
the prompt length of each sequence (the loss mask covers response tokens only) in one
compressed `.npz`, rewritten after every wave of prompts so an interrupted run resumes where
it stopped.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from dspark_export.distill_code_tasks import code_task_prompts

DOMAINS = ("math", "code", "chat")
DEFAULT_MIX = {"math": 0.35, "code": 0.35, "chat": 0.30}
# Prompt sources a mix can weigh, and the domain each one's prompts count under.
SOURCE_DOMAINS = {"math": "math", "code": "code", "code_tasks": "code", "chat": "chat"}
DATA_FORMAT = "dspark-distill-data/1"
WAVE_SLOTS = 8  # a wave of prompts fills the decoding slots this many times
# The evaluation prompts (never trained on); `load_prompts` refuses files from there.
EVAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "eval"


class DistillDataError(ValueError):
    """A prompt file, data file or generation setting that cannot be used."""


@dataclass(frozen=True)
class Prompt:
    text: str
    domain: str  # math | code | chat | file


# --------------------------------------------------------------------------------------------
# Math: templated word problems
# --------------------------------------------------------------------------------------------

_NAMES = (
    "Amara", "Bruno", "Chen", "Dalia", "Emeka", "Farah", "Gustav", "Hana", "Ivan", "Jonas",
    "Keiko", "Lars", "Mateo", "Nadia", "Oskar", "Priya", "Quinn", "Rosa", "Sami", "Tomas",
    "Umar", "Vera", "Wen", "Ximena", "Yusuf", "Zora", "Adele", "Bilal", "Carmen", "Dmitri",
    "Elif", "Femi", "Greta", "Hugo", "Ines", "Jamal", "Kira", "Leon", "Mira", "Nico",
)
_PRONOUNS = {True: ("she", "her", "She"), False: ("he", "his", "He")}
_FEMININE = {
    "Amara", "Dalia", "Farah", "Hana", "Keiko", "Nadia", "Priya", "Rosa", "Vera", "Ximena",
    "Zora", "Adele", "Carmen", "Elif", "Greta", "Ines", "Kira", "Mira",
}
_ITEMS = (
    ("pencil", "pencils"), ("marble", "marbles"), ("sticker", "stickers"), ("apple", "apples"),
    ("notebook", "notebooks"), ("seashell", "seashells"), ("card", "cards"), ("cookie", "cookies"),
    ("stamp", "stamps"), ("bead", "beads"), ("book", "books"), ("plant", "plants"),
    ("candle", "candles"), ("balloon", "balloons"), ("toy car", "toy cars"), ("ribbon", "ribbons"),
)
_FOODS = (
    ("muffin", "muffins"), ("sandwich", "sandwiches"), ("pie", "pies"), ("taco", "tacos"),
    ("loaf of bread", "loaves of bread"), ("bagel", "bagels"), ("pizza", "pizzas"),
    ("cupcake", "cupcakes"), ("smoothie", "smoothies"), ("burrito", "burritos"),
)
_PLACES = ("bakery", "bookshop", "garden centre", "market stall", "toy store", "hardware store",
           "farm stand", "corner shop", "craft fair", "school fundraiser")
_ANIMALS = (("chicken", "chickens", "eggs"), ("goat", "goats", "litres of milk"),
            ("bee hive", "bee hives", "jars of honey"), ("cow", "cows", "litres of milk"),
            ("duck", "ducks", "eggs"))
_VEHICLES = ("bus", "train", "car", "bicycle", "ferry", "truck")
_MATH_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."
_MATH_SUFFIX_ALT = (
    "Show your work.", "Explain each step.", "Give the final answer as a number.",
    "Think it through step by step.",
)


def _person(rng: random.Random) -> tuple[str, str, str, str]:
    name = rng.choice(_NAMES)
    return (name, *_PRONOUNS[name in _FEMININE])


def _two_people(rng: random.Random):
    a = _person(rng)
    b = _person(rng)
    while b[0] == a[0]:
        b = _person(rng)
    return a, b


def _money(rng: random.Random, low: int, high: int, cents: bool = False) -> str:
    if cents and rng.random() < 0.4:
        return f"${rng.randint(low, high)}.{rng.choice([25, 50, 75])}"
    return f"${rng.randint(low, high)}"


def _m_buy_give(rng):
    (n, she, her, She), (m, *_) = _two_people(rng)
    one, many = rng.choice(_ITEMS)
    a, b = rng.randint(5, 60), rng.randint(2, 40)
    c = rng.randint(1, a + b - 1)
    return (f"{n} has {a} {many}. {She} buys {b} more and then gives {c} to {m}. "
            f"How many {many} does {n} have now?")


def _m_change(rng):
    n, she, her, She = _person(rng)
    one, many = rng.choice(_FOODS)
    price, count = rng.randint(2, 9), rng.randint(2, 8)
    bill = rng.choice([20, 50, 100])
    while price * count >= bill:
        count -= 1
    return (f"A {rng.choice(_PLACES)} sells {many} for ${price} each. {n} buys {count} {many} "
            f"and pays with a ${bill} bill. How much change does {she} get?")


def _m_produce(rng):
    n, she, her, She = _person(rng)
    one, many, product = rng.choice(_ANIMALS)
    k, per, used = rng.randint(3, 30), rng.randint(2, 6), rng.randint(1, 10)
    price = rng.randint(1, 6)
    return (f"{n} keeps {k} {many}. Each one gives {per} {product} a day. {She} uses {used} "
            f"{product} every day at home and sells the rest for ${price} each. How much money "
            f"does {she} make in a week?")


def _m_speed(rng):
    n, she, her, She = _person(rng)
    v = rng.choice(_VEHICLES)
    speed, hours = rng.randint(12, 90), rng.randint(2, 9)
    extra = rng.randint(10, 120)
    return (f"{n} travels by {v} at {speed} kilometres per hour for {hours} hours, then covers "
            f"another {extra} kilometres. How far does {she} travel in total?")


def _m_percent(rng):
    n, she, her, She = _person(rng)
    price = rng.randint(20, 400)
    pct = rng.choice([5, 10, 15, 20, 25, 30, 40, 50])
    one, many = rng.choice(_ITEMS)
    return (f"A {one} usually costs ${price}. During a sale it is {pct}% off. {n} buys "
            f"{rng.randint(2, 6)} of them at the sale price. How much does {she} spend?")


def _m_savings(rng):
    n, she, her, She = _person(rng)
    goal, have, weekly = rng.randint(150, 1200), rng.randint(10, 140), rng.randint(8, 60)
    thing = rng.choice(("bicycle", "laptop", "guitar", "tent", "camera", "skateboard"))
    return (f"{n} wants to buy a {thing} that costs ${goal}. {She} has already saved ${have} "
            f"and saves ${weekly} every week. How many weeks will it take "
            f"{'her' if she == 'she' else 'him'} to have enough money?")


def _m_rectangle(rng):
    n, she, her, She = _person(rng)
    w, l = rng.randint(3, 40), rng.randint(3, 60)
    cost = rng.randint(2, 15)
    what = rng.choice(("fence", "paint the floor of", "tile", "carpet"))
    if what == "fence":
        return (f"{n} wants to put a fence around a rectangular garden that is {w} metres wide "
                f"and {l} metres long. Fencing costs ${cost} per metre. How much will the "
                f"fence cost?")
    return (f"{n} wants to {what} a rectangular room that is {w} metres wide and {l} metres "
            f"long. It costs ${cost} per square metre. What is the total cost?")


def _m_average(rng):
    n, she, her, She = _person(rng)
    k = rng.randint(3, 6)
    scores = [rng.randint(55, 100) for _ in range(k)]
    listed = ", ".join(str(s) for s in scores[:-1]) + f" and {scores[-1]}"
    goal = min(100, max(scores) + 1)
    return (f"{n} scored {listed} on {k} tests. What is {her} average score? How many points "
            f"does {she} need on the next test to raise the average to {goal}?")


def _m_ages(rng):
    (a, *_), (b, *_) = _two_people(rng)
    age, diff, years = rng.randint(4, 40), rng.randint(2, 30), rng.randint(2, 15)
    return (f"{a} is {age} years old. {b} is {diff} years older than {a}. How old will {b} be "
            f"in {years} years, and what will the sum of their ages be then?")


def _m_recipe(rng):
    n, she, her, She = _person(rng)
    one, many = rng.choice(_FOODS)
    base, flour, want = rng.randint(2, 12), rng.randint(1, 6), rng.randint(13, 60)
    return (f"A recipe makes {base} {many} and needs {flour} cups of flour. {n} wants to make "
            f"{want} {many}. How many cups of flour does {she} need?")


def _m_work(rng):
    (a, *_), (b, *_) = _two_people(rng)
    x, y = rng.randint(2, 12), rng.randint(2, 12)
    task = rng.choice(("paint a fence", "fill a pool", "plant a field", "sort the mail"))
    return (f"{a} can {task} in {x} hours. {b} can do the same job in {y} hours. How long "
            f"does it take them if they work together?")


def _m_wages(rng):
    n, she, her, She = _person(rng)
    rate, hours, over = rng.randint(9, 40), rng.randint(20, 40), rng.randint(1, 12)
    return (f"{n} earns ${rate} an hour for the first {hours} hours each week and one and a "
            f"half times that rate for every extra hour. Last week {she} worked {hours + over} "
            f"hours. How much did {she} earn?")


def _m_fractions(rng):
    n, she, her, She = _person(rng)
    one, many = rng.choice(_ITEMS)
    total = rng.randint(4, 20) * 12
    f1 = rng.choice(("half", "a third", "a quarter"))
    f2 = rng.choice(("a third", "a quarter", "a fifth"))
    return (f"{n} had {total} {many}. {She} gave away {f1} of them and then sold {f2} of "
            f"what was left. How many {many} does {she} have now?")


def _m_shopping(rng):
    n, she, her, She = _person(rng)
    parts = []
    for one, many in rng.sample(_FOODS, 3):
        parts.append((rng.randint(1, 6), many, rng.randint(1, 9)))
    listed = "; ".join(f"{q} {m} at ${p} each" for q, m, p in parts)
    budget = rng.randint(40, 120)
    return (f"{n} goes shopping with ${budget}. {She} buys {listed}. How much money does "
            f"{she} have left?")


def _m_time(rng):
    n, she, her, She = _person(rng)
    start_h, start_m = rng.randint(6, 11), rng.choice((0, 15, 30, 45))
    chores = rng.sample(("cleaning", "cooking", "homework", "reading", "gardening", "practice"), 3)
    mins = [rng.randint(10, 95) for _ in chores]
    listed = ", ".join(f"{m} minutes of {c}" for m, c in zip(mins, chores))
    return (f"{n} starts at {start_h}:{start_m:02d} in the morning and does {listed}, with no "
            f"breaks. At what time does {she} finish?")


def _m_tickets(rng):
    n, she, her, She = _person(rng)
    adult, child = rng.randint(8, 30), rng.randint(3, 15)
    a, c = rng.randint(1, 4), rng.randint(1, 5)
    event = rng.choice(("museum", "zoo", "concert", "aquarium", "cinema", "water park"))
    return (f"Tickets to the {event} cost ${adult} for adults and ${child} for children. {n} "
            f"buys tickets for {a} adults and {c} children and pays a ${rng.randint(2, 9)} "
            f"booking fee. What is the total cost?")


def _m_ratio(rng):
    (a, *_), (b, *_) = _two_people(rng)
    x, y = rng.randint(1, 7), rng.randint(1, 7)
    total = (x + y) * rng.randint(3, 25)
    return (f"{a} and {b} share ${total} in the ratio {x}:{y}. How much more does the one with "
            f"the larger share get?")


def _m_units(rng):
    n, she, her, She = _person(rng)
    litres, cups = rng.randint(2, 12), rng.randint(150, 400)
    return (f"{n} has {litres} litres of juice and pours it into cups that hold {cups} "
            f"millilitres each. How many full cups can {she} pour, and how much juice is left?")


def _m_growth(rng):
    n, she, her, She = _person(rng)
    start, rate, years = rng.randint(100, 5000), rng.choice((2, 3, 4, 5, 10)), rng.randint(2, 4)
    return (f"{n} puts ${start} in a savings account that pays {rate}% interest per year, "
            f"compounded yearly. How much is in the account after {years} years?")


def _m_pages(rng):
    n, she, her, She = _person(rng)
    pages, per_day, days = rng.randint(120, 900), rng.randint(10, 60), rng.randint(2, 9)
    return (f"A book has {pages} pages. {n} reads {per_day} pages a day for {days} days, then "
            f"doubles {her} pace. How many more days does {she} need to finish the book?")


_MATH_TEMPLATES: tuple[Callable[[random.Random], str], ...] = (
    _m_buy_give, _m_change, _m_produce, _m_speed, _m_percent, _m_savings, _m_rectangle,
    _m_average, _m_ages, _m_recipe, _m_work, _m_wages, _m_fractions, _m_shopping, _m_time,
    _m_tickets, _m_ratio, _m_units, _m_growth, _m_pages,
)


def _math_prompts(rng: random.Random) -> Iterator[str]:
    while True:
        question = rng.choice(_MATH_TEMPLATES)(rng)
        suffix = _MATH_SUFFIX if rng.random() < 0.8 else rng.choice(_MATH_SUFFIX_ALT)
        yield f"{question}\n{suffix}"


# --------------------------------------------------------------------------------------------
# Code: tasks from the standard library
# --------------------------------------------------------------------------------------------

# Not `inspect`: torch replaces inspect.getfile on import, so the corpus would depend on it.
_STDLIB_MODULES = (
    "base64", "bisect", "calendar", "cmath", "colorsys", "copy", "csv", "datetime", "decimal",
    "difflib", "email.utils", "fnmatch", "fractions", "functools", "glob", "graphlib", "gzip",
    "hashlib", "heapq", "hmac", "html", "ipaddress", "itertools", "json", "keyword",
    "linecache", "math", "mimetypes", "operator", "os.path", "pathlib", "pprint", "quopri",
    "random", "re", "reprlib", "secrets", "shlex", "shutil", "statistics", "string",
    "struct", "tempfile", "textwrap", "timeit", "tokenize", "unicodedata", "urllib.parse",
    "uuid", "zlib", "collections", "contextlib", "dataclasses", "enum", "typing",
    "argparse", "configparser", "logging", "queue", "sched", "filecmp", "zipfile", "tarfile",
    "ast", "codecs", "platform", "sysconfig", "traceback", "warnings", "numbers", "weakref",
    "types", "array", "locale", "gettext", "binascii", "wave", "abc",
)
_CODE_HEADER = "Write a solution to the following problem and make sure that it passes the tests:"


@dataclass(frozen=True)
class _StdlibFunction:
    module: str
    name: str
    signature: str
    doc: str  # the docstring's first paragraph, dedented


def _first_paragraph(doc: str) -> str:
    doc = inspect.cleandoc(doc)
    para = doc.split("\n\n")[0].strip()
    return para


def stdlib_functions() -> list[_StdlibFunction]:
    """Public functions of a fixed list of standard-library modules, with a usable docstring.

    Only what every process sees alike: no function a third-party import patched into a
    standard module, no signature whose defaults print as runtime objects."""
    import importlib

    found: dict[tuple[str, str], _StdlibFunction] = {}
    for module_name in _STDLIB_MODULES:
        try:
            module = importlib.import_module(module_name)
        except Exception:  # a module missing from this build of Python
            continue
        for name in sorted(vars(module)):
            if name.startswith("_"):
                continue
            obj = getattr(module, name)
            if not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            home = (getattr(obj, "__module__", None) or module_name).split(".")[0]
            if home not in sys.stdlib_module_names:  # patched in by an imported package
                continue
            doc = inspect.getdoc(obj) or ""
            try:
                signature = str(inspect.signature(obj))
            except (TypeError, ValueError):
                continue
            if "<" in signature:  # a default's repr (<object at 0x7f...>): differs run to run
                continue
            para = _first_paragraph(doc) if doc else ""
            if len(para) < 25 or len(para) > 700 or para.startswith(name + "("):
                continue
            if "\n>>>" in para or "deprecated" in para.lower():
                continue
            found[(module_name, name)] = _StdlibFunction(module_name, name, signature, para)
    return [found[key] for key in sorted(found)]


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:] if text[:2] != text[:2].upper() else text


def _sentence(doc: str) -> str:
    first = re.split(r"(?<=[.!?])\s", " ".join(doc.split()), maxsplit=1)[0]
    return first.rstrip(".")


def _code_prompt(fn: _StdlibFunction, style: int) -> str:
    doc_lines = "\n    ".join(fn.doc.splitlines())
    sentence = _sentence(fn.doc)
    if style == 0:
        return (f"{_CODE_HEADER}\n```python\ndef {fn.name}{fn.signature}:\n    \"\"\"{doc_lines}\n"
                f"    \"\"\"\n```")
    if style == 1:
        return (f"Complete the following Python function without importing `{fn.module}`.\n"
                f"```python\ndef {fn.name}{fn.signature}:\n    \"\"\"{doc_lines}\n    \"\"\"\n```")
    if style == 2:
        return (f"Write a Python function `{fn.name}{fn.signature}` that does the following: "
                f"{_lower_first(sentence)}. Include a docstring and a few examples.")
    if style == 3:
        return (f"Explain what `{fn.module}.{fn.name}` does in Python and show a short example "
                f"of how to use it.\nDocumentation: {sentence}.")
    if style == 4:
        return (f"Write pytest unit tests for Python's `{fn.module}.{fn.name}{fn.signature}`, "
                f"whose documentation says: {sentence}.")
    return (f"Implement a simplified version of `{fn.module}.{fn.name}` in pure Python and "
            f"explain how it works. Its documentation says: {sentence}.")


_CODE_STYLES = 6
_CODE_STYLE_WEIGHTS = (4, 2, 3, 2, 1, 1)


def _code_prompts(rng: random.Random) -> Iterator[str]:
    functions = stdlib_functions()
    pairs = [(fn, style) for fn in functions for style in range(_CODE_STYLES)]
    weights = [_CODE_STYLE_WEIGHTS[style] * rng.random() ** 0.5 for _, style in pairs]
    order = sorted(range(len(pairs)), key=lambda i: -weights[i] * rng.random())
    for i in order:
        yield _code_prompt(*pairs[i])


# --------------------------------------------------------------------------------------------
# Chat: documentation explanations and templated requests
# --------------------------------------------------------------------------------------------

_FORMS = ("short story", "poem", "blog post", "persuasive essay", "email to a colleague",
          "product description", "speech", "dialogue between two friends", "news report",
          "letter to a friend", "diary entry", "limerick", "opinion piece", "cover letter")
_SUBJECTS = (
    "a small town library", "learning to cook", "a rainy afternoon", "moving to a new city",
    "an old lighthouse", "volunteering at an animal shelter", "the first day at a new job",
    "a community garden", "a long train journey", "a power cut during a storm",
    "learning a musical instrument", "a lost umbrella", "a mountain hike", "a science fair",
    "a family recipe", "a night market", "recycling at home", "a chess tournament",
    "the invention of the printing press", "a bicycle repair shop", "a snowy morning",
    "saving money as a student", "a museum of clocks", "a beekeeper", "an astronaut's return",
)
_AUDIENCES = ("children", "teenagers", "busy parents", "retirees", "software engineers",
              "first-year students", "a general audience", "small business owners")
_EXPLAIN = (
    "why the sky looks blue", "how vaccines train the immune system", "how a refrigerator works",
    "why leaves change colour in autumn", "how compound interest works",
    "what causes the seasons", "how a bill becomes a law in a parliament",
    "how solar panels produce electricity", "why bread rises", "how GPS finds your position",
    "what inflation is", "how the heart pumps blood", "why ice floats on water",
    "how a search engine ranks pages", "the difference between weather and climate",
    "how photosynthesis works", "how an electric motor works", "what a black hole is",
    "how noise-cancelling headphones work", "why we dream", "how tides are formed",
    "how public-key cryptography works", "what supply and demand mean",
    "how a compiler turns code into a program", "why the Roman Empire declined",
)
_ADVICE = (
    "prepare for a job interview", "start running as a beginner", "keep a houseplant alive",
    "organise a small home office", "learn a new language as an adult",
    "plan a budget for the month", "give constructive feedback to a colleague",
    "sleep better", "write a clear email", "prepare for an exam", "reduce food waste",
    "make a presentation less boring", "get started with open-source contributions",
)
_ROLES = ("a museum guide", "a travel agent", "a chef", "a personal trainer", "a librarian",
          "a detective", "a ship's captain", "a history teacher", "a startup founder")


def _chat_template_prompts(rng: random.Random) -> Iterator[str]:
    while True:
        kind = rng.randrange(5)
        if kind == 0:
            yield (f"Write a {rng.choice(_FORMS)} about {rng.choice(_SUBJECTS)} for "
                   f"{rng.choice(_AUDIENCES)}.")
        elif kind == 1:
            yield f"Explain {rng.choice(_EXPLAIN)} to {rng.choice(_AUDIENCES)}."
        elif kind == 2:
            yield (f"Give me {rng.randint(3, 7)} practical tips on how to "
                   f"{rng.choice(_ADVICE)}.")
        elif kind == 3:
            yield (f"Pretend you are {rng.choice(_ROLES)}. Describe {rng.choice(_SUBJECTS)} "
                   f"in your own voice, in about {rng.choice((80, 120, 150, 200))} words.")
        else:
            a, b = rng.sample(_SUBJECTS, 2)
            yield (f"Compare {a} and {b}: what do they have in common, and how do they differ? "
                   f"Answer in {rng.choice(('two paragraphs', 'a short list', 'a table'))}.")


def _topic_title(text: str) -> str:
    first = text.strip().splitlines()[0].strip()
    return first.strip('*').strip() or "this topic"


def _doc_prompts(rng: random.Random) -> Iterator[str]:
    import importlib

    from pydoc_data.topics import topics

    items: list[str] = []
    for key in sorted(topics):
        text = topics[key]
        title = _topic_title(text)
        body = "\n".join(text.strip().splitlines()[2:]).strip()
        excerpt = body[:700].rsplit("\n", 1)[0] if len(body) > 700 else body
        items += [
            f"Explain {title} in Python to a beginner, with a short example.",
            f"Summarize the following excerpt from the Python language reference in plain "
            f"English:\n\n{excerpt}",
            f"What are common mistakes people make with {title} in Python, and how can they be "
            f"avoided?",
            f"Read this documentation and answer: what is it describing, and when would you use "
            f"it?\n\n{excerpt}",
        ]
    for module_name in _STDLIB_MODULES:
        try:
            module = importlib.import_module(module_name)
        except Exception:
            continue
        doc = inspect.getdoc(module) or ""
        sentence = _sentence(_first_paragraph(doc)) if doc else ""
        if len(sentence) < 15:
            continue
        items += [
            f"What is the Python `{module_name}` module for? Its documentation says: "
            f"\"{sentence}.\" Give a short tutorial with examples.",
            f"When should I use Python's `{module_name}` module instead of writing the code "
            f"myself? Give two concrete examples.",
        ]
    rng.shuffle(items)
    yield from items


def _chat_prompts(rng: random.Random) -> Iterator[str]:
    docs = _doc_prompts(random.Random(rng.random()))
    templates = _chat_template_prompts(random.Random(rng.random()))
    while True:
        if rng.random() < 0.5:
            nxt = next(docs, None)
            if nxt is not None:
                yield nxt
                continue
        yield next(templates)


def check_mix(mix: dict[str, float]) -> dict[str, float]:
    """`mix` as a dict, or an error naming what is wrong with it."""
    mix = dict(mix)
    unknown = set(mix) - set(SOURCE_DOMAINS)
    if unknown or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise DistillDataError(
            f"mix must give non-negative weights to {tuple(SOURCE_DOMAINS)}, got {mix}")
    return mix


def build_corpus(n: int, seed: int = 0, mix: dict[str, float] | None = None) -> list[Prompt]:
    """`n` distinct prompts drawn from the sources (SOURCE_DOMAINS) in proportion `mix`, seeded.

    Sources are drawn at random for each slot, so any prefix has the same mix; a source that
    runs out of distinct prompts (code, at very large n) hands its slots to the others.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DistillDataError(f"the number of prompts must be a positive integer, got {n!r}")
    mix = check_mix(DEFAULT_MIX if mix is None else mix)
    rng = random.Random(seed)
    sources = {
        "math": _math_prompts(random.Random(rng.random())),
        "code": _code_prompts(random.Random(rng.random())),
        "chat": _chat_prompts(random.Random(rng.random())),
        # its own seed stream, so adding it left the other sources' prompts as they were
        "code_tasks": code_task_prompts(random.Random(f"code_tasks-{seed}")),
    }
    live = {d: w for d, w in mix.items() if w > 0}
    seen: set[str] = set()
    out: list[Prompt] = []
    misses = 0
    while len(out) < n:
        if not live:
            raise DistillDataError(f"the corpus ran out of distinct prompts at {len(out)}")
        names = sorted(live)
        source = rng.choices(names, weights=[live[name] for name in names])[0]
        text = next(sources[source], None)
        if text is None:
            del live[source]
            continue
        if text in seen:
            misses += 1
            if misses > 50 * n + 1000:
                raise DistillDataError(f"the corpus ran out of distinct prompts at {len(out)}")
            continue
        seen.add(text)
        out.append(Prompt(text, SOURCE_DOMAINS[source]))
    return out


def corpus_digest(prompts: Sequence[Prompt]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.text.encode())
        h.update(b"\0")
    return h.hexdigest()


def _is_eval_file(path: Path) -> bool:
    try:
        resolved = path.resolve()
    except OSError:
        return False
    eval_dirs = {EVAL_DIR.resolve()} if EVAL_DIR.exists() else set()
    return any(parent in eval_dirs for parent in resolved.parents) or (
        resolved.parent.name == "eval" and resolved.parent.parent.name == "shared"
    )


def load_prompts(path: Path | str) -> list[Prompt]:
    """Prompts from jsonl (`prompt` or the first of `turns`) or plain text (one per line).

    Files from the evaluation folder (`shared/eval/`) are refused: never train on them.
    """
    path = Path(path)
    if not path.is_file():
        raise DistillDataError(f"{path}: prompt file not found")
    if _is_eval_file(path):
        raise DistillDataError(
            f"{path}: this is an evaluation prompt file; a drafter must never be trained on "
            "the prompts it is benchmarked on"
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DistillDataError(f"{path}: cannot read prompts: {exc}") from exc
    nonblank = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    as_json = bool(nonblank) and all(line.lstrip().startswith("{") for _, line in nonblank)
    prompts: list[Prompt] = []
    seen: set[str] = set()
    for lineno, line in nonblank:
        if as_json:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DistillDataError(f"{path}:{lineno}: invalid JSON: {exc}") from exc
            text = row.get("prompt") if isinstance(row, dict) else None
            if text is None and isinstance(row, dict) and isinstance(row.get("turns"), list) \
                    and row["turns"]:
                text = row["turns"][0]
            if not isinstance(text, str) or not text.strip():
                raise DistillDataError(
                    f"{path}:{lineno}: expected an object with a non-empty 'prompt' string or "
                    "a 'turns' list"
                )
        else:
            text = line.strip()
        if text not in seen:
            seen.add(text)
            prompts.append(Prompt(text, "file"))
    if not prompts:
        raise DistillDataError(f"{path}: no prompts in the file")
    return prompts


def write_prompts(prompts: Sequence[Prompt], path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p.text, "domain": p.domain}) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# Target generations
# --------------------------------------------------------------------------------------------


@dataclass
class DistillData:
    """Sequences of prompt + response token ids; `prompt_lengths[i]` tokens of row i are prompt."""

    tokens: np.ndarray  # int32, all sequences concatenated
    offsets: np.ndarray  # int64 [N + 1]
    prompt_lengths: np.ndarray  # int32 [N]
    prompt_index: np.ndarray  # int32 [N], index into `prompts`
    prompts: list[str]
    domains: list[str]
    meta: dict

    @property
    def num_sequences(self) -> int:
        return int(len(self.prompt_lengths))

    def sequence(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def response_tokens(self) -> int:
        return int((self.lengths() - self.prompt_lengths).sum())

    @property
    def prompt_tokens(self) -> int:
        return int(self.prompt_lengths.sum())

    def summary(self) -> dict:
        per_domain: dict[str, int] = {}
        for i in range(self.num_sequences):
            d = self.domains[self.prompt_index[i]]
            per_domain[d] = per_domain.get(d, 0) + 1
        return {
            "sequences": self.num_sequences,
            "response_tokens": self.response_tokens,
            "prompt_tokens": self.prompt_tokens,
            "sequences_per_domain": per_domain,
        }


def empty_data(meta: dict) -> DistillData:
    return DistillData(
        tokens=np.zeros(0, np.int32), offsets=np.zeros(1, np.int64),
        prompt_lengths=np.zeros(0, np.int32), prompt_index=np.zeros(0, np.int32),
        prompts=[], domains=[], meta=meta,
    )


def save_data(data: DistillData, path: Path | str) -> Path:
    """Write atomically (temporary file + rename), so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez_compressed(
            tmp,
            tokens=data.tokens.astype(np.int32), offsets=data.offsets.astype(np.int64),
            prompt_lengths=data.prompt_lengths.astype(np.int32),
            prompt_index=data.prompt_index.astype(np.int32),
            prompts=np.array(data.prompts, dtype=np.str_),
            domains=np.array(data.domains, dtype=np.str_),
            meta=np.array(json.dumps(data.meta, sort_keys=True)),
        )
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_data(path: Path | str) -> DistillData:
    path = Path(path)
    if not path.is_file():
        raise DistillDataError(f"{path}: data file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            data = DistillData(
                tokens=z["tokens"].astype(np.int64), offsets=z["offsets"].astype(np.int64),
                prompt_lengths=z["prompt_lengths"].astype(np.int64),
                prompt_index=z["prompt_index"].astype(np.int64),
                prompts=[str(s) for s in z["prompts"]], domains=[str(s) for s in z["domains"]],
                meta=meta,
            )
    except (OSError, KeyError, ValueError) as exc:
        raise DistillDataError(f"{path}: not a distillation data file: {exc}") from exc
    if meta.get("format") != DATA_FORMAT:
        raise DistillDataError(f"{path}: format {meta.get('format')!r}, expected {DATA_FORMAT!r}")
    n = len(data.prompt_lengths)
    if len(data.offsets) != n + 1 or int(data.offsets[-1]) != len(data.tokens) \
            or len(data.prompt_index) != n:
        raise DistillDataError(f"{path}: inconsistent array sizes")
    return data


_SIGNATURE_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                     "num_hidden_layers", "num_attention_heads", "num_key_value_heads")


def target_signature(target_dir: Path | str) -> str:
    """What identifies a target's generations: its shape, vocabulary, chat template and
    weight sizes; not its path, nor how a transformers version happens to serialise it, so
    data made from the same model converted on another machine still matches."""
    target_dir = Path(target_dir)
    h = hashlib.sha256()

    def read_json(name: str) -> dict:
        try:
            return json.loads((target_dir / name).read_text())
        except (OSError, ValueError):
            return {}

    config = read_json("config.json")
    h.update(json.dumps({k: config.get(k) for k in _SIGNATURE_FIELDS}, sort_keys=True).encode())
    vocab = (read_json("tokenizer.json").get("model") or {}).get("vocab")
    h.update(json.dumps(vocab, sort_keys=True).encode())
    template = read_json("tokenizer_config.json").get("chat_template")
    if (target_dir / "chat_template.jinja").is_file():
        template = (target_dir / "chat_template.jinja").read_text()
    h.update(str(template).encode())
    for p in sorted(target_dir.glob("*.safetensors")):
        h.update(f"{p.name}:{p.stat().st_size}".encode())
    return h.hexdigest()[:16]


def encode_prompts(tokenizer, prompts: Sequence[Prompt]) -> list[list[int]]:
    from dspark_export.pair import encode_prompt

    return [encode_prompt(tokenizer, p.text) for p in prompts]


def _stop_ids(model, tokenizer, target_dir: Path) -> list[int]:
    from dspark_export.pair import stop_token_ids

    ids = set(stop_token_ids(tokenizer, target_dir))
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return sorted(i for i in ids if i is not None)


def generate_responses(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    out_path: Path | str,
    *,
    target_dir: Path | str,
    tokens: int,
    max_response_tokens: int = 256,
    max_prompt_tokens: int = 512,
    batch_size: int = 8,
    time_budget_s: float | None = None,
    corpus: dict | None = None,
    resume: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] = print,
) -> DistillData:
    """Greedy target answers for `prompts` until `tokens` response tokens exist (or time is up).

    Prompts go in waves of `WAVE_SLOTS * batch_size`, sorted by length within a wave and
    decoded by `greedy_answers` in `batch_size` slots. The file at `out_path` is rewritten
    after every wave; with `resume` a compatible file continues from the first prompt it has
    not used. Prompts longer than `max_prompt_tokens` after the chat template are skipped.
    `on_progress(done, total)` counts response tokens.
    """
    from dspark_export.greedy_batch import greedy_answers

    for name, value in (("tokens", tokens), ("max_response_tokens", max_response_tokens),
                        ("max_prompt_tokens", max_prompt_tokens), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DistillDataError(f"{name} must be a positive integer, got {value!r}")
    target_dir = Path(target_dir)
    out_path = Path(out_path)
    stop_ids = _stop_ids(model, tokenizer, target_dir)
    meta = {
        "format": DATA_FORMAT,
        "target_signature": target_signature(target_dir),
        "max_response_tokens": max_response_tokens,
        "max_prompt_tokens": max_prompt_tokens,
        "corpus": corpus or {"digest": corpus_digest(prompts), "prompts": len(prompts)},
        "stop_ids": stop_ids,
        "next_prompt": 0,
        "skipped_long_prompts": 0,
        "generation_s": 0.0,
        "generated_with": {},
    }
    data = empty_data(meta)
    if out_path.exists():
        if not resume:
            raise DistillDataError(f"{out_path}: exists; delete it or allow resuming")
        data = load_data(out_path)
        for key in ("target_signature", "max_response_tokens", "max_prompt_tokens", "corpus"):
            if data.meta.get(key) != meta[key]:
                raise DistillDataError(
                    f"{out_path}: was generated with a different {key} "
                    f"({data.meta.get(key)!r} vs {meta[key]!r}); use another data file"
                )
        if data.response_tokens:
            log(f"data: resuming {out_path} ({data.num_sequences} sequences, "
                f"{data.response_tokens} response tokens)")
    prompt_texts = [p.text for p in prompts]
    if data.prompts and data.prompts != prompt_texts[: len(data.prompts)]:
        raise DistillDataError(f"{out_path}: its prompts differ from this corpus")
    data.prompts, data.domains = prompt_texts, [p.domain for p in prompts]

    device = next(model.parameters()).device
    start = time.perf_counter()
    spent_before = float(data.meta.get("generation_s", 0.0))
    chunks = [data.tokens.astype(np.int32)]
    offsets = list(data.offsets.tolist())
    prompt_lengths = list(data.prompt_lengths.tolist())
    prompt_index = list(data.prompt_index.tolist())
    done = data.response_tokens
    nxt = int(data.meta.get("next_prompt", 0))
    skipped = int(data.meta.get("skipped_long_prompts", 0))
    if on_progress:
        on_progress(min(done, tokens), tokens)
    model.eval()
    last_wave_s = 0.0
    wave_size = WAVE_SLOTS * batch_size
    while done < tokens and nxt < len(prompts):
        elapsed = time.perf_counter() - start
        # Stop before a wave that would end past the budget (waves take about as long).
        if time_budget_s is not None and elapsed + last_wave_s > time_budget_s:
            log(f"data: time budget of {time_budget_s:.0f} s reached at {done} response tokens")
            break
        wave_start = time.perf_counter()
        wave: list[tuple[int, list[int]]] = []
        while len(wave) < wave_size and nxt < len(prompts):
            ids = encode_prompts(tokenizer, [prompts[nxt]])[0]
            if len(ids) <= max_prompt_tokens:
                wave.append((nxt, ids))
            else:
                skipped += 1
            nxt += 1
        if not wave:
            break
        # Similar lengths decode side by side: attention reads every slot up to the longest.
        wave.sort(key=lambda item: len(item[1]))
        by_index = dict(wave)
        answers = greedy_answers(model, wave, max_new_tokens=max_response_tokens,
                                 max_prompt_tokens=max_prompt_tokens, stop_ids=stop_ids,
                                 slots=batch_size)
        for pi, response in sorted(answers):
            ids = by_index[pi]
            seq = np.asarray(ids + response, dtype=np.int32)
            chunks.append(seq)
            offsets.append(offsets[-1] + len(seq))
            prompt_lengths.append(len(ids))
            prompt_index.append(pi)
            done += len(response)
        data.tokens = np.concatenate(chunks)
        chunks = [data.tokens]
        data.offsets = np.asarray(offsets, np.int64)
        data.prompt_lengths = np.asarray(prompt_lengths, np.int64)
        data.prompt_index = np.asarray(prompt_index, np.int64)
        data.meta.update(
            next_prompt=nxt, skipped_long_prompts=skipped,
            generation_s=spent_before + time.perf_counter() - start,
            generated_with={"device": str(device), "dtype": str(next(model.parameters()).dtype),
                            "batch_size": batch_size},
        )
        save_data(data, out_path)
        last_wave_s = time.perf_counter() - wave_start
        if on_progress:
            on_progress(min(done, tokens), tokens)
    if data.num_sequences == 0:
        raise DistillDataError(
            "no training sequences were generated (all prompts too long, or no time budget)"
        )
    if done < tokens and nxt >= len(prompts):
        log(f"data: the prompts ran out at {done} of {tokens} response tokens")
    return data


def main(argv: list[str] | None = None) -> None:
    """`python -m dspark_export.distill_data -n 2000 --seed 0 --out prompts.jsonl`."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("-n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    prompts = build_corpus(args.n, args.seed)
    write_prompts(prompts, args.out)
    counts = {d: sum(p.domain == d for p in prompts) for d in DOMAINS}
    print(f"wrote {len(prompts)} prompts to {args.out} ({counts}); sha256 {corpus_digest(prompts)}")


if __name__ == "__main__":
    main()
