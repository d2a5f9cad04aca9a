"""Synthetic typed Python tasks with doctests, a code source for the distillation corpus.

The standard-library tasks of distill_data.py have untyped signatures and no examples, while
real "complete this function" prompts usually carry type hints and doctests that the answer
repeats (`def f(numbers: List[float]) -> bool:`, `>>> f([1.0, 2.0])`). A drafter learns to
copy such spans only from answers that contain them, so this source writes them: small
classic exercises, each with seeded names, argument names and example inputs, and the
examples' outputs computed by a reference implementation (they are correct doctests).
Written from scratch, not taken from any benchmark.
"""
from __future__ import annotations

import itertools
import math
import os.path
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

_HEADER = "Write a solution to the following problem and make sure that it passes the tests:"
_WORDS = ("apple", "banana", "cherry", "delta", "echo", "forest", "garden", "harbor", "island",
          "jungle", "kettle", "lemon", "mango", "night", "ocean", "pepper", "quartz", "river",
          "stone", "tiger", "umbra", "violet", "willow", "xenon", "yellow", "zebra", "level",
          "noon", "radar", "hello", "world", "python", "code", "data", "test")


def _ints(rng: random.Random, low: int = -9, high: int = 20, size: tuple = (0, 7)) -> list[int]:
    return [rng.randint(low, high) for _ in range(rng.randint(*size))]


def _floats(rng: random.Random) -> list[float]:
    return [round(rng.uniform(-5, 10), 1) for _ in range(rng.randint(1, 6))]


def _word(rng: random.Random) -> str:
    return rng.choice(_WORDS)


def _words(rng: random.Random) -> list[str]:
    return [rng.choice(_WORDS) for _ in range(rng.randint(0, 5))]


@dataclass(frozen=True)
class _Param:
    names: tuple[str, ...]
    type: str
    value: Callable[[random.Random], object]


@dataclass(frozen=True)
class _Task:
    names: tuple[str, ...]
    params: tuple[_Param, ...]
    returns: str
    doc: str  # may name the parameters as {0}, {1}, ...
    solve: Callable[..., object]


def _run_lengths(text: str) -> list[tuple[str, int]]:
    return [(c, len(list(run))) for c, run in itertools.groupby(text)]


def _merge(left: list[int], right: list[int]) -> list[int]:
    return sorted(left + right)


def _bits(rng: random.Random) -> str:
    return "".join(rng.choice("01") for _ in range(rng.randint(1, 10)))


def _matrix(rng: random.Random) -> list[list[int]]:
    rows, cols = rng.randint(1, 3), rng.randint(1, 3)
    return [[rng.randint(0, 9) for _ in range(cols)] for _ in range(rows)]


def _nested(rng: random.Random) -> list[list[int]]:
    return [_ints(rng, 0, 9, (0, 3)) for _ in range(rng.randint(0, 3))]


def _same_length_pair(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(1, 7)
    return ("".join(rng.choice("acgt") for _ in range(n)),
            "".join(rng.choice("acgt") for _ in range(n)))


def _phrase(rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 4)))


_VALS = ("values", "items", "readings", "samples", "series")
_K = ("k", "size", "width", "step")

# Exercises chosen to differ from the well-known public code benchmarks (checked by the
# corpus-vs-evaluation test): no benchmark's function names, argument names or task.
_TASKS: tuple[_Task, ...] = (
    _Task(("to_fahrenheit", "celsius_to_fahrenheit", "convert_temperatures"),
          (_Param(("celsius", "temps", "degrees"), "List[float]", _floats),), "List[float]",
          "Convert every temperature in {0} from Celsius to Fahrenheit, rounded to 1 decimal.",
          lambda xs: [round(x * 9 / 5 + 32, 1) for x in xs]),
    _Task(("clamp_all", "clip_values", "bound_values"),
          (_Param(_VALS, "List[int]", _ints), _Param(("low", "lower", "floor"), "int",
                                                     lambda r: r.randint(-3, 2)),
           _Param(("high", "upper", "ceiling"), "int", lambda r: r.randint(5, 12))),
          "List[int]", "Return {0} with every element limited to the range [{1}, {2}].",
          lambda xs, lo, hi: [min(max(x, lo), hi) for x in xs]),
    _Task(("merge_sorted_lists", "merge_two_sorted", "combine_sorted"),
          (_Param(("left", "first", "xs"), "List[int]", lambda r: sorted(_ints(r))),
           _Param(("right", "second", "ys"), "List[int]", lambda r: sorted(_ints(r)))),
          "List[int]", "Merge the sorted lists {0} and {1} into one sorted list.", _merge),
    _Task(("product_of_positives", "positive_product", "multiply_positive_values"),
          (_Param(_VALS, "List[int]", lambda r: _ints(r, -5, 9, (0, 5))),), "int",
          "Return the product of the elements of {0} greater than zero (1 if there are none).",
          lambda xs: math.prod(x for x in xs if x > 0)),
    _Task(("longest_streak", "max_run_length", "longest_equal_run"),
          (_Param(("bits", "signal", "flags"), "str", _bits),), "int",
          "Return the length of the longest run of equal characters in {0}.",
          lambda s: max(n for _, n in _run_lengths(s))),
    _Task(("are_anagrams", "anagram_check", "same_letters_rearranged"),
          (_Param(("first", "word_a", "left"), "str", _word),
           _Param(("second", "word_b", "right"), "str", _word)), "bool",
          "Return True if {1} is a rearrangement of the letters of {0}.",
          lambda a, b: sorted(a) == sorted(b)),
    _Task(("index_of_largest", "argmax", "position_of_max"),
          (_Param(_VALS, "List[int]", lambda r: _ints(r, size=(1, 7))),), "int",
          "Return the index of the first occurrence of the largest element of {0}.",
          lambda xs: xs.index(max(xs))),
    _Task(("cumulative_totals", "running_totals", "prefix_sums"),
          (_Param(_VALS, "List[int]", _ints),), "List[int]",
          "Return the list of running totals of {0}.",
          lambda xs: [sum(xs[:i + 1]) for i in range(len(xs))]),
    _Task(("lengths_by_word", "word_lengths", "map_to_length"),
          (_Param(("words", "labels", "keys"), "List[str]", _words),), "Dict[str, int]",
          "Map each distinct string of {0} to its length.",
          lambda ws: {w: len(w) for w in dict.fromkeys(ws)}),
    _Task(("invert_mapping", "swap_keys_and_values", "reverse_lookup"),
          (_Param(("mapping", "table", "codes"), "Dict[str, int]",
                  lambda r: {w: r.randint(0, 50) for w in r.sample(_WORDS, r.randint(0, 3))}),),
          "Dict[int, str]", "Return a dictionary mapping each value of {0} to its key; "
                            "values are unique.", lambda m: {v: k for k, v in m.items()}),
    _Task(("count_between", "count_in_range", "how_many_within"),
          (_Param(_VALS, "List[int]", _ints), _Param(("low", "start"), "int",
                                                     lambda r: r.randint(-5, 3)),
           _Param(("high", "stop"), "int", lambda r: r.randint(4, 15))),
          "int", "Return how many elements of {0} lie between {1} and {2}, both included.",
          lambda xs, lo, hi: sum(lo <= x <= hi for x in xs)),
    _Task(("reverse_digits", "mirror_number", "digits_backwards"),
          (_Param(("value", "amount", "code"), "int", lambda r: r.randint(-9999, 9999)),), "int",
          "Return {0} with its decimal digits in reverse order, keeping its sign.",
          lambda v: (-1 if v < 0 else 1) * int(str(abs(v))[::-1])),
    _Task(("count_set_bits", "popcount", "ones_in_binary"),
          (_Param(("value", "mask", "word"), "int", lambda r: r.randint(0, 300)),), "int",
          "Return the number of 1 bits in the binary representation of {0}.",
          lambda v: bin(v).count("1")),
    _Task(("positions_of", "find_all_indices", "indices_equal_to"),
          (_Param(_VALS, "List[int]", lambda r: _ints(r, 0, 4)),
           _Param(("target", "needle", "wanted"), "int", lambda r: r.randint(0, 4))),
          "List[int]", "Return the indices at which {1} occurs in {0}.",
          lambda xs, t: [i for i, x in enumerate(xs) if x == t]),
    _Task(("dot_product", "inner_product", "weighted_total"),
          (_Param(("left", "weights", "xs"), "List[int]", lambda r: _ints(r, -3, 6, (3, 3))),
           _Param(("right", "scores", "ys"), "List[int]", lambda r: _ints(r, -3, 6, (3, 3)))),
          "int", "Return the sum of the products of the elements of {0} and {1} at the same "
                 "positions.", lambda a, b: sum(x * y for x, y in zip(a, b))),
    _Task(("transpose", "transpose_matrix", "swap_rows_and_columns"),
          (_Param(("matrix", "grid", "table"), "List[List[int]]", _matrix),), "List[List[int]]",
          "Return the transpose of the rectangular matrix {0}.",
          lambda m: [list(col) for col in zip(*m)]),
    _Task(("flatten_once", "concat_sublists", "flatten_one_level"),
          (_Param(("nested", "groups", "batches"), "List[List[int]]", _nested),), "List[int]",
          "Concatenate the lists in {0} into one list, in order.",
          lambda ls: [x for sub in ls for x in sub]),
    _Task(("is_leap_year", "leap_year", "has_february_29"),
          (_Param(("year", "y"), "int", lambda r: r.choice((1900, 2000, 2023, 2024, 2100, 1996,
                                                             1999, 2400, 1800, 2012))),), "bool",
          "Return True if {0} is a leap year in the Gregorian calendar.",
          lambda y: y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)),
    _Task(("hamming_distance", "count_mismatches", "differing_positions"),
          (_Param(("pair", "strands", "sequences"), "Tuple[str, str]", _same_length_pair),),
          "int", "Return at how many positions the two equally long strings in {0} differ.",
          lambda p: sum(a != b for a, b in zip(*p))),
    _Task(("make_acronym", "initials", "abbreviate"),
          (_Param(("phrase", "title", "name"), "str", _phrase),), "str",
          "Return the first letter of every word in {0}, upper-cased and joined.",
          lambda s: "".join(w[0].upper() for w in s.split())),
    _Task(("triangular_numbers", "first_triangular", "triangle_sequence"),
          (_Param(("count", "how_many", "length"), "int", lambda r: r.randint(0, 8)),),
          "List[int]", "Return the first {0} triangular numbers, starting with 1.",
          lambda n: [i * (i + 1) // 2 for i in range(1, n + 1)]),
    _Task(("replace_negatives", "fill_negatives", "zero_out_negatives"),
          (_Param(_VALS, "List[int]", _ints), _Param(("fill", "default", "replacement"), "int",
                                                     lambda r: r.randint(0, 5))),
          "List[int]", "Return {0} with every negative element replaced by {1}.",
          lambda xs, f: [f if x < 0 else x for x in xs]),
    _Task(("split_by_parity", "odds_and_evens", "partition_parity"),
          (_Param(_VALS, "List[int]", _ints),), "Tuple[List[int], List[int]]",
          "Return a tuple (evens, odds) of the elements of {0}, each in their original order.",
          lambda xs: ([x for x in xs if x % 2 == 0], [x for x in xs if x % 2])),
    _Task(("shared_prefix", "longest_common_start", "common_beginning"),
          (_Param(("words", "paths", "labels"), "List[str]", _words),), "str",
          "Return the longest string that every element of {0} starts with.",
          os.path.commonprefix),
    _Task(("squares_below", "perfect_squares_under", "square_numbers_until"),
          (_Param(("limit", "bound", "ceiling"), "int", lambda r: r.randint(0, 90)),),
          "List[int]", "Return the perfect squares of positive integers that are less than {0}.",
          lambda n: [i * i for i in range(1, n) if i * i < n]),
    _Task(("chunked", "split_into_chunks", "batches_of"),
          (_Param(_VALS, "List[int]", _ints), _Param(_K, "int", lambda r: r.randint(1, 3))),
          "List[List[int]]", "Split {0} into consecutive pieces of length {1}; the last piece "
                             "may be shorter.",
          lambda xs, k: [xs[i:i + k] for i in range(0, len(xs), k)]),
    _Task(("neighbour_sums", "adjacent_totals", "sum_consecutive_pairs"),
          (_Param(_VALS, "List[int]", _ints),), "List[int]",
          "Return the sums of each two neighbouring elements of {0}.",
          lambda xs: [a + b for a, b in zip(xs, xs[1:])]),
    _Task(("run_length_encode", "compress_runs", "encode_runs"),
          (_Param(("message", "raw", "payload"), "str", lambda r: "".join(
              r.choice("xxy") * r.randint(1, 3) for _ in range(r.randint(0, 4)))),),
          "str", "Encode {0} as each run of equal characters followed by the run's length.",
          lambda s: "".join(f"{c}{n}" for c, n in _run_lengths(s))),
    _Task(("most_frequent_char", "commonest_letter", "top_character"),
          (_Param(("message", "phrase", "sample"), "str", _phrase),), "str",
          "Return the character other than space that occurs most often in {0}; on ties, "
          "the one that occurs first.",
          lambda s: max(dict.fromkeys(s.replace(" ", "")),
                        key=lambda c: s.count(c))),
    _Task(("safe_ratio", "divide_or_none", "checked_division"),
          (_Param(("numerator", "top", "dividend"), "int", lambda r: r.randint(-20, 20)),
           _Param(("denominator", "bottom", "divisor"), "int", lambda r: r.randint(0, 5))),
          "Optional[float]", "Return {0} / {1} rounded to 3 decimals, or None when {1} is 0.",
          lambda a, b: None if b == 0 else round(a / b, 3)),
)


def _typing_names(task: _Task) -> list[str]:
    used = " ".join([p.type for p in task.params] + [task.returns])
    return [name for name in ("Dict", "List", "Optional", "Tuple") if name + "[" in used]


def _prompt(task: _Task, rng: random.Random) -> str:
    name = rng.choice(task.names)
    args = []
    for p in task.params:
        choices = [n for n in p.names if n not in args] or [p.names[0] + "2"]
        args.append(rng.choice(choices))
    signature = ", ".join(f"{a}: {p.type}" for a, p in zip(args, task.params))
    doc = task.doc.format(*args)
    lines, seen = [], set()
    for _ in range(rng.randint(1, 3)):
        values = tuple(p.value(rng) for p in task.params)
        call = f"{name}({', '.join(repr(v) for v in values)})"
        result = task.solve(*values)
        if call in seen or result is None:  # a doctest of None would print nothing
            continue
        seen.add(call)
        lines += [f"    >>> {call}", f"    {result!r}"]
    imports = _typing_names(task)
    head = f"from typing import {', '.join(imports)}\n\n\n" if imports else "\n\n"
    body = "\n".join(lines)
    return (f"{_HEADER}\n```python\n{head}def {name}({signature}) -> {task.returns}:\n"
            f"    \"\"\" {doc}\n{body}\n    \"\"\"\n\n```")


def code_task_prompts(rng: random.Random) -> Iterator[str]:
    """An endless seeded stream of typed task prompts (duplicates are the caller's to skip)."""
    while True:
        yield _prompt(rng.choice(_TASKS), rng)
