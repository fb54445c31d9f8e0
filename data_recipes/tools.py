"""Tools for agentic RL (Jan-nano, arXiv 2506.22760): `search` and `visit` over a local corpus,
in Qwen3's native tool format.

- The registry holds each tool's JSON schema as Qwen3's chat template lists it in the system
  prompt's `<tools>` block (`Toolbox.system_prompt`).
- The policy calls a tool by writing `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`;
  `parse_tool_calls` reads every such call of a turn, `Toolbox.run` executes one and returns the
  observation text. A malformed call (bad JSON, unknown tool, wrong arguments) becomes an
  `Error: ...` observation, never an exception: the rollout goes on and the policy sees why.
- `tool_response_turn` is the user turn that carries the observations back, as Qwen3's template
  renders tool messages.

Deterministic and in-process for training; `python -m data_recipes.tools_mcp` serves the same
tools to an MCP client.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from data_recipes.config_fields import MISSING
from data_recipes.tools_search import Collection, cut_to_budget

TOOL_NAMES = ("search", "visit")

# Qwen3's chat template, the text around the tool signatures (tokenizer_config.json of Qwen3-*)
_TOOLS_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
               "You are provided with function signatures within <tools></tools> XML tags:\n"
               "<tools>")
_TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and "
               "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
               '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


@dataclass(kw_only=True)
class ToolsConfig:
    """The tools a rollout may call and the collection behind them."""

    corpus: str = MISSING
    """A jsonl file of {id, title, text} documents (its BM25 index is cached in the stage dir)."""
    tools: list[str] = field(default_factory=lambda: list(TOOL_NAMES))
    """The tools listed in the system prompt: search | visit."""
    top_k: int = 5
    """search: results per query."""
    preview_chars: int = 200
    """search: characters of each result's preview."""
    visit_max_chars: int = 4000
    """visit: characters of a document shown (a token budget can be given at run time)."""
    k1: float = 1.5
    b: float = 0.75
    """BM25 parameters (Lucene's BM25, bm25s' default variant)."""

    def __post_init__(self):
        import os

        for i, name in enumerate(self.tools):
            if name not in TOOL_NAMES:
                raise ValueError(f"tools[{i}]: {name!r} is not a tool; one of "
                                 f"{', '.join(TOOL_NAMES)}")
        if len(set(self.tools)) != len(self.tools) or not self.tools:
            raise ValueError(f"tools: {self.tools}, must name each tool once (at least one)")
        if self.corpus != MISSING:
            self.corpus = os.path.abspath(os.path.expanduser(self.corpus))
            if not os.path.isfile(self.corpus):
                raise ValueError(f"corpus: {self.corpus} does not exist")
        for key in ("top_k", "preview_chars", "visit_max_chars"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: {getattr(self, key)}, must be at least 1")
        if self.k1 < 0 or not 0 <= self.b <= 1:
            raise ValueError(f"k1/b: {self.k1}/{self.b}; k1 >= 0 and 0 <= b <= 1")


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    """JSON schema of the arguments object."""
    fn: Callable[..., str]

    def schema(self) -> dict[str, Any]:
        """The OpenAI-style function entry Qwen3's template renders with `tojson`."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolCall:
    """One `<tool_call>` of a turn: a call, or why it is not one (`error`)."""

    name: Optional[str] = None
    arguments: dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None


@dataclass(frozen=True)
class ToolResult:
    observation: str
    ok: bool
    """False for a malformed call or a failed tool (the reward's tool-success term reads it)."""
    name: Optional[str] = None


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every `<tool_call>...</tool_call>` in a turn's text, in order (none: an answer turn).
    The body must be a JSON object with a string `name` and an object `arguments` (a JSON string
    holding an object is accepted, as Qwen3's template itself accepts one)."""
    calls = []
    for body in _CALL.findall(text):
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as e:
            calls.append(ToolCall(error=f"the tool call is not valid JSON ({e.msg} at char "
                                        f"{e.pos})"))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            calls.append(ToolCall(error='the tool call needs {"name": <string>, "arguments": '
                                        '<object>}'))
            continue
        args = obj.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        if not isinstance(args, dict):
            calls.append(ToolCall(name=obj["name"], error="arguments must be a JSON object"))
            continue
        calls.append(ToolCall(name=obj["name"], arguments=args))
    if not calls and "<tool_call>" in text:
        calls.append(ToolCall(error="<tool_call> is not closed by </tool_call>"))
    return calls


class Toolbox:
    """The registry: tools by name, their schemas, the system prompt, execution."""

    def __init__(self, tools: list[Tool], collection: Optional[Collection] = None):
        self.tools = {t.name: t for t in tools}
        self.collection = collection

    def schemas(self) -> list[dict[str, Any]]:
        return [t.schema() for t in self.tools.values()]

    def system_prompt(self, system: Optional[str] = None) -> str:
        """The system message's content as Qwen3's chat template renders it with `tools`
        (between `<|im_start|>system\\n` and `<|im_end|>`)."""
        head = f"{system}\n\n" if system else ""
        sigs = "".join("\n" + json.dumps(s, ensure_ascii=False) for s in self.schemas())
        return head + _TOOLS_HEAD + sigs + _TOOLS_TAIL

    def run(self, call: ToolCall) -> ToolResult:
        """The observation of one parsed call; never raises for anything the policy wrote."""
        import jsonschema

        if call.error:
            return ToolResult(f"Error: {call.error}", False, call.name)
        tool = self.tools.get(call.name)
        if tool is None:
            return ToolResult(f"Error: unknown tool {call.name!r}; available: "
                              f"{', '.join(self.tools)}", False, call.name)
        try:
            jsonschema.validate(call.arguments, tool.parameters)
        except jsonschema.ValidationError as e:
            where = ".".join(str(p) for p in e.absolute_path)
            return ToolResult(f"Error: bad arguments for {tool.name}: "
                              f"{where + ': ' if where else ''}{e.message}", False, tool.name)
        try:
            return ToolResult(tool.fn(**call.arguments), True, tool.name)
        except ToolError as e:
            return ToolResult(f"Error: {e}", False, tool.name)

    def run_text(self, turn_text: str) -> list[ToolResult]:
        """parse_tool_calls + run, for each call of a turn."""
        return [self.run(c) for c in parse_tool_calls(turn_text)]


class ToolError(Exception):
    """A tool's own refusal (e.g. an unknown document id): becomes an error observation."""


def tool_response_turn(observations: list[str]) -> str:
    """The user turn carrying a turn's tool results back, as Qwen3's template renders
    consecutive `tool` messages: one <tool_response> block each."""
    from data_recipes.chat import IM_END, IM_START

    body = "".join(f"\n<tool_response>\n{o}\n</tool_response>" for o in observations)
    return f"{IM_START}user{body}{IM_END}\n"


# --- search and visit ------------------------------------------------------------------------

def build_toolbox(cfg: ToolsConfig, index_dir: str,
                  count_tokens: Optional[Callable[[str], int]] = None,
                  visit_max_tokens: Optional[int] = None) -> Toolbox:
    """The configured tools over `cfg.corpus`, its index cached under `index_dir`.
    `count_tokens`/`visit_max_tokens`: visit's budget in the policy's tokens (besides
    `cfg.visit_max_chars`)."""
    collection = Collection(cfg.corpus, index_dir, k1=cfg.k1, b=cfg.b)

    def search(query: str) -> str:
        hits = collection.search(query, cfg.top_k, cfg.preview_chars)
        if not hits:
            return f"No results for {query!r}."
        return "\n\n".join(f"[{i}] id: {h.id}\ntitle: {h.title}\npreview: {h.preview}"
                           for i, h in enumerate(hits, 1))

    def visit(id: str) -> str:  # noqa: A002 - the argument's name in the schema
        doc = collection.get(id)
        if doc is None:
            raise ToolError(f"no document with id {id!r} (use an id from search results)")
        text, cut = cut_to_budget(doc.text, cfg.visit_max_chars, count_tokens, visit_max_tokens)
        note = f"\n[cut: first {len(text)} of {len(doc.text)} characters]" if cut else ""
        return f"id: {doc.id}\ntitle: {doc.title}\n\n{text}{note}"

    tools = {
        "search": Tool("search", "Search the document collection. Returns the best matching "
                       "documents, each with its id, title and a preview.",
                       {"type": "object", "properties": {"query": {
                           "type": "string", "description": "What to search for."}},
                        "required": ["query"], "additionalProperties": False}, search),
        "visit": Tool("visit", "Read a document in full (up to a length limit) by its id from "
                      "search results.",
                      {"type": "object", "properties": {"id": {
                          "type": "string", "description": "The document id."}},
                       "required": ["id"], "additionalProperties": False}, visit),
    }
    return Toolbox([tools[name] for name in cfg.tools], collection)
