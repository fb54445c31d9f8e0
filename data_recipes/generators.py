"""The generator interface of SFT data construction, and its HTTP backend.

A `Generator` completes chats (`complete`). The refinement roles (draft, checklist, evaluate,
revise, reconstruct CoT) and the judge roles (score, prefer) are prompts over `complete` defined
once here, so any chat model can play any role; a programmatic oracle (data_recipes.oracles)
overrides the roles it can do exactly. The third backend, a
pipeline checkpoint sampled with the engine, is `stages.engine.generate.EngineGenerator` (it needs torch).
`data_recipes.backends.build_generator` builds the http or oracle backend a config names.

Every role method is batched: lists in, lists out, in order.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from data_recipes.chat import Message, PromptFormat, parse_assistant
from data_recipes.config_fields import unhashed


@dataclass(kw_only=True)
class GeneratorConfig(PromptFormat):
    """A text generator backend for one role (draft, evaluate, revise, CoT) of `sft_data`."""

    kind: str = "oracle"
    """engine (the checkpoint of the stage's `engine` ref) | http (an OpenAI-compatible
    chat-completions endpoint) | oracle (a programmatic solver/checker for a verifiable task)."""
    task: str = "auto"
    """oracle: the task it solves and checks: arithmetic | code | auto (each prompt by its kind)."""
    error_rate: float = 0.0
    """oracle: the share of its answers it gets wrong on purpose (a stand-in for a fallible teacher)."""
    url: str = ""
    """http: base URL, e.g. http://127.0.0.1:8000/v1"""
    model: str = ""
    """http: the served model name."""
    api_key_env: str = "OPENAI_API_KEY"
    """http: the environment variable holding the API key (sent only when set)."""
    concurrency: int = unhashed(8)
    timeout_s: float = unhashed(60.0)
    max_retries: int = unhashed(4)
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int = 0
    batch_size: int = unhashed(16)
    """engine: prompts per generate() call."""
    def __post_init__(self):
        super().__post_init__()
        if self.kind not in ("engine", "http", "oracle"):
            raise ValueError(f"kind: {self.kind!r} is not a generator backend; one of engine, http, "
                             "oracle")
        if self.kind == "http" and not self.url:
            raise ValueError("url: the http backend needs the endpoint's base URL")
        if self.prompt_format not in ("chat", "completion"):
            raise ValueError(f"prompt_format: {self.prompt_format!r}; one of chat, completion")


class GenerationError(RuntimeError):
    pass


@dataclass
class Verdict:
    item: str
    passed: bool
    critique: str = ""


@dataclass
class CoT:
    summary: str
    reasoning: str


DRAFT_SYSTEM = "Answer the user's instruction as well as you can."
CHECKLIST_SYSTEM = ("Write a checklist of 2 to 5 short, checkable requirements that a perfect answer "
                    "to the user's instruction must meet. One per line, each starting with '- '.")
EVALUATE_SYSTEM = ("You are a strict evaluator. For each numbered checklist item, reply with one "
                   "line: '<n>. PASS' or '<n>. FAIL: <what is wrong and how to fix it>'.")
REVISE_SYSTEM = ("Rewrite the answer so that it meets every checklist item, fixing what the "
                 "critiques point out. Reply with the revised answer only.")
JUDGE_SYSTEM = ("Rate how well the answer responds to the instruction, from 0 (wrong or useless) to "
                "10 (correct and complete). Reply with one line: 'Score: <n>'.")
PREFER_SYSTEM = ("Two answers to the same instruction follow. Which one would a careful user "
                 "prefer? Reply with one letter: A or B.")
COT_SYSTEM = ("You are given an instruction and its final answer. First write 'Summary:' and a "
              "one-line plan, then 'Reasoning:' and a complete step-by-step reasoning that arrives "
              "at exactly this final answer. Do not restate the final answer after the reasoning.")


def _numbered(items: list[str]) -> str:
    return "\n".join(f"{i}. {item}" for i, item in enumerate(items, 1))


def answer_only(text: str) -> str:
    """The answer part of a generation (a thinking block, if any, dropped)."""
    return parse_assistant(text).content.strip()


class Generator:
    """Chat completion plus the refinement roles built on it."""

    def complete(self, chats: list[list[Message]]) -> list[str]:
        raise NotImplementedError

    def draft(self, prompts: list[str]) -> list[str]:
        return [answer_only(t) for t in self.complete(
            [[Message("system", DRAFT_SYSTEM), Message("user", p)] for p in prompts])]

    def checklist(self, prompts: list[str]) -> list[list[str]]:
        texts = self.complete([[Message("system", CHECKLIST_SYSTEM), Message("user", p)]
                               for p in prompts])
        out = []
        for t in texts:
            items = [line[2:].strip() for line in answer_only(t).splitlines()
                     if line.startswith("- ") and line[2:].strip()]
            out.append(items or ["The answer fully and correctly addresses the instruction."])
        return out

    def evaluate(self, prompts: list[str], checklists: list[list[str]],
                 answers: list[str]) -> list[list[Verdict]]:
        texts = self.complete([
            [Message("system", EVALUATE_SYSTEM),
             Message("user", f"Instruction:\n{p}\n\nChecklist:\n{_numbered(c)}\n\nAnswer:\n{a}")]
            for p, c, a in zip(prompts, checklists, answers)])
        return [parse_verdicts(answer_only(t), c) for t, c in zip(texts, checklists)]

    def revise(self, prompts: list[str], answers: list[str],
               critiques: list[list[str]]) -> list[str]:
        return [answer_only(t) for t in self.complete([
            [Message("system", REVISE_SYSTEM),
             Message("user", f"Instruction:\n{p}\n\nAnswer:\n{a}\n\nCritiques:\n{_numbered(c)}")]
            for p, a, c in zip(prompts, answers, critiques)])]

    def reconstruct_cot(self, prompts: list[str], answers: list[str]) -> list[CoT]:
        texts = self.complete([
            [Message("system", COT_SYSTEM),
             Message("user", f"Instruction:\n{p}\n\nFinal answer:\n{a}")]
            for p, a in zip(prompts, answers)])
        return [parse_cot(answer_only(t)) for t in texts]

    def score(self, prompts: list[str], answers: list[str]) -> list[float]:
        """A judge's rating of each answer in [0, 1] (an unreadable rating counts as 0)."""
        texts = self.complete([
            [Message("system", JUDGE_SYSTEM),
             Message("user", f"Instruction:\n{p}\n\nAnswer:\n{a}")]
            for p, a in zip(prompts, answers)])
        return [parse_score(answer_only(t)) for t in texts]


    def prefer(self, prompts: list[str], a: list[str], b: list[str]) -> list[float]:
        """1.0 where the judge prefers answer A, 0.0 for B, 0.5 when its reply names neither."""
        texts = self.complete([
            [Message("system", PREFER_SYSTEM),
             Message("user", f"Instruction:\n{p}\n\nAnswer A:\n{x}\n\nAnswer B:\n{y}")]
            for p, x, y in zip(prompts, a, b)])
        return [parse_preference(answer_only(t)) for t in texts]


def parse_preference(text: str) -> float:
    m = re.search(r"\b([AB])\b", text)
    return 0.5 if m is None else float(m.group(1) == "A")


_SCORE = re.compile(r"Score:\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def parse_score(text: str) -> float:
    m = _SCORE.search(text)
    return min(max(float(m.group(1)), 0.0), 10.0) / 10 if m else 0.0


_VERDICT = re.compile(r"^\s*(\d+)[.)]\s*(PASS|FAIL)\b[:\s-]*(.*)$", re.IGNORECASE)


def parse_verdicts(text: str, checklist: list[str]) -> list[Verdict]:
    """One verdict per item; an item the evaluator did not answer fails ("no verdict")."""
    found: dict[int, tuple[bool, str]] = {}
    for line in text.splitlines():
        m = _VERDICT.match(line)
        if m and 1 <= int(m.group(1)) <= len(checklist):
            found.setdefault(int(m.group(1)), (m.group(2).upper() == "PASS", m.group(3).strip()))
    return [Verdict(item, *found.get(i, (False, "no verdict for this item")))
            for i, item in enumerate(checklist, 1)]


def parse_cot(text: str) -> CoT:
    summary, sep, reasoning = text.partition("Reasoning:")
    if not sep:
        return CoT("", text.strip())
    return CoT(summary.replace("Summary:", "", 1).strip(), reasoning.strip())


# --------------------------------------------------------------------------------------------
# HTTP: any OpenAI-compatible chat-completions endpoint


class HTTPGenerator(Generator):
    """POST {url}/chat/completions, `concurrency` requests in flight, with retries and a cache.

    The cache is a jsonl file appended (and fsynced) as each response arrives, keyed by the request
    content, so a crash or a rerun never pays twice for the same generation. Retried: connection
    errors, timeouts, 429 and 5xx (exponential backoff); other HTTP errors fail at once.
    """

    def __init__(self, cfg: GeneratorConfig, cache_path: str | os.PathLike,
                 backoff_s: float = 1.0):
        self.cfg, self.backoff_s = cfg, backoff_s
        self.endpoint = cfg.url.rstrip("/") + "/chat/completions"
        self.cache_path = Path(cache_path)
        self.cache: dict[str, str] = {}
        self.lock = threading.Lock()
        self.requests_sent = 0
        if self.cache_path.exists():
            for line in self.cache_path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    self.cache[rec["key"]] = rec["text"]
                except (json.JSONDecodeError, KeyError):  # a line cut short by a kill
                    pass

    def _body(self, chat: list[Message]) -> dict:
        c = self.cfg
        return {"model": c.model, "temperature": c.temperature, "top_p": c.top_p,
                "max_tokens": c.max_tokens, "seed": c.seed,
                "messages": [{"role": m.role, "content": m.content} for m in chat]}

    def complete(self, chats: list[list[Message]]) -> list[str]:
        bodies = [self._body(chat) for chat in chats]
        keys = [hashlib.sha256(json.dumps(b, sort_keys=True).encode()).hexdigest() for b in bodies]
        todo = {k: b for k, b in zip(keys, bodies) if k not in self.cache}
        if todo:
            with ThreadPoolExecutor(max(1, self.cfg.concurrency)) as pool:
                for _ in pool.map(lambda kb: self._fetch(*kb), todo.items()):
                    pass
        return [self.cache[k] for k in keys]

    def _fetch(self, key: str, body: dict) -> None:
        headers = {"Content-Type": "application/json"}
        if os.environ.get(self.cfg.api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[self.cfg.api_key_env]}"
        data = json.dumps(body).encode()
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), 30.0))
            try:
                req = urllib.request.Request(self.endpoint, data=data, headers=headers)
                with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                    text = json.loads(resp.read())["choices"][0]["message"]["content"]
                break
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:200]
                last = f"HTTP {e.code}: {detail}"
                if e.code != 429 and e.code < 500:
                    raise GenerationError(f"{self.endpoint}: {last} (not retried)") from None
            except (urllib.error.URLError, TimeoutError, OSError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
                last = f"malformed response ({type(e).__name__}: {e})"
        else:
            raise GenerationError(
                f"{self.endpoint}: failed after {self.cfg.max_retries + 1} attempts ({last}); "
                f"{len(self.cache)} responses are saved in {self.cache_path} and will be reused")
        with self.lock:
            self.cache[key] = text
            self.requests_sent += 1
            with open(self.cache_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "text": text}) + "\n")
                f.flush()
                os.fsync(f.fileno())
