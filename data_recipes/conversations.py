"""Conversation datasets for SFT: record formats -> our chat `Message` lists, read from sources.

    datasets:
      - {name: tulu, source: {kind: jsonl, paths: [tulu.jsonl]}, format: messages}
      - {name: alpaca, source: {kind: parquet, paths: [alpaca/]}, format: alpaca, max_errors: 0.01}

Formats (`fields:` renames any field, e.g. `{messages: conversation, content: text}`):
- `messages` (OpenAI): system/developer, user, assistant, tool turns; an assistant's
  `reasoning_content`, or a `<think>...</think>` block at the start of its content, is its
  thinking; `tool_calls` and tool results take Qwen3's native form (a `<tool_call>` JSON block in
  the assistant turn, `<tool_response>` blocks in a user turn; a record's `tools` go into the
  system turn), since our template has no tool role.
- `sharegpt`: `conversations` of {from, value} (human/gpt/system/function_call/observation).
- `alpaca`: instruction (+ input) -> output.
- `prompt_response`: prompt -> response.
- `auto`: each record by the first format whose main field it has.

Sources are the recipe's source kinds that hold records (jsonl, parquet, hf), streamed: a jsonl
line reaches the tokenizing workers as text (they parse it), so the reader does no JSON work.
A malformed record is skipped, counted and reported with its place (`file:line`, `file[row n]`);
past `max_errors` (a share of the dataset's records) the stage fails. Light at import time:
the driver validates recipes with `ConversationsConfig`.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from data_recipes.chat import END_THINK, SPECIAL_TOKENS, THINK, Message
from data_recipes.config_fields import MISSING
from data_recipes.sources import _files as source_files  # the readers' sorted, recursive walk
from data_recipes.sources import build_source, missing_paths

FORMATS: dict[str, dict[str, str]] = {
    "messages": {"messages": "messages", "role": "role", "content": "content",
                 "reasoning": "reasoning_content", "tool_calls": "tool_calls", "tools": "tools",
                 "system": "system"},
    "sharegpt": {"conversations": "conversations", "role": "from", "content": "value",
                 "tools": "tools", "system": "system"},
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output",
               "system": "system"},
    "prompt_response": {"prompt": "prompt", "response": "response", "reasoning": "reasoning",
                        "system": "system"},
}
"""format -> (our name of a field -> the dataset's name of it, by default)."""
MAIN_FIELDS = {"messages": ("messages",), "sharegpt": ("conversations",),
               "alpaca": ("instruction", "output"), "prompt_response": ("prompt", "response")}
"""The fields a record of each format must have (a dataset with none of them is the wrong one)."""
ROLES = {"system": "system", "developer": "system", "user": "user", "human": "user",
         "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant",
         "model": "assistant", "tool": "tool", "function": "tool", "observation": "tool",
         "function_response": "tool", "ipython": "tool", "function_call": "tool_call"}
RECORD_SOURCES = ("jsonl", "parquet", "hf")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class BadRecord(ValueError):
    """A record that cannot be a training conversation (counted against the error budget)."""


@dataclass
class ConversationsConfig:
    """One conversation dataset: where its records are, their format and its error budget."""

    name: str = MISSING
    """Names its shards in the store and its weight in `sft.mix`."""
    source: dict[str, Any] = field(default_factory=dict)
    """A source of kind jsonl, parquet or hf (data_recipes.sources; `field`/`column` unused,
    `max_docs` caps the records read)."""
    format: str = "auto"
    """messages | sharegpt | alpaca | prompt_response | auto (each record by its fields)."""
    fields: dict[str, str] = field(default_factory=dict)
    """Our field name -> the dataset's, where they differ (see FORMATS for ours)."""
    max_errors: float = 0.001
    """The share of records that may be malformed (skipped, reported with file:line); past it
    the stage fails."""

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(f"name: {self.name!r}; letters, digits, '_', '.', '-' (it names "
                             "files)")
        if self.format not in ("auto", *FORMATS):
            raise ValueError(f"format: {self.format!r} is not a conversation format; one of auto, "
                             f"{', '.join(FORMATS)}")
        known = set(FORMATS.get(self.format) or set().union(*FORMATS.values()))
        for key in self.fields:
            if key not in known:
                raise ValueError(f"fields.{key}: not a field of the {self.format} format "
                                 f"({', '.join(sorted(known))})")
        if not 0 <= self.max_errors <= 1:
            raise ValueError(f"max_errors: {self.max_errors}, a share in [0, 1]")
        self.source = dict(self.source)
        if self.source.get("kind") not in RECORD_SOURCES:
            raise ValueError(f"source.kind: {self.source.get('kind')!r}; conversations are read "
                             f"from a {', '.join(RECORD_SOURCES)} source")
        if isinstance(self.source.get("paths"), (list, tuple)):  # like recipe source paths
            self.source["paths"] = [os.path.abspath(os.path.expanduser(str(p)))
                                    for p in self.source["paths"]]
        try:
            build_source(self.source)
        except ValueError as e:
            raise ValueError(f"source.{e}") from None
        gone = set(missing_paths(self.source))
        for i, p in enumerate(self.source.get("paths") or []):
            if p in gone:
                raise ValueError(f"source.paths[{i}]: {p} does not exist")
        problem = first_record_problem(self, local_only=True)
        if problem:
            raise ValueError(f"format: {problem}")


def field_map(fmt: str, fields: dict[str, str]) -> dict[str, str]:
    return {**FORMATS[fmt], **{k: v for k, v in fields.items() if k in FORMATS[fmt]}}


def detect_format(record: dict, fmt: str, fields: dict[str, str]) -> str | None:
    """The record's format: `fmt` if it has one of its main fields (auto: the first that does)."""
    for name in FORMATS if fmt == "auto" else (fmt,):
        names = field_map(name, fields)
        if any(names[k] in record for k in MAIN_FIELDS[name]):
            return name
    return None


def first_record_problem(cfg: ConversationsConfig, local_only: bool = False) -> str | None:
    """Why the dataset's first record fits no mapped field (`place: ...`), or None. The recipe
    check reads it where that is cheap (`local_only`: local files); the stage reads any source
    before it does any work."""
    first = next(iter_raw(cfg, local_only=local_only), None)
    if first is None:
        return None if local_only else f"{cfg.name}: the dataset has no records"
    place = first[0].place(first[1])
    try:
        record = parse_payload(first[2])
    except BadRecord as e:
        return f"{place}: {e}"
    if detect_format(record, cfg.format, cfg.fields) is None:
        formats = FORMATS if cfg.format == "auto" else (cfg.format,)
        wanted = sorted({field_map(f, cfg.fields)[k] for f in formats for k in MAIN_FIELDS[f]})
        return (f"{place} has none of the fields of format {cfg.format} ({', '.join(wanted)}); "
                f"it has {', '.join(map(str, record)) or 'none'} (rename them with `fields:`)")
    return None


# --------------------------------------------------------------------------------------------
# Records -> messages


def parse_payload(payload: Any) -> dict:
    if isinstance(payload, str):
        try:
            payload = json.loads(payload)
        except json.JSONDecodeError as e:
            raise BadRecord(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(payload, dict):
        raise BadRecord(f"a record is a JSON object, got {type(payload).__name__}")
    return payload


def to_messages(record: dict, fmt: str, fields: dict[str, str]) -> list[Message]:
    """A record's conversation as our chat messages; raises BadRecord saying what is wrong."""
    found = detect_format(record, fmt, fields)
    if found is None:
        raise BadRecord(f"none of the fields of format {fmt}")
    f = field_map(found, fields)
    system = _text(record.get(f["system"]), f["system"])
    if found in ("messages", "sharegpt"):
        key = f[MAIN_FIELDS[found][0]]
        turns = record.get(key)
        if not isinstance(turns, list) or not turns:
            raise BadRecord(f"{key!r} is not a non-empty list")
        raw = [_turn(t, i, f, key) for i, t in enumerate(turns)]
        tools = record.get(f["tools"])
    elif found == "alpaca":
        user = _text(_required(record, f["instruction"]), f["instruction"])
        extra = _text(record.get(f["input"]), f["input"])
        raw = [("user", user + ("\n\n" + extra if extra else ""), "", None),
               ("assistant", _text(_required(record, f["output"]), f["output"]), "", None)]
        tools = None
    else:
        raw = [("user", _text(_required(record, f["prompt"]), f["prompt"]), "", None),
               ("assistant", _text(_required(record, f["response"]), f["response"]),
                _text(record.get(f["reasoning"]), f["reasoning"]), None)]
        tools = None
    if system:
        raw.insert(0, ("system", system, "", None))
    return _build(raw, tools)


def _required(record: dict, key: str) -> Any:
    if record.get(key) is None:
        raise BadRecord(f"no {key!r} field")
    return record[key]


def _text(value: Any, what: str) -> str:
    """A field's text; OpenAI content parts ([{type: text, text}]) are joined."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        kinds = {p.get("type") for p in value} - {"text"}
        if not kinds:
            return "".join(str(p.get("text", "")) for p in value)
        raise BadRecord(f"{what}: content parts of type {', '.join(map(str, kinds))} (text only)")
    raise BadRecord(f"{what}: expected text, got {type(value).__name__}")


def _turn(t: Any, i: int, f: dict[str, str], key: str) -> tuple[str, str, str, Any]:
    """(role, content, reasoning, tool_calls) of one message or ShareGPT turn."""
    if not isinstance(t, dict):
        raise BadRecord(f"{key}[{i}] is not an object")
    role = ROLES.get(t.get(f["role"]))
    if role is None:
        raise BadRecord(f"{key}[{i}]: unknown role {t.get(f['role'])!r}")
    content = _text(t.get(f["content"]), f"{key}[{i}].{f['content']}")
    reasoning = ""
    if "reasoning" in f:
        reasoning = _text(t.get(f["reasoning"]), f"{key}[{i}].{f['reasoning']}")
    calls = t.get(f["tool_calls"]) if "tool_calls" in f else None
    if role == "tool_call":  # ShareGPT's function_call turn: the call itself, already JSON
        role, content, calls = "assistant", "", [content]
    return role, content, reasoning, calls


def _tool_call_text(call: Any) -> str:
    """Qwen3's rendering of one call: {"name": ..., "arguments": ...} in <tool_call> tags."""
    if isinstance(call, str):
        body = call
    elif isinstance(call, dict):
        fn = call.get("function", call)
        args = fn.get("arguments", {})
        if not isinstance(fn.get("name"), str):
            raise BadRecord("a tool call without a function name")
        body = ('{"name": "' + fn["name"] + '", "arguments": '
                + (args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)) + "}")
    else:
        raise BadRecord(f"a tool call is an object, got {type(call).__name__}")
    return f"<tool_call>\n{body}\n</tool_call>"


def _tools_text(tools: Any) -> str:
    """Qwen3's tools block of the system turn."""
    if not isinstance(tools, list):
        raise BadRecord("tools: expected a list of function definitions")
    listed = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
            f"{listed}\n</tools>\n\nFor each function call, return a json object with function "
            "name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def split_thinking(content: str) -> tuple[str, str]:
    """(reasoning, answer) of an assistant text that opens with a <think> block."""
    if END_THINK not in content:
        if content.lstrip().startswith(THINK):
            raise BadRecord("an unclosed <think> block")
        return "", content
    inner, _, answer = content.partition(END_THINK)
    if THINK not in inner:
        raise BadRecord("</think> without <think>")
    before, _, reasoning = inner.partition(THINK)
    if before.strip():
        raise BadRecord("text before the <think> block")
    return reasoning.strip("\n"), answer.lstrip("\n")


def _build(raw: list[tuple[str, str, str, Any]], tools: Any) -> list[Message]:
    out: list[Message] = []
    if tools:
        block = _tools_text(tools)
        if raw[0][0] == "system":
            raw[0] = ("system", raw[0][1] + "\n\n" + block, "", None)
        else:
            raw.insert(0, ("system", block, "", None))
    for role, content, reasoning, calls in raw:
        if role == "tool":  # consecutive tool results share one user turn, as Qwen3 renders them
            response = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].role == "user" and out[-1].content.endswith("</tool_response>"):
                out[-1].content += "\n" + response
            else:
                out.append(Message("user", response))
            continue
        if role == "assistant":
            if not reasoning:
                reasoning, content = split_thinking(content)
            if calls:
                if not isinstance(calls, list):
                    raise BadRecord("tool_calls: expected a list")
                content += "".join(("\n" if content or i else "") + _tool_call_text(c)
                                   for i, c in enumerate(calls))
            if not content.strip() and not reasoning.strip():
                raise BadRecord(f"assistant turn {len(out)} is empty")
        out.append(Message(role, content, reasoning))
    if not any(m.role == "assistant" for m in out):
        raise BadRecord("no assistant turn (nothing to train on)")
    for m in out:
        for marker in SPECIAL_TOKENS:
            if marker in m.content or marker in m.reasoning:
                raise BadRecord(f"the text holds the chat marker {marker!r}")
    return out


# --------------------------------------------------------------------------------------------
# Reading records


@dataclass(frozen=True)
class Origin:
    """Where records come from; `place(n)` names record n there (a line, a row, an index)."""

    label: str
    style: str = "line"
    """line: label:n | row: label[row n] | index: label[n]"""

    def place(self, n: int) -> str:
        return {"line": f"{self.label}:{n}", "row": f"{self.label}[row {n}]"}.get(
            self.style, f"{self.label}[{n}]")


def input_fingerprint(cfg: ConversationsConfig) -> list:
    """The dataset's files with sizes and mtimes: a changed file voids its finished shards."""
    src = build_source(cfg.source)
    if src.kind == "hf":
        return [src.name, src.config, src.split, src.data_files]
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns]
            for p in source_files(src.paths, src.pattern)]


def iter_raw(cfg: ConversationsConfig,
             local_only: bool = False) -> Iterator[tuple[Origin, int, Any]]:
    """(origin, number, payload) of every record, in order: a jsonl line's text (parsed by the
    worker) or a parquet/hf row's dict. `local_only`: nothing from the hub (validation)."""
    src = build_source(cfg.source)
    records = _RAW[src.kind](src, cfg, local_only)
    if src.max_docs is not None:
        records = (r for r, _ in zip(records, range(src.max_docs)))
    return records


def _raw_jsonl(src, cfg, local_only, paths=None) -> Iterator[tuple[Origin, int, Any]]:
    for path in paths or source_files(src.paths, src.pattern):
        origin = Origin(str(path))
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    yield origin, lineno, line.rstrip("\r\n")


def _raw_parquet(src, cfg, local_only, paths=None) -> Iterator[tuple[Origin, int, Any]]:
    import pyarrow.parquet as pq

    for path in paths or source_files(src.paths, src.pattern):
        origin, row = Origin(str(path), "row"), 0
        pf = pq.ParquetFile(path)
        wanted = {v for fmt in (FORMATS if cfg.format == "auto" else (cfg.format,))
                  for v in field_map(fmt, cfg.fields).values()}
        columns = [c for c in pf.schema_arrow.names if c in wanted] or None
        for batch in pf.iter_batches(batch_size=1024, columns=columns):
            for record in batch.to_pylist():
                yield origin, row, record
                row += 1


def _raw_hf(src, cfg, local_only) -> Iterator[tuple[Origin, int, Any]]:
    if src.name in ("json", "parquet") and src.data_files:  # local files: read them directly
        paths = [Path(p) for p in src.data_files]
        yield from (_raw_jsonl if src.name == "json" else _raw_parquet)(src, cfg, local_only, paths)
        return
    if local_only:
        return
    import datasets

    ds = datasets.load_dataset(src.name, src.config, split=src.split, streaming=True,
                               data_files=src.data_files)
    origin = Origin(f"{src.name}[{src.split}]", "index")
    for i, record in enumerate(ds):
        yield origin, i, record


_RAW = {"jsonl": _raw_jsonl, "parquet": _raw_parquet, "hf": _raw_hf}
