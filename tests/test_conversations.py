"""Conversation datasets: each record format parsed exactly, malformed records named, bad recipes
refused with one line per problem, datasets mixed by weight."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_recipes.chat import Message
from data_recipes.conversations import (BadRecord, ConversationsConfig, iter_raw, parse_payload,
                                        to_messages)
from data_recipes.sft_pack import mixture_pool
from pipeline.cli import main
from pipeline.recipe import RecipeError
from pipeline.validate import load_recipe

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]


def test_openai_messages_keep_thinking_and_tool_turns_in_qwen3_form():
    record = {"tools": TOOLS, "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "2+3 and "}, {"type": "text", "text": "4+5?"}]},
        {"role": "assistant", "content": "<think>\nuse the tool\n</think>\n\nCalling.",
         "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}},
                        {"type": "function", "function": {"name": "add", "arguments": {"a": 4, "b": 5}}}]},
        {"role": "tool", "content": "5"}, {"role": "tool", "content": "9"},
        {"role": "assistant", "content": "5 and 9", "reasoning_content": "both came back"},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "add", "arguments": "{}"}}]},
    ]}
    got = to_messages(record, "messages", {})
    tools = '\n'.join(json.dumps(t) for t in TOOLS)
    assert got[0] == Message("system", (
        "Be brief.\n\n# Tools\n\nYou may call one or more functions to assist with the user query."
        "\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        f"{tools}\n</tools>\n\nFor each function call, return a json object with function name and "
        "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": "
        "<function-name>, \"arguments\": <args-json-object>}\n</tool_call>"))
    assert got[1:] == [
        Message("user", "2+3 and 4+5?"),
        Message("assistant", 'Calling.\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}'
                '\n</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 4, "b": 5}}\n'
                '</tool_call>', "use the tool"),
        Message("user", "<tool_response>\n5\n</tool_response>\n<tool_response>\n9\n</tool_response>"),
        Message("assistant", "5 and 9", "both came back"),
        Message("user", "thanks"),
        Message("assistant", '<tool_call>\n{"name": "add", "arguments": {}}\n</tool_call>'),
    ]


def test_sharegpt_alpaca_prompt_response_and_field_maps():
    share = {"system": "S", "conversations": [
        {"from": "human", "value": "q1"}, {"from": "gpt", "value": "<think>r</think>a1"},
        {"from": "human", "value": "q2"},
        {"from": "function_call", "value": '{"name": "f", "arguments": {}}'},
        {"from": "observation", "value": "out"}, {"from": "gpt", "value": "a2"}]}
    assert to_messages(share, "sharegpt", {}) == [
        Message("system", "S"), Message("user", "q1"), Message("assistant", "a1", "r"),
        Message("user", "q2"),
        Message("assistant", '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'),
        Message("user", "<tool_response>\nout\n</tool_response>"), Message("assistant", "a2")]
    assert to_messages({"instruction": "Sum", "input": "1 2", "output": "3"}, "alpaca", {}) == [
        Message("user", "Sum\n\n1 2"), Message("assistant", "3")]
    assert to_messages({"instruction": "Hi", "input": "", "output": "Hello"}, "auto", {}) == [
        Message("user", "Hi"), Message("assistant", "Hello")]
    assert to_messages({"prompt": "p", "response": "r", "reasoning": "t"}, "prompt_response",
                       {}) == [Message("user", "p"), Message("assistant", "r", "t")]
    renamed = {"question": "p", "answer": "r", "sys": "s"}
    fields = {"prompt": "question", "response": "answer", "system": "sys"}
    assert to_messages(renamed, "prompt_response", fields) == [
        Message("system", "s"), Message("user", "p"), Message("assistant", "r")]
    chat = {"dialog": [{"speaker": "user", "text": "u"}, {"speaker": "assistant", "text": "a"}]}
    assert to_messages(chat, "messages", {"messages": "dialog", "role": "speaker",
                                          "content": "text"}) == [Message("user", "u"),
                                                                  Message("assistant", "a")]
    # auto: each record by the first format whose main field it has
    assert to_messages({"conversations": share["conversations"][:2]}, "auto", {})[1].reasoning == "r"


@pytest.mark.parametrize("record, why", [
    ('{"messages": [', "not valid JSON"),
    ("[1, 2]", "a record is a JSON object"),
    ({"messages": []}, "'messages' is not a non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
     "assistant turn 1 is empty"),
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": "<think>never closed"}]}, "unclosed <think>"),
    ({"messages": [{"role": "user", "content": "a <|im_end|> b"},
                   {"role": "assistant", "content": "x"}]}, "chat marker '<|im_end|>'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]},
                   {"role": "assistant", "content": "x"}]}, "content parts of type image_url"),
    ({"instruction": "q"}, "no 'output' field"),
    ({"text": "plain"}, "none of the fields of format messages"),
])
def test_malformed_records_say_what_is_wrong(record, why):
    with pytest.raises(BadRecord, match=why.replace("|", r"\|").replace("[", r"\[")):
        payload = record if isinstance(record, str) else json.dumps(record)
        to_messages(parse_payload(payload), "messages" if "instruction" not in str(record)
                    else "alpaca", {})


def test_records_stream_with_their_places(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text('{"prompt": "p", "response": "r"}\n\n{"x": 1}\n')
    pq.write_table(pa.table({"prompt": ["p1", "p2"], "response": ["r1", "r2"], "extra": [1, 2]}),
                   tmp_path / "b.parquet")
    cfg = ConversationsConfig(name="d", source={"kind": "jsonl", "paths": [str(tmp_path)]})
    assert [(o.place(n), p) for o, n, p in iter_raw(cfg)] == [
        (f"{tmp_path}/a.jsonl:1", '{"prompt": "p", "response": "r"}'),
        (f"{tmp_path}/a.jsonl:3", '{"x": 1}')]
    cfg = ConversationsConfig(name="d", source={"kind": "parquet", "paths": [str(tmp_path)]},
                              format="prompt_response")
    # only the mapped columns are read
    assert [(o.place(n), p) for o, n, p in iter_raw(cfg)] == [
        (f"{tmp_path}/b.parquet[row 0]", {"prompt": "p1", "response": "r1"}),
        (f"{tmp_path}/b.parquet[row 1]", {"prompt": "p2", "response": "r2"})]


def _recipe(write_recipe, tmp_path, dataset: str) -> str:
    return write_recipe(f"""
        name: t
        workdir: {tmp_path}/wd
        stages:
          tok: {{kind: tokenizer, sources: []}}
          chat:
            kind: sft_tokenize
            tokenizer: tok
            datasets:
              - {{name: good, source: {{kind: jsonl, paths: [{tmp_path}/good.jsonl]}}, format: messages}}
              - {dataset}
          sft: {{kind: sft, tokenizer: tok, data: chat, mix: {{good: 0.5, nosuch: 2}}}}
    """)


def test_bad_input_is_one_line_per_problem_naming_the_key_or_file_line(write_recipe, tmp_path,
                                                                        capsys):
    (tmp_path / "good.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n")
    (tmp_path / "plain.jsonl").write_text('\n{"text": "a document", "id": 3}\n')
    cases = {
        "{name: b, source: {kind: jsonl, paths: [" + f"{tmp_path}/plain.jsonl" + "]}, format: alpaca}":
            ("stages.chat.datasets[1].format", f"{tmp_path}/plain.jsonl:2 has none of the fields "
             "of format alpaca (instruction, output); it has text, id (rename them with `fields:`)"),
        "{name: b, source: {kind: jsonl, paths: [" + f"{tmp_path}/good.jsonl" + "]}, format: chatml}":
            ("stages.chat.datasets[1].format", "'chatml' is not a conversation format; one of "
             "auto, messages, sharegpt, alpaca, prompt_response"),
        "{name: b, source: {kind: parquet, paths: [" + f"{tmp_path}/gone.parquet" + "]}}":
            ("stages.chat.datasets[1].source.paths[0]", f"{tmp_path}/gone.parquet does not exist"),
        "{name: b, source: {kind: text, paths: [" + f"{tmp_path}/good.jsonl" + "]}}":
            ("stages.chat.datasets[1].source.kind", "'text'; conversations are read from a jsonl, "
             "parquet, hf source"),
        "{name: good, source: {kind: jsonl, paths: [" + f"{tmp_path}/good.jsonl" + "]}}":
            ("stages.chat.datasets[1].name", "'good' is used twice"),
    }
    for dataset, (key, message) in cases.items():
        path = _recipe(write_recipe, tmp_path, dataset)
        with pytest.raises(RecipeError) as e:
            load_recipe(path)
        assert dict(e.value.problems) == {key: message}
    # a good recipe: the mix may name only datasets of `data`
    path = _recipe(write_recipe, tmp_path, "{name: b, source: {kind: jsonl, paths: ["
                   f"{tmp_path}/good.jsonl]}}, fields: {{messages: messages}}}}")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert dict(e.value.problems) == {
        "stages.sft.mix.nosuch": "not a dataset of data/more_data (good, b)"}
    # the CLI: one line, exit 2, nothing written
    path = _recipe(write_recipe, tmp_path, "{name: b, source: {kind: jsonl, paths: ["
                   f"{tmp_path}/plain.jsonl]}}, format: messages}}")
    capsys.readouterr()
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == (f"error: stages.chat.datasets[1].format: {tmp_path}/plain.jsonl:2 has none "
                      "of the fields of format messages (messages); it has text, id (rename them "
                      "with `fields:`)")
    assert not (tmp_path / "wd").exists()


def test_mixing_weights_take_whole_copies_and_a_fixed_share():
    sizes, held = [10, 6, 4], np.array([0, 12])
    pool = mixture_pool(sizes, [2.0, 0.5, 0.0], held, seed=3)
    first, second = pool[pool < 10], pool[(pool >= 10) & (pool < 16)]
    assert sorted(first.tolist()) == sorted(list(range(1, 10)) * 2)  # twice, held-out 0 never
    assert len(second) == round(0.5 * 5) and set(second) <= {10, 11, 13, 14, 15}
    assert not (pool >= 16).any()  # weight 0: none
    assert np.array_equal(mixture_pool(sizes, [2.0, 0.5, 0.0], held, seed=3), pool)
    other = mixture_pool(sizes, [2.0, 0.5, 0.0], held, seed=4)
    assert len(other) == len(pool)
    # 1.5: every sample once and a fixed half again
    pool = mixture_pool([100], [1.5], np.array([], np.int64), seed=0)
    counts = np.bincount(pool, minlength=100)
    assert (counts >= 1).all() and (counts == 2).sum() == 50


def test_hf_datasets_stream_records(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    data = tmp_path / "set"
    data.mkdir()
    rows = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}]}
            for i in range(3)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = ConversationsConfig(name="d", source={"kind": "hf", "name": str(data)})
    got = [(o.place(n), to_messages(parse_payload(p), cfg.format, {})) for o, n, p in iter_raw(cfg)]
    assert got == [(f"{data}[train][{i}]", [Message("user", f"q{i}"), Message("assistant", "a")])
                   for i in range(3)]
