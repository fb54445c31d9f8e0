"""The agentic-RL tools (data_recipes.tools): BM25 scores against rank-bm25, the index cached
once per corpus, deterministic search and budgeted visit, Qwen3 tool-call parsing where every
malformed call becomes an error observation, the system prompt and tool turn exactly as Qwen3's
own chat template renders them, the same tools over MCP (stdio, the mcp package's client), and
bad input named by key."""

from __future__ import annotations

import asyncio
import json
import math
import sys

import numpy as np
import pytest

from data_recipes.tool_corpus import write_tool_corpus
from data_recipes.tools import (ToolCall, ToolsConfig, Toolbox, build_toolbox, parse_tool_calls,
                                tool_response_turn)
from data_recipes.tools_search import Collection, cut_to_budget, load_corpus, tokenize

K1, B = 1.5, 0.75


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("tool_corpus")
    corpus, questions = write_tool_corpus(out, seed=0)
    return corpus, [json.loads(line) for line in questions.read_text().splitlines()], out


@pytest.fixture(scope="module")
def toolbox(corpus):
    return build_toolbox(ToolsConfig(corpus=str(corpus[0])), str(corpus[2] / "index"))


def _queries(questions) -> list[str]:
    common = ["return the value", "string split shell", "town river founded mayor",
              "heap push pop", "json encode decode object", "median mean of data"]
    return [q["question"] for q in questions[:12]] + common


def test_bm25_scores_agree_with_rank_bm25(corpus):
    """bm25s against rank_bm25.BM25Okapi on the same tokens, k1 1.5, b 0.75, every document,
    every query. Okapi's variant is bm25s' atire term-frequency part with Robertson's IDF; with
    epsilon 0 rank_bm25 floors a negative IDF (a word in more than half the documents) at 0 as
    bm25s' robertson IDF does, so the two agree exactly. The tool's own variant is Lucene's
    (bm25s' default): IDF log(1 + (N - n + .5)/(n + .5)), the tf part divided by k1 + 1; it equals
    rank_bm25's scores with only the IDF swapped for Lucene's (n from rank_bm25's own counts)."""
    import bm25s
    from rank_bm25 import BM25Okapi

    path, questions, out = corpus
    docs = load_corpus(path)
    tokens = tokenize([f"{d.title}\n{d.text}" for d in docs])
    # a word in two thirds of the documents: Robertson's IDF is negative there, floored at 0
    common = [t + ["zcommon"] if i % 3 else t for i, t in enumerate(tokens)]
    okapi = bm25s.BM25(k1=K1, b=B, method="atire", idf_method="robertson")
    okapi.index(common, show_progress=False)
    okapi_ref = BM25Okapi(common, k1=K1, b=B, epsilon=0.0)
    ref = BM25Okapi(tokens, k1=K1, b=B, epsilon=0.0)
    tool = Collection(path, out / "index", k1=K1, b=B)  # method="lucene"
    n = len(docs)
    df = {w: sum(w in f for f in ref.doc_freqs) for w in ref.idf}
    ref.idf = {w: math.log(1 + (n - c + 0.5) / (c + 0.5)) / (K1 + 1) for w, c in df.items()}
    okapi_diff = lucene_diff = 0.0
    for query in _queries(questions):
        words = [w for w in tokenize([query])[0] if w in ref.idf]
        assert words, query
        theirs = okapi_ref.get_scores(words + ["zcommon"])
        okapi_diff = max(okapi_diff, np.abs(okapi.get_scores(words + ["zcommon"]) - theirs).max())
        lucene_diff = max(lucene_diff, np.abs(tool.scores(query) - ref.get_scores(words)).max())
        assert tool.scores(query).max() > 0 and theirs.max() > 0
    print(f"BM25 max |score diff| vs rank_bm25: okapi {okapi_diff:.2e}, lucene {lucene_diff:.2e}")
    assert okapi_diff <= 1e-5 and lucene_diff <= 1e-5  # float32 (bm25s) vs float64


def test_index_is_built_once_per_corpus_and_search_is_deterministic(corpus, tmp_path):
    path, questions, _ = corpus
    first = Collection(path, tmp_path)
    again = Collection(path, tmp_path)
    assert first.built and not again.built  # the cached index, loaded
    assert len(list(tmp_path.glob("bm25-*"))) == 1
    for query in _queries(questions):
        assert first.search(query, 5, 80) == again.search(query, 5, 80)
        assert np.array_equal(first.scores(query), again.scores(query))
    changed = tmp_path / "changed.jsonl"
    changed.write_text(path.read_text() + json.dumps({"id": "x", "title": "x", "text": "x"}) + "\n")
    assert Collection(changed, tmp_path).built  # another corpus, another index
    assert len(list(tmp_path.glob("bm25-*"))) == 2
    # ties keep corpus order: two identical documents score alike
    twins = tmp_path / "twins.jsonl"
    twins.write_text("".join(json.dumps({"id": i, "title": "t", "text": "alpha beta"}) + "\n"
                             for i in ("b", "a", "c")))
    assert [h.id for h in Collection(twins, tmp_path).search("alpha", 3, 10)] == ["b", "a", "c"]


def test_search_finds_the_facts_and_visit_respects_its_budget(corpus, toolbox):
    _, questions, _ = corpus
    one_hop = [q for q in questions if q["hops"] == 1]
    found = sum(f"id: {q['doc_ids'][0]}\n" in toolbox.run(ToolCall("search", {"query": q["question"]})).observation
                for q in one_hop)
    print(f"search recall@5 on {len(one_hop)} one-hop questions: {found / len(one_hop):.2f}")
    assert found / len(one_hop) >= 0.9
    two_hop = [q for q in questions if q["hops"] == 2][0]  # hop 2 needs the mayor's name
    town = toolbox.run(ToolCall("visit", {"id": two_hop["doc_ids"][0]})).observation
    mayor = town.split("mayor of ")[1].split(" is ")[1].rstrip(".")
    person = toolbox.run(ToolCall("search", {"query": mayor})).observation
    assert person.startswith(f"[1] id: {two_hop['doc_ids'][1]}\n")
    assert two_hop["answer"] in toolbox.run(ToolCall("visit", {"id": two_hop["doc_ids"][1]})).observation

    text = "alpha beta gamma delta epsilon " * 20
    words = lambda s: len(s.split())  # noqa: E731 - a stand-in tokenizer
    for max_chars, max_tokens in ((None, 7), (50, None), (50, 3), (10_000, 10_000)):
        out, cut = cut_to_budget(text, max_chars, words if max_tokens else None, max_tokens)
        assert text.startswith(out) and cut == (len(out) < len(text))
        if max_chars:
            assert len(out) <= max_chars
        if max_tokens and cut:  # the longest prefix within the budget
            assert words(out) <= max_tokens and (
                len(out) == (max_chars or len(text)) or words(text[:len(out) + 1]) > max_tokens)
    small = build_toolbox(ToolsConfig(corpus=str(corpus[0]), visit_max_chars=40), str(corpus[2] / "index"))
    seen = small.run(ToolCall("visit", {"id": "py:json.dumps"})).observation
    assert "[cut: first 40 of " in seen


@pytest.mark.parametrize("text, expect", [
    ('<tool_call>\n{"name": "search", "arguments": {"query": "heap push"}}\n</tool_call>', "[1] id: py:heapq."),
    ('<tool_call>{"name": "visit", "arguments": "{\\"id\\": \\"py:json.dumps\\"}"}</tool_call>', "id: py:json.dumps\n"),
    ('<tool_call>{"name": "search", "arguments": {"query": "x"}', "Error: <tool_call> is not closed"),
    ("<tool_call>search(query='x')</tool_call>", "Error: the tool call is not valid JSON"),
    ('<tool_call>["search"]</tool_call>', 'Error: the tool call needs {"name"'),
    ('<tool_call>{"arguments": {}}</tool_call>', 'Error: the tool call needs {"name"'),
    ('<tool_call>{"name": "search", "arguments": ["x"]}</tool_call>', "Error: arguments must be a JSON object"),
    ('<tool_call>{"name": "browse", "arguments": {}}</tool_call>', "Error: unknown tool 'browse'; available: search, visit"),
    ('<tool_call>{"name": "search", "arguments": {}}</tool_call>', "Error: bad arguments for search: 'query' is a required property"),
    ('<tool_call>{"name": "search", "arguments": {"query": 3}}</tool_call>', "Error: bad arguments for search: query: 3 is not of type 'string'"),
    ('<tool_call>{"name": "visit", "arguments": {"id": "a", "page": 2}}</tool_call>', "Error: bad arguments for visit: Additional properties"),
    ('<tool_call>{"name": "visit", "arguments": {"id": "nope"}}</tool_call>', "Error: no document with id 'nope'"),
])
def test_tool_calls_parse_and_malformed_ones_become_error_observations(toolbox, text, expect):
    results = toolbox.run_text("<think>\nlet me look\n</think>\n\n" + text)
    assert len(results) == 1 and results[0].observation.startswith(expect), results[0].observation
    assert results[0].ok == (not expect.startswith("Error"))


def test_several_calls_in_a_turn_and_none(toolbox):
    two = ('<tool_call>\n{"name": "search", "arguments": {"query": "a"}}\n</tool_call>\n'
           '<tool_call>\n{"name": "visit", "arguments": {"id": "py:heapq.heappush"}}\n</tool_call>')
    assert [c.name for c in parse_tool_calls(two)] == ["search", "visit"]
    assert [r.ok for r in toolbox.run_text(two)] == [True, True]
    assert parse_tool_calls("The answer is 42.") == []


QWEN3_CHAT_TEMPLATE = r'''{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
'''
"""Qwen3's chat template as published in its tokenizer_config.json (Qwen3-4B), for comparison."""


def test_system_prompt_and_tool_turn_render_as_qwen3s_template(toolbox):
    from transformers.utils.chat_template_utils import render_jinja_template

    from data_recipes.chat import IM_END, IM_START

    system = "Answer with the help of the tools."
    messages = [
        {"role": "system", "content": system}, {"role": "user", "content": "Who founded X?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "search", "arguments": {"query": "X"}}},
            {"type": "function", "function": {"name": "visit", "arguments": {"id": "t:x"}}}]},
        {"role": "tool", "content": "[1] id: t:x"}, {"role": "tool", "content": "id: t:x\nÜ"}]
    rendered = render_jinja_template([messages], tools=toolbox.schemas(),
                                     chat_template=QWEN3_CHAT_TEMPLATE)[0][0]
    ours = (f"{IM_START}system\n{toolbox.system_prompt(system)}{IM_END}\n"
            f"{IM_START}user\nWho founded X?{IM_END}\n"
            f"{IM_START}assistant\n<tool_call>\n" + '{"name": "search", "arguments": {"query": "X"}}'
            "\n</tool_call>\n<tool_call>\n" + '{"name": "visit", "arguments": {"id": "t:x"}}'
            f"\n</tool_call>{IM_END}\n" + tool_response_turn(["[1] id: t:x", "id: t:x\nÜ"]))
    assert rendered == ours
    # what the template writes for the assistant, the parser reads back
    calls = parse_tool_calls(rendered.split(f"{IM_START}assistant\n")[1])
    assert [(c.name, c.arguments) for c in calls] == [("search", {"query": "X"}), ("visit", {"id": "t:x"})]
    no_system = render_jinja_template([messages[1:2]], tools=toolbox.schemas(),
                                      chat_template=QWEN3_CHAT_TEMPLATE)[0][0]
    assert no_system.startswith(f"{IM_START}system\n{toolbox.system_prompt()}{IM_END}\n")


def test_mcp_server_over_stdio_gives_the_in_process_results(corpus, toolbox):
    from mcp import Client, StdioServerParameters

    path, questions, out = corpus
    server = StdioServerParameters(command=sys.executable, cwd=str(out), args=[
        "-m", "data_recipes.tools_mcp", "--corpus", str(path), "--index", str(out / "index")])
    queries = [questions[0]["question"], "json encode", "no such words zzzq"]

    async def session():
        async with Client(server) as client:
            listed = (await client.list_tools()).tools
            searched = [await client.call_tool("search", {"query": q}) for q in queries]
            visited = [await client.call_tool("visit", {"id": i})
                       for i in ("py:json.dumps", questions[2]["doc_ids"][1], "nope")]
            return listed, searched, visited

    listed, searched, visited = asyncio.run(session())
    assert [t.name for t in listed] == list(toolbox.tools)
    for tool in listed:
        ours = toolbox.tools[tool.name]
        assert tool.description == ours.description
        assert tool.input_schema["required"] == ours.parameters["required"]
        assert {k: v["type"] for k, v in tool.input_schema["properties"].items()} == \
            {k: v["type"] for k, v in ours.parameters["properties"].items()}
    calls = [("search", {"query": q}) for q in queries] + [("visit", {"id": i}) for i in (
        "py:json.dumps", questions[2]["doc_ids"][1], "nope")]
    same = errors = 0
    for (name, args), got in zip(calls, searched + visited):
        expect = toolbox.run(ToolCall(name, args))
        assert got.is_error == (not expect.ok)
        text = got.content[0].text  # an error: MCPServer prefixes "Error executing tool <name>: "
        assert text == expect.observation if expect.ok else text.endswith(expect.observation)
        same, errors = same + expect.ok, errors + (not expect.ok)
    print(f"MCP round trip: {len(listed)} tools listed; {same} calls with text identical to the "
          f"in-process tools, {errors} error call(s) flagged isError with the same message")


def test_bad_input_names_the_key(corpus, tmp_path, capsys):
    from data_recipes.tools_mcp import main

    with pytest.raises(ValueError, match=r"^tools\[1\]: 'browse' is not a tool; one of search, visit$"):
        ToolsConfig(corpus=str(corpus[0]), tools=["search", "browse"])
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ValueError, match=rf"^corpus: {missing} does not exist$"):
        ToolsConfig(corpus=str(missing))
    with pytest.raises(ValueError, match=rf"^corpus: {missing} does not exist$"):
        Collection(missing, tmp_path)
    assert main(["--corpus", str(missing), "--index", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: corpus: {missing} does not exist\n"
    bad = tmp_path / "bad.jsonl"
    for text, message in (('{"id": "a", "title": "t", "text": "x"}\n{"id": 1}\n', ":2: needs string fields"),
                          ('{"id": "a", "title": "t", "text": "x"}\n' * 2, ":2: id 'a' appears twice"),
                          ("not json\n", ":1: not JSON")):
        bad.write_text(text)
        with pytest.raises(ValueError, match=rf"^corpus: {bad}{message}"):
            load_corpus(bad)


def test_tool_corpus_is_deterministic_and_its_answers_are_in_the_documents(tmp_path):
    a, qa = write_tool_corpus(tmp_path / "a", seed=3)
    b, qb = write_tool_corpus(tmp_path / "b", seed=3)
    c, _ = write_tool_corpus(tmp_path / "c", seed=4)
    assert a.read_bytes() == b.read_bytes() and qa.read_bytes() == qb.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    docs = {d.id: d for d in load_corpus(a)}
    questions = [json.loads(line) for line in qa.read_text().splitlines()]
    assert {q["hops"] for q in questions} == {1, 2}
    assert sum(i.startswith("py:") for i in docs) >= 30  # the stdlib part
    for q in questions:
        assert all(i in docs for i in q["doc_ids"])
        assert q["answer"] in docs[q["doc_ids"][-1]].text
        assert q["answer"] not in q["question"]
