"""A small local corpus for tool-use tests and the tiny tool-RL proof, built offline.

Two collections in one jsonl ({id, title, text} per line):
- one document per public function of a few standard-library modules: its signature and
  docstring (real text, so search has realistic vocabulary and distractors);
- fictional facts, generated from a seed: towns (founding year, river, mayor) and people
  (birthplace, trade). The names are made-up syllable strings, so no model knows the answers;
  questions need one document (1 hop) or a person found through a town (2 hops).

`write_tool_corpus(out_dir, seed)` writes corpus.jsonl and questions.jsonl ({question, answer,
hops, doc_ids}); the same seed gives the same files (for a given Python version: the stdlib part
comes from `inspect`).
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
from pathlib import Path

STDLIB_MODULES = ("json", "textwrap", "statistics", "bisect", "heapq", "shlex", "fnmatch",
                  "colorsys")
_SYLLABLES = ("ka", "ren", "tor", "vel", "mi", "dra", "osh", "lun", "pe", "zar", "qui", "bel",
              "nor", "tas", "eth", "gri", "sol", "vak", "um", "ys")
_TRADES = ("glassblower", "cartographer", "beekeeper", "clockmaker", "ferryman", "weaver",
           "astronomer", "potter", "lute maker", "salt merchant")
_RIVERS = ("Ashen", "Silverrun", "Blackwater", "Thornbrook", "Mirewind", "Coldspring")


def stdlib_documents(modules: tuple[str, ...] = STDLIB_MODULES) -> list[dict]:
    """{id: "py:<module>.<function>", title: "<module>.<function><signature>", text: docstring}
    for each public function with a docstring, in name order."""
    docs = []
    for name in modules:
        module = importlib.import_module(name)
        for fname, fn in sorted(vars(module).items()):
            if fname.startswith("_") or not (inspect.isfunction(fn) or inspect.isbuiltin(fn)):
                continue
            doc = inspect.getdoc(fn)
            if not doc or getattr(fn, "__module__", name) not in (name, f"_{name}", None):
                continue
            try:
                sig = str(inspect.signature(fn))
            except (TypeError, ValueError):
                sig = "(...)"
            docs.append({"id": f"py:{name}.{fname}", "title": f"{name}.{fname}{sig}",
                         "text": f"{name}.{fname}{sig}\n\n{doc}"})
    return docs


def _name(rng: random.Random, used: set[str], parts: int) -> str:
    while True:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()
        if name not in used:
            used.add(name)
            return name


def fictional_facts(seed: int, n_towns: int = 12) -> tuple[list[dict], list[dict]]:
    """(documents, questions) of a made-up world: one document per town and per person."""
    rng = random.Random(seed)
    used: set[str] = set()
    towns = [_name(rng, used, 3) for _ in range(n_towns)]
    people = [f"{_name(rng, used, 2)} {_name(rng, used, 3)}" for _ in range(n_towns)]
    docs, questions = [], []
    for i, (town, mayor) in enumerate(zip(towns, people)):
        year, river = rng.randint(1200, 1950), rng.choice(_RIVERS)
        birthplace = towns[(i + 1 + rng.randrange(n_towns - 1)) % n_towns]  # another town
        trade = rng.choice(_TRADES)
        town_id, person_id = f"town:{town.lower()}", f"person:{mayor.lower().replace(' ', '-')}"
        docs.append({"id": town_id, "title": town, "text": (
            f"{town} is a town on the {river} river. It was founded in {year}. "
            f"The current mayor of {town} is {mayor}.")})
        docs.append({"id": person_id, "title": mayor, "text": (
            f"{mayor} was born in {birthplace} and trained as a {trade} before entering "
            f"public life.")})
        questions += [
            {"question": f"In which year was {town} founded?", "answer": str(year), "hops": 1,
             "doc_ids": [town_id]},
            {"question": f"What was {mayor}'s trade?", "answer": trade, "hops": 1,
             "doc_ids": [person_id]},
            {"question": f"In which town was the mayor of {town} born?", "answer": birthplace,
             "hops": 2, "doc_ids": [town_id, person_id]},
        ]
    return docs, questions


def write_tool_corpus(out_dir: str | Path, seed: int = 0, n_towns: int = 12) -> tuple[Path, Path]:
    """corpus.jsonl (stdlib functions + fictional facts, shuffled by the seed) and
    questions.jsonl under `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    facts, questions = fictional_facts(seed, n_towns)
    docs = stdlib_documents() + facts
    random.Random(seed).shuffle(docs)
    corpus, qs = out / "corpus.jsonl", out / "questions.jsonl"
    corpus.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    qs.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions))
    return corpus, qs
