"""``--dataset synth``: a deterministic generator of small MBPP-like problems.

Nothing can be downloaded in the project's default world, so it brings its own tasks:
short English descriptions, a function name, three asserts and a reference solution, over
five skill families (arithmetic, strings, lists, conditionals, compositions), each with
~9 templates whose parameters (constants, characters, prefixes, names) are drawn from a
seeded RNG.

Splits are disjoint *by construction*: every problem has a canonical key (template +
semantic parameters, not the function name nor the test inputs), and the split a key
belongs to is a fixed function of its hash, independent of the seed. So no test problem's
semantics (same template with the same constants) ever appears in train or validation, for
any seeds, and the test split measures generalisation to unseen constant combinations.

``load_synth("test")`` returns the same 200 problems on every call and every machine.
Expected test outputs are computed with plain Python callables written next to each
template's code string (no code string is ever ``exec``-ed here); ``tests/test_synth.py``
checks in a subprocess that every reference passes its tests.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from codedistill.data.problem import Problem

__all__ = [
    "SYNTH_FAMILIES",
    "SYNTH_SPLIT_SIZES",
    "SYNTH_STOP",
    "TEMPLATES",
    "format_prompt",
    "load_synth",
]

SYNTH_FAMILIES: tuple[str, ...] = ("arithmetic", "strings", "lists", "conditionals", "compositions")
SYNTH_SPLIT_SIZES: dict[str, int] = {"train": 2000, "validation": 200, "test": 200}
# Split buckets of a problem's key hash (out of 100): disjoint, fixed, seed-independent.
_SPLIT_BUCKETS: dict[str, range] = {"test": range(0, 15), "validation": range(15, 30), "train": range(30, 100)}
# The completion is the whole program followed by "[DONE]" (MBPP base-prompt format).
SYNTH_STOP: tuple[str, ...] = ("[DONE]", "[BEGIN]", "\nYou are an expert", "\nassert ", "\n\n\n\n")

PROMPT_TEMPLATE = (
    "You are an expert Python programmer, and here is your task: {description} "
    "Your code should pass these tests:\n\n{tests}\n[BEGIN]\n"
)


def format_prompt(description: str, tests: tuple[str, ...] | list[str]) -> str:
    """MBPP base-prompt format; the completion is the program followed by ``[DONE]``."""
    return PROMPT_TEMPLATE.format(description=description, tests="\n".join(tests))


# ----------------------------------------------------------------------------- templates

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_WORDS = (
    "apple",
    "river",
    "stone",
    "cloud",
    "green",
    "table",
    "light",
    "paper",
    "music",
    "tiger",
    "house",
    "bread",
    "chair",
    "plant",
    "water",
    "mouse",
    "sugar",
    "train",
    "lemon",
    "horse",
    "cat",
    "dog",
    "sun",
    "map",
    "pen",
    "cup",
    "box",
    "sky",
    "ant",
    "owl",
    "tree",
    "bird",
    "fish",
    "moon",
    "star",
    "rain",
    "book",
    "road",
    "door",
    "leaf",
)


@dataclass(frozen=True)
class Template:
    """One problem template.

    ``params(rng)`` draws the semantic parameters (they form the problem's key);
    ``names`` are format strings for the function name; ``describe``/``code``/``fn`` turn
    parameters into the description, the reference body (``{f}`` = function name) and a
    Python callable computing the expected outputs; ``inputs(rng, p)`` draws one argument
    tuple for a test.
    """

    tid: str
    family: str
    params: Callable[[random.Random], dict[str, Any]]
    names: tuple[str, ...]
    describe: Callable[[dict[str, Any]], str]
    code: Callable[[dict[str, Any]], str]
    fn: Callable[[dict[str, Any]], Callable[..., Any]]
    inputs: Callable[[random.Random, dict[str, Any]], tuple[Any, ...]]


def _word(rng: random.Random) -> str:
    return rng.choice(_WORDS)


def _rand_str(rng: random.Random, lo: int = 3, hi: int = 8, alphabet: str = _LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _str_with(rng: random.Random, ch: str, lo: int = 4, hi: int = 9) -> str:
    """A random string that contains ``ch`` a random number of times (0-3)."""
    s = list(_rand_str(rng, lo, hi, "abcdefghijklmnop"))
    for _ in range(rng.randint(0, 3)):
        s.insert(rng.randint(0, len(s)), ch)
    return "".join(s)


def _int_list(rng: random.Random, lo: int = 0, hi: int = 20, n_lo: int = 3, n_hi: int = 6) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(rng.randint(n_lo, n_hi))]


def _sentence(rng: random.Random) -> str:
    return " ".join(_word(rng) for _ in range(rng.randint(2, 5)))


def _k(lo: int, hi: int, name: str = "k") -> Callable[[random.Random], dict[str, Any]]:
    return lambda rng: {name: rng.randint(lo, hi)}


def _n(rng: random.Random, p: dict[str, Any]) -> tuple[Any, ...]:
    return (rng.randint(0, 30),)


def _s(rng: random.Random, p: dict[str, Any]) -> tuple[Any, ...]:
    return (_rand_str(rng),)


def _l(rng: random.Random, p: dict[str, Any]) -> tuple[Any, ...]:
    """A list of ints spread around the template's threshold (``k`` or ``t``) if it has one."""
    thr = p.get("t", p.get("k"))
    top = max(20, 2 * thr) if isinstance(thr, int) else 20
    return (_int_list(rng, 0, top),)


def _two_chars(rng: random.Random) -> dict[str, Any]:
    a, b = rng.sample("abcdefghijklmnop", 2)
    return {"a": a, "b": b}


def _char(rng: random.Random) -> dict[str, Any]:
    return {"c": rng.choice("abcdefghijklmnop")}


def _affix(rng: random.Random) -> dict[str, Any]:
    return {"p": rng.choice(_WORDS)}


def _digits_sum(n: int) -> int:
    return sum(int(d) for d in str(n))


T = Template
TEMPLATES: tuple[Template, ...] = (
    # ---------------------------------------------------------------- arithmetic
    T(
        "add_k",
        "arithmetic",
        _k(2, 99),
        ("add", "plus", "increment_by"),
        lambda p: f"Write a function to add {p['k']} to a given number.",
        lambda p: f"def {{f}}(n):\n    return n + {p['k']}\n",
        lambda p: lambda n: n + p["k"],
        _n,
    ),
    T(
        "sub_k",
        "arithmetic",
        _k(2, 99),
        ("subtract", "minus", "decrease_by"),
        lambda p: f"Write a function to subtract {p['k']} from a given number.",
        lambda p: f"def {{f}}(n):\n    return n - {p['k']}\n",
        lambda p: lambda n: n - p["k"],
        _n,
    ),
    T(
        "mul_k",
        "arithmetic",
        _k(2, 60),
        ("multiply_by", "times", "scale_by"),
        lambda p: f"Write a function to multiply a given number by {p['k']}.",
        lambda p: f"def {{f}}(n):\n    return n * {p['k']}\n",
        lambda p: lambda n: n * p["k"],
        _n,
    ),
    T(
        "floordiv_k",
        "arithmetic",
        _k(2, 40),
        ("int_divide_by", "floor_div"),
        lambda p: f"Write a function to find the integer division of a given number by {p['k']}.",
        lambda p: f"def {{f}}(n):\n    return n // {p['k']}\n",
        lambda p: lambda n: n // p["k"],
        lambda rng, p: (rng.randint(0, 300),),
    ),
    T(
        "mod_k",
        "arithmetic",
        _k(2, 40),
        ("remainder", "mod"),
        lambda p: f"Write a function to find the remainder when a given number is divided by {p['k']}.",
        lambda p: f"def {{f}}(n):\n    return n % {p['k']}\n",
        lambda p: lambda n: n % p["k"],
        lambda rng, p: (rng.randint(0, 300),),
    ),
    T(
        "affine",
        "arithmetic",
        lambda rng: {"a": rng.randint(2, 12), "b": rng.randint(1, 30)},
        ("linear", "scale_and_shift"),
        lambda p: f"Write a function to multiply a given number by {p['a']} and then add {p['b']}.",
        lambda p: f"def {{f}}(n):\n    return n * {p['a']} + {p['b']}\n",
        lambda p: lambda n: n * p["a"] + p["b"],
        _n,
    ),
    T(
        "power_k",
        "arithmetic",
        _k(2, 5),
        ("power", "raise_to"),
        lambda p: f"Write a function to raise a given number to the power {p['k']}.",
        lambda p: f"def {{f}}(n):\n    return n ** {p['k']}\n",
        lambda p: lambda n: n ** p["k"],
        lambda rng, p: (rng.randint(0, 12),),
    ),
    T(
        "sum_times_k",
        "arithmetic",
        _k(2, 30),
        ("sum_times", "scaled_sum"),
        lambda p: f"Write a function to find the sum of two numbers multiplied by {p['k']}.",
        lambda p: f"def {{f}}(a, b):\n    return (a + b) * {p['k']}\n",
        lambda p: lambda a, b: (a + b) * p["k"],
        lambda rng, p: (rng.randint(0, 20), rng.randint(0, 20)),
    ),
    T(
        "square_plus_k",
        "arithmetic",
        _k(1, 99),
        ("square_plus", "shifted_square"),
        lambda p: f"Write a function to find the square of a given number plus {p['k']}.",
        lambda p: f"def {{f}}(n):\n    return n * n + {p['k']}\n",
        lambda p: lambda n: n * n + p["k"],
        _n,
    ),
    # ---------------------------------------------------------------- strings
    T(
        "repeat_k",
        "strings",
        _k(2, 9),
        ("repeat", "repeat_string"),
        lambda p: f"Write a function to repeat a given string {p['k']} times.",
        lambda p: f"def {{f}}(s):\n    return s * {p['k']}\n",
        lambda p: lambda s: s * p["k"],
        lambda rng, p: (_rand_str(rng, 1, 4),),
    ),
    T(
        "add_prefix",
        "strings",
        _affix,
        ("add_prefix", "prefix"),
        lambda p: f"Write a function to add the prefix '{p['p']}' to a given string.",
        lambda p: f"def {{f}}(s):\n    return '{p['p']}' + s\n",
        lambda p: lambda s: p["p"] + s,
        _s,
    ),
    T(
        "add_suffix",
        "strings",
        _affix,
        ("add_suffix", "suffix"),
        lambda p: f"Write a function to append the suffix '{p['p']}' to a given string.",
        lambda p: f"def {{f}}(s):\n    return s + '{p['p']}'\n",
        lambda p: lambda s: s + p["p"],
        _s,
    ),
    T(
        "count_char",
        "strings",
        _char,
        ("count", "count_char"),
        lambda p: f"Write a function to count the occurrences of the character '{p['c']}' in a given string.",
        lambda p: f"def {{f}}(s):\n    return s.count('{p['c']}')\n",
        lambda p: lambda s: s.count(p["c"]),
        lambda rng, p: (_str_with(rng, p["c"]),),
    ),
    T(
        "replace_char",
        "strings",
        _two_chars,
        ("replace_with", "swap_char"),
        lambda p: f"Write a function to replace every '{p['a']}' in a given string with '{p['b']}'.",
        lambda p: f"def {{f}}(s):\n    return s.replace('{p['a']}', '{p['b']}')\n",
        lambda p: lambda s: s.replace(p["a"], p["b"]),
        lambda rng, p: (_str_with(rng, p["a"]),),
    ),
    T(
        "remove_char",
        "strings",
        _char,
        ("remove", "drop_char"),
        lambda p: f"Write a function to remove all occurrences of the character '{p['c']}' from a given string.",
        lambda p: f"def {{f}}(s):\n    return s.replace('{p['c']}', '')\n",
        lambda p: lambda s: s.replace(p["c"], ""),
        lambda rng, p: (_str_with(rng, p["c"]),),
    ),
    T(
        "first_k",
        "strings",
        _k(1, 6),
        ("first_chars", "take"),
        lambda p: f"Write a function to return the first {p['k']} characters of a given string.",
        lambda p: f"def {{f}}(s):\n    return s[:{p['k']}]\n",
        lambda p: lambda s: s[: p["k"]],
        lambda rng, p: (_rand_str(rng, 4, 10),),
    ),
    T(
        "last_k",
        "strings",
        _k(1, 6),
        ("last_chars", "tail"),
        lambda p: f"Write a function to return the last {p['k']} characters of a given string.",
        lambda p: f"def {{f}}(s):\n    return s[-{p['k']}:]\n",
        lambda p: lambda s: s[-p["k"] :],
        lambda rng, p: (_rand_str(rng, 4, 10),),
    ),
    T(
        "upper_suffix",
        "strings",
        _affix,
        ("shout", "upper_with_suffix"),
        lambda p: f"Write a function to convert a given string to upper case and append '{p['p']}'.",
        lambda p: f"def {{f}}(s):\n    return s.upper() + '{p['p']}'\n",
        lambda p: lambda s: s.upper() + p["p"],
        _s,
    ),
    # ---------------------------------------------------------------- lists
    T(
        "list_add_k",
        "lists",
        _k(1, 99),
        ("add_to_each", "shift_list"),
        lambda p: f"Write a function to add {p['k']} to every element of a given list.",
        lambda p: f"def {{f}}(lst):\n    return [x + {p['k']} for x in lst]\n",
        lambda p: lambda lst: [x + p["k"] for x in lst],
        _l,
    ),
    T(
        "list_mul_k",
        "lists",
        _k(2, 40),
        ("multiply_each_by", "scale_list"),
        lambda p: f"Write a function to multiply every element of a given list by {p['k']}.",
        lambda p: f"def {{f}}(lst):\n    return [x * {p['k']} for x in lst]\n",
        lambda p: lambda lst: [x * p["k"] for x in lst],
        _l,
    ),
    T(
        "list_filter_gt",
        "lists",
        _k(1, 60),
        ("greater_than", "filter_above"),
        lambda p: f"Write a function to keep only the elements of a given list that are greater than {p['k']}.",
        lambda p: f"def {{f}}(lst):\n    return [x for x in lst if x > {p['k']}]\n",
        lambda p: lambda lst: [x for x in lst if x > p["k"]],
        _l,
    ),
    T(
        "list_filter_lt",
        "lists",
        _k(2, 60),
        ("less_than", "filter_below"),
        lambda p: f"Write a function to keep only the elements of a given list that are less than {p['k']}.",
        lambda p: f"def {{f}}(lst):\n    return [x for x in lst if x < {p['k']}]\n",
        lambda p: lambda lst: [x for x in lst if x < p["k"]],
        _l,
    ),
    T(
        "list_count_gt",
        "lists",
        _k(1, 60),
        ("count_greater", "count_above"),
        lambda p: f"Write a function to count the elements of a given list that are greater than {p['k']}.",
        lambda p: f"def {{f}}(lst):\n    return len([x for x in lst if x > {p['k']}])\n",
        lambda p: lambda lst: len([x for x in lst if x > p["k"]]),
        _l,
    ),
    T(
        "list_count_div",
        "lists",
        _k(2, 12),
        ("count_div", "count_multiples"),
        lambda p: f"Write a function to count the elements of a given list that are divisible by {p['k']}.",
        lambda p: f"def {{f}}(lst):\n    return len([x for x in lst if x % {p['k']} == 0])\n",
        lambda p: lambda lst: len([x for x in lst if x % p["k"] == 0]),
        _l,
    ),
    T(
        "list_sum_times",
        "lists",
        _k(2, 50),
        ("sum_times", "scaled_total"),
        lambda p: f"Write a function to find the sum of a given list multiplied by {p['k']}.",
        lambda p: f"def {{f}}(lst):\n    return sum(lst) * {p['k']}\n",
        lambda p: lambda lst: sum(lst) * p["k"],
        _l,
    ),
    T(
        "list_first_k",
        "lists",
        _k(1, 5),
        ("first_items", "head"),
        lambda p: f"Write a function to return the first {p['k']} elements of a given list.",
        lambda p: f"def {{f}}(lst):\n    return lst[:{p['k']}]\n",
        lambda p: lambda lst: lst[: p["k"]],
        _l,
    ),
    T(
        "list_max_plus",
        "lists",
        _k(1, 99),
        ("max_plus", "shifted_max"),
        lambda p: f"Write a function to find the largest element of a given list plus {p['k']}.",
        lambda p: f"def {{f}}(lst):\n    return max(lst) + {p['k']}\n",
        lambda p: lambda lst: max(lst) + p["k"],
        _l,
    ),
    # ---------------------------------------------------------------- conditionals
    T(
        "if_gt_else",
        "conditionals",
        lambda rng: {"k": rng.randint(1, 30), "a": rng.randint(0, 99), "b": rng.randint(0, 99)},
        ("pick_or", "threshold"),
        lambda p: (
            f"Write a function that returns {p['a']} if a given number is greater than {p['k']}, and {p['b']} otherwise."
        ),
        lambda p: f"def {{f}}(n):\n    if n > {p['k']}:\n        return {p['a']}\n    return {p['b']}\n",
        lambda p: lambda n: p["a"] if n > p["k"] else p["b"],
        lambda rng, p: (rng.randint(0, 40),),
    ),
    T(
        "is_div",
        "conditionals",
        _k(2, 40),
        ("is_divisible_by", "divisible"),
        lambda p: f"Write a function to check whether a given number is divisible by {p['k']}.",
        lambda p: f"def {{f}}(n):\n    return n % {p['k']} == 0\n",
        lambda p: lambda n: n % p["k"] == 0,
        lambda rng, p: (p["k"] * rng.randint(0, 9) + rng.choice((0, 0, 1, 2)),),
    ),
    T(
        "in_range",
        "conditionals",
        lambda rng: {"a": (a := rng.randint(0, 40)), "b": a + rng.randint(3, 40)},
        ("between_and", "in_range"),
        lambda p: f"Write a function to check whether a given number is between {p['a']} and {p['b']} inclusive.",
        lambda p: f"def {{f}}(n):\n    return {p['a']} <= n <= {p['b']}\n",
        lambda p: lambda n: p["a"] <= n <= p["b"],
        lambda rng, p: (rng.randint(max(0, p["a"] - 10), p["b"] + 10),),
    ),
    T(
        "clamp_max",
        "conditionals",
        _k(5, 90),
        ("cap_at", "clamp"),
        lambda p: f"Write a function that returns a given number, but at most {p['k']}.",
        lambda p: f"def {{f}}(n):\n    if n > {p['k']}:\n        return {p['k']}\n    return n\n",
        lambda p: lambda n: min(n, p["k"]),
        lambda rng, p: (rng.randint(0, 2 * p["k"]),),
    ),
    T(
        "clamp_min",
        "conditionals",
        _k(5, 90),
        ("at_least", "floor_at"),
        lambda p: f"Write a function that returns a given number, but at least {p['k']}.",
        lambda p: f"def {{f}}(n):\n    if n < {p['k']}:\n        return {p['k']}\n    return n\n",
        lambda p: lambda n: max(n, p["k"]),
        lambda rng, p: (rng.randint(0, 2 * p["k"]),),
    ),
    T(
        "even_odd_words",
        "conditionals",
        lambda rng: dict(zip(("a", "b"), rng.sample(_WORDS, 2))),
        ("parity", "even_or_odd"),
        lambda p: f"Write a function that returns '{p['a']}' if a given number is even and '{p['b']}' otherwise.",
        lambda p: f"def {{f}}(n):\n    if n % 2 == 0:\n        return '{p['a']}'\n    return '{p['b']}'\n",
        lambda p: lambda n: p["a"] if n % 2 == 0 else p["b"],
        _n,
    ),
    T(
        "long_string",
        "conditionals",
        _k(2, 9),
        ("longer_than", "is_long"),
        lambda p: f"Write a function to check whether a given string has more than {p['k']} characters.",
        lambda p: f"def {{f}}(s):\n    return len(s) > {p['k']}\n",
        lambda p: lambda s: len(s) > p["k"],
        lambda rng, p: (_rand_str(rng, max(1, p["k"] - 3), p["k"] + 3),),
    ),
    T(
        "abs_diff",
        "conditionals",
        _k(1, 60),
        ("distance_to", "abs_diff"),
        lambda p: f"Write a function to find the absolute difference between a given number and {p['k']}.",
        lambda p: f"def {{f}}(n):\n    if n > {p['k']}:\n        return n - {p['k']}\n    return {p['k']} - n\n",
        lambda p: lambda n: abs(n - p["k"]),
        lambda rng, p: (rng.randint(0, 2 * p["k"] + 5),),
    ),
    # ---------------------------------------------------------------- compositions
    T(
        "sum_sq_gt",
        "compositions",
        _k(1, 40),
        ("sum_squares_above", "big_square_sum"),
        lambda p: (
            f"Write a function to find the sum of the squares of the elements of a given list that are greater than {p['k']}."
        ),
        lambda p: f"def {{f}}(lst):\n    return sum(x * x for x in lst if x > {p['k']})\n",
        lambda p: lambda lst: sum(x * x for x in lst if x > p["k"]),
        _l,
    ),
    T(
        "count_long_words",
        "compositions",
        _k(2, 5),
        ("count_words_longer", "long_words"),
        lambda p: f"Write a function to count the words in a given sentence that have more than {p['k']} letters.",
        lambda p: f"def {{f}}(s):\n    return len([w for w in s.split() if len(w) > {p['k']}])\n",
        lambda p: lambda s: len([w for w in s.split() if len(w) > p["k"]]),
        lambda rng, p: (_sentence(rng),),
    ),
    T(
        "mul_even_k",
        "compositions",
        _k(2, 30),
        ("scale_evens", "multiply_evens"),
        lambda p: (
            f"Write a function to multiply every even element of a given list by {p['k']} and keep the odd elements unchanged."
        ),
        lambda p: f"def {{f}}(lst):\n    return [x * {p['k']} if x % 2 == 0 else x for x in lst]\n",
        lambda p: lambda lst: [x * p["k"] if x % 2 == 0 else x for x in lst],
        _l,
    ),
    T(
        "digit_sum_k",
        "compositions",
        _k(2, 30),
        ("digit_sum_times", "scaled_digit_sum"),
        lambda p: f"Write a function to find the sum of the digits of a given number multiplied by {p['k']}.",
        lambda p: f"def {{f}}(n):\n    return sum(int(d) for d in str(n)) * {p['k']}\n",
        lambda p: lambda n: _digits_sum(n) * p["k"],
        lambda rng, p: (rng.randint(10, 9999),),
    ),
    T(
        "reverse_suffix",
        "compositions",
        _affix,
        ("reverse_and_add", "mirror_tag"),
        lambda p: f"Write a function to reverse a given string and then append '{p['p']}'.",
        lambda p: f"def {{f}}(s):\n    return s[::-1] + '{p['p']}'\n",
        lambda p: lambda s: s[::-1] + p["p"],
        _s,
    ),
    T(
        "add_k_gt_t",
        "compositions",
        lambda rng: {"k": rng.randint(1, 30), "t": rng.randint(1, 40)},
        ("bump_above", "add_to_big"),
        lambda p: (
            f"Write a function to add {p['k']} to every element of a given list that is greater than {p['t']} and keep the others unchanged."
        ),
        lambda p: f"def {{f}}(lst):\n    return [x + {p['k']} if x > {p['t']} else x for x in lst]\n",
        lambda p: lambda lst: [x + p["k"] if x > p["t"] else x for x in lst],
        _l,
    ),
    T(
        "join_upper",
        "compositions",
        lambda rng: {"c": rng.choice(("-", "_", "+", ".", ":", "|"))},
        ("join_upper", "shout_join"),
        lambda p: (
            f"Write a function to convert every string in a given list to upper case and join them with '{p['c']}'."
        ),
        lambda p: f"def {{f}}(words):\n    return '{p['c']}'.join(w.upper() for w in words)\n",
        lambda p: lambda words: p["c"].join(w.upper() for w in words),
        lambda rng, p: ([_word(rng) for _ in range(rng.randint(2, 4))],),
    ),
    T(
        "count_vowels_k",
        "compositions",
        _k(2, 30),
        ("vowels_times", "vowel_score"),
        lambda p: f"Write a function to count the vowels in a given string and multiply the count by {p['k']}.",
        lambda p: f"def {{f}}(s):\n    return len([c for c in s if c in 'aeiou']) * {p['k']}\n",
        lambda p: lambda s: len([c for c in s if c in "aeiou"]) * p["k"],
        lambda rng, p: (_word(rng) + _word(rng),),
    ),
    T(
        "even_sum_minus",
        "compositions",
        _k(1, 40),
        ("even_sum_minus", "even_total"),
        lambda p: f"Write a function to find the sum of the even elements of a given list minus {p['k']}.",
        lambda p: f"def {{f}}(lst):\n    return sum(x for x in lst if x % 2 == 0) - {p['k']}\n",
        lambda p: lambda lst: sum(x for x in lst if x % 2 == 0) - p["k"],
        _l,
    ),
)
del T

_BY_FAMILY: dict[str, tuple[Template, ...]] = {
    fam: tuple(t for t in TEMPLATES if t.family == fam) for fam in SYNTH_FAMILIES
}


def _key(t: Template, params: dict[str, Any]) -> str:
    return t.tid + "|" + "|".join(f"{k}={params[k]!r}" for k in sorted(params))


def split_of_key(key: str) -> str:
    """The split a canonical problem key belongs to (fixed, independent of any seed)."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 100
    for split, rng_ in _SPLIT_BUCKETS.items():
        if bucket in rng_:
            return split
    raise AssertionError(bucket)  # pragma: no cover


def _make(t: Template, params: dict[str, Any], rng: random.Random, split: str, index: int) -> Problem | None:
    fname = rng.choice(t.names).format(**params)
    fn = t.fn(params)
    tests: list[str] = []
    outputs: list[Any] = []
    seen: set[str] = set()
    for _ in range(40):
        args = t.inputs(rng, params)
        call = f"{fname}({', '.join(repr(a) for a in args)})"
        if call in seen:
            continue
        seen.add(call)
        out = fn(*args)
        tests.append(f"assert {call} == {out!r}")
        outputs.append(out)
        if len(tests) == 3:
            # Tests that cannot tell a constant function from the task are redrawn once.
            if len({repr(o) for o in outputs}) == 1 and len(seen) < 20:
                tests.pop(0)
                outputs.pop(0)
                continue
            break
    if len(tests) < 3:
        return None
    description = t.describe(params)
    reference = t.code(params).replace("{f}", fname)
    tests_t = tuple(tests)
    return Problem(
        task_id=f"synth/{split}/{index}",
        prompt=format_prompt(description, tests_t),
        entry_point=fname,
        tests=tests_t,
        test_setup="",
        reference=reference,
        split=split,
        dataset="synth",
        code_prefix="",
        description=description,
        visible_tests=tests_t,
        meta={"family": t.family, "template": t.tid, "params": dict(params), "key": _key(t, params)},
    )


def load_synth(
    split: str = "test",
    n: int | None = None,
    seed: int = 0,
    families: tuple[str, ...] | list[str] | None = None,
) -> list[Problem]:
    """The ``split`` of the synth dataset: ``n`` problems (default: the split's size).

    Deterministic in (split, seed): ``load_synth(s, n)`` is a prefix of ``load_synth(s)``
    when ``n`` is at most the split size. Families are sampled uniformly, then a template
    uniformly within its family. ``families`` restricts the problems to some skill
    families (default: all of ``SYNTH_FAMILIES``); a restricted list is not a prefix of
    the full one. Problems of different splits never share a canonical key.
    """
    if split not in SYNTH_SPLIT_SIZES:
        raise ValueError(f"unknown synth split {split!r}; expected one of {sorted(SYNTH_SPLIT_SIZES)}")
    fams = tuple(families) if families else SYNTH_FAMILIES
    for fam in fams:
        if fam not in _BY_FAMILY:
            raise ValueError(f"unknown synth family {fam!r}; expected some of {SYNTH_FAMILIES}")
    size = SYNTH_SPLIT_SIZES[split] if n is None else n
    if size < 0:
        raise ValueError("n must be >= 0")
    rng = random.Random(f"codedistill-synth|{split}|{seed}")
    problems: list[Problem] = []
    keys: set[str] = set()
    attempts = 0
    while len(problems) < size:
        attempts += 1
        if attempts > 200 * size + 10_000:
            raise RuntimeError(f"synth: could only draw {len(problems)} distinct {split} problems")
        t = rng.choice(_BY_FAMILY[rng.choice(fams)])
        params = t.params(rng)
        key = _key(t, params)
        if key in keys or split_of_key(key) != split:
            continue
        # Per-problem RNG so names/tests do not depend on how many keys were rejected before.
        prng = random.Random(f"{key}|{seed}|{split}")
        prob = _make(t, params, prng, split, len(problems))
        if prob is None:
            continue
        keys.add(key)
        problems.append(prob)
    return problems
