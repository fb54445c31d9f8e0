"""Tiny coding tasks: one-line Python functions from templates, with public and private asserts.

~300 distinct tasks exist; a task's tests are drawn from a hash of its prompt, so the same prompt
always gets the same tests. train and heldout never share a prompt (data_recipes.splits). They are
checked by data_recipes.verifiers.score_code, in the sandbox.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from data_recipes.splits import in_heldout, text_id

# (function name, parameters, what it returns, reference expression, kind of arguments);
# {k} is drawn per task, so one template gives many distinct prompts.
_TEMPLATES = (
    ("add{k}", "x", "x + {k}", "x + {k}", "int"),
    ("sub{k}", "x", "x - {k}", "x - {k}", "int"),
    ("times{k}", "x", "x multiplied by {k}", "x * {k}", "int"),
    ("mod{k}", "x", "the remainder of x divided by {k}", "x % {k}", "int"),
    ("floordiv{k}", "x", "x divided by {k}, rounded down", "x // {k}", "int"),
    ("is_multiple_of_{k}", "x", "True if x is divisible by {k}, else False", "x % {k} == 0", "int"),
    ("at_most_{k}", "x", "x, but never more than {k}", "min(x, {k})", "int"),
    ("square", "x", "x squared", "x * x", "int"),
    ("cube", "x", "x cubed", "x ** 3", "int"),
    ("is_even", "x", "True if x is even, else False", "x % 2 == 0", "int"),
    ("is_odd", "x", "True if x is odd, else False", "x % 2 == 1", "int"),
    ("absolute", "x", "the absolute value of x", "abs(x)", "int"),
    ("sign", "x", "1 if x is positive, -1 if it is negative and 0 if it is zero",
     "(x > 0) - (x < 0)", "int"),
    ("last_digit", "n", "the last decimal digit of the non-negative integer n", "n % 10", "nat"),
    ("digit_sum", "n", "the sum of the decimal digits of the non-negative integer n",
     "sum(int(d) for d in str(n))", "nat"),
    ("max2", "a, b", "the larger of a and b", "max(a, b)", "int2"),
    ("min2", "a, b", "the smaller of a and b", "min(a, b)", "int2"),
    ("distance", "a, b", "the absolute difference between a and b", "abs(a - b)", "int2"),
    ("reverse", "s", "the string s reversed", "s[::-1]", "str"),
    ("count_vowels", "s", "the number of vowels (a, e, i, o, u) in the lowercase string s",
     "sum(c in 'aeiou' for c in s)", "str"),
    ("is_palindrome", "s", "True if the string s reads the same backwards, else False",
     "s == s[::-1]", "str"),
    ("first_char", "s", "the first character of the non-empty string s", "s[0]", "str"),
    ("shout", "s", "s in upper case followed by '!'", "s.upper() + '!'", "str"),
    ("repeat{k}", "s", "the string s repeated {k} times", "s * {k}", "str"),
    ("word_count", "s", "the number of words in s (words are separated by spaces)",
     "len(s.split())", "words"),
    ("list_sum", "xs", "the sum of the list of integers xs", "sum(xs)", "list"),
    ("list_max", "xs", "the largest element of the non-empty list xs", "max(xs)", "list"),
    ("count_positive", "xs", "how many elements of the list xs are greater than 0",
     "sum(x > 0 for x in xs)", "list"),
    ("evens", "xs", "the even elements of the list xs, in order",
     "[x for x in xs if x % 2 == 0]", "list"),
    ("double_all", "xs", "a list with every element of the list xs doubled",
     "[2 * x for x in xs]", "list"),
    ("first{k}", "xs", "the first {k} elements of the list xs", "xs[:{k}]", "list"),
    ("sorted_desc", "xs", "the list xs sorted from largest to smallest",
     "sorted(xs, reverse=True)", "list"),
)


@dataclass(frozen=True)
class CodeTask:
    id: str
    """sha256 of the prompt, first 16 hex digits (data_recipes.splits.text_id, as Prompt.id)."""
    name: str
    prompt: str
    solution: str
    public_tests: tuple[str, ...]
    """Shown with the prompt, if the caller wants to."""
    private_tests: tuple[str, ...]

    @property
    def tests(self) -> tuple[str, ...]:
        """Public, then private: CodeVerdict.failed (data_recipes.verifiers) indexes into this."""
        return self.public_tests + self.private_tests

    @property
    def prompt_with_tests(self) -> str:
        """The prompt a policy sees (SFT, RL, eval): the instruction and its public asserts."""
        return self.prompt + "\nIt must pass:\n" + "\n".join(self.public_tests)


def _argument(rng: random.Random, kind: str) -> tuple:
    def word():
        return "".join(rng.choice("abcdeilmnorstu") for _ in range(rng.randint(1, 7)))

    if kind == "str":
        w = word()
        return (w + w[-2::-1] if rng.random() < 0.3 else w,)  # some palindromes
    return {"int": lambda: (rng.randint(-50, 100),), "nat": lambda: (rng.randint(0, 10 ** 6),),
            "int2": lambda: (rng.randint(-50, 100), rng.randint(-50, 100)),
            "words": lambda: (" ".join(word() for _ in range(rng.randint(1, 5))),),
            "list": lambda: ([rng.randint(-20, 20) for _ in range(rng.randint(1, 6))],)}[kind]()


def _task(name: str, params: str, expr: str, kind: str, prompt: str) -> CodeTask:
    task_id = text_id(prompt)
    rng = random.Random(int(task_id, 16))  # the same prompt always gets the same tests
    args: list[tuple] = []
    for _ in range(100):
        if len(args) == 6:
            break
        if (a := _argument(rng, kind)) not in args:
            args.append(a)
    ref = eval(f"lambda {params}: {expr}")  # our own template, not model output
    tests = tuple(f"assert {name}({', '.join(map(repr, a))}) == {ref(*a)!r}" for a in args)
    return CodeTask(task_id, name, prompt, f"def {name}({params}):\n    return {expr}\n",
                    tests[:2], tests[2:])


def make_code_tasks(num: int, seed: int, split: str = "train",
                    heldout_fraction: float = 0.2) -> list[CodeTask]:
    """At most `num` distinct tasks (~300 exist), in a fixed order for a given seed.

    train and heldout never share a prompt: the split is decided by a hash of the prompt text.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng, seen, tries = random.Random(seed), {}, 0
    while len(seen) < num and tries < 50 * num + 1000:
        tries += 1
        name, params, what, expr, kind = rng.choice(_TEMPLATES)
        k = rng.randint(2, 5) if kind in ("str", "list") else rng.randint(2, 20)
        name, what, expr = (x.replace("{k}", str(k)) for x in (name, what, expr))
        prompt = f"Write a one-line Python function `{name}({params})` that returns {what}."
        if prompt not in seen and in_heldout(prompt, heldout_fraction) == (split == "heldout"):
            seen[prompt] = _task(name, params, expr, kind, prompt)
    return list(seen.values())
