"""Multi-turn tool rollouts (stages.engine.tool_rollout), checked exactly with a scripted policy
(fixed token ids instead of samples): the trajectory's tokens are the sampled ids with the tool
turns' observations spliced in as Qwen3's template renders them, forced tokens go through the
decoder once each (no re-encoding), malformed calls become error observations, turn and token
limits cut where they should, masks are 0 exactly on observation tokens, rewards add the format
and tool-success terms; on a tiny real model the rollout's log-probs equal the training forward's
(the first update's importance ratio is 1 on a multi-turn batch).
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from data_recipes.chat import (EMPTY_THINK, IM_END, IM_START, SPECIAL_TOKENS, Message,
                               encode_prompt, encode_text)
from data_recipes.prompts import Task
from data_recipes.tools import ToolsConfig, build_toolbox, tool_response_turn
from stages.engine.generate import SamplingConfig
from stages.engine.tool_rollout import ToolLoop, tool_rollouts
from test_distill import STUDENT, inputs, tok  # noqa: F401  (fixtures: a tokenizer, a checkpoint)

VOCAB = 300
VISIT_D1 = '<tool_call>{"name": "visit", "arguments": {"id": "d1"}}</tool_call>'
D1_PAGE = "id: d1\ntitle: Capitals\n\nThe capital of Freedonia is Parisa."


class ByteTokenizer:
    """Bytes 0-255, the chat markers (and optionally `</tool_call>`) as single tokens."""

    def __init__(self, call_end_token: bool = False):
        self.specials = SPECIAL_TOKENS + (["</tool_call>"] if call_end_token else [])
        self.vocab_size, self.eod_id, self.pad_id = VOCAB, 290, 291

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        out, buf = [], bytearray()
        for i in ids:
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode(errors="replace"))
            buf = bytearray()
            out.append(self.specials[i - 256] if i - 256 < len(self.specials) else "")
        return "".join(out) + buf.decode(errors="replace")

    def token_id(self, piece: str) -> int | None:
        return 256 + self.specials.index(piece) if piece in self.specials else None

    def ids(self, text: str) -> list[int]:
        """What a policy writes: the text's bytes, markers (and `</tool_call>`) as one token."""
        out, rest = [], text
        while rest:
            hit = min(((rest.find(s), s) for s in self.specials if s in rest), default=None)
            if hit is None:
                return out + self.encode(rest)
            at, s = hit
            out += self.encode(rest[:at]) + [self.token_id(s)]
            rest = rest[at + len(s):]
        return out


class ScriptedLoop(ToolLoop):
    """Each row writes its script's tokens in order (a fixed policy), whatever the logits."""

    scripts: list[list[int]] = []

    def choose(self, logits, sampling, gen, rows, vocab_size):
        nxt = torch.zeros(logits.shape[0], dtype=torch.long)
        for i in rows:
            nxt[i] = self.scripts[i].pop(0)
        return nxt


class RecordingDecoder:
    """A stand-in for the KV decoder: records what each row is fed, returns flat logits."""

    def __init__(self, b: int):
        self.fed = [[] for _ in range(b)]

    def step(self, tokens):
        for i, row in enumerate(tokens.tolist()):
            self.fed[i] += row
        return torch.zeros(tokens.shape[0], VOCAB)


class NoModel(torch.nn.Module):
    max_sequence_length = 4096

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))


@pytest.fixture
def toolbox(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "d1", "title": "Capitals",
                                  "text": "The capital of Freedonia is Parisa."}) + "\n" +
                      json.dumps({"id": "d2", "title": "Rivers",
                                  "text": "The Ashen river runs north."}) + "\n")
    return build_toolbox(ToolsConfig(corpus=str(corpus)), str(tmp_path / "index"))


def observation_ids(tok, observations: list[str], closed: bool = False) -> list[int]:
    """Qwen3's rendering of a tool turn after the policy's `</tool_call>` (or its <|im_end|>)."""
    return encode_text(tok, ("" if closed else IM_END) + "\n" + tool_response_turn(observations)
                       + f"{IM_START}assistant\n")


def make_loop(tok, toolbox, scripts, **limits) -> ScriptedLoop:
    kw = {"max_turns": 3, "max_tokens": None, "max_turn_tokens": 200} | limits
    loop = ScriptedLoop(toolbox, tok, {tok.eod_id, tok.token_id(IM_END)}, format_weight=0.2,
                        tool_weight=0.2, **kw)
    loop.scripts = [tok.ids(s) for s in scripts]
    return loop


@pytest.mark.parametrize("call_end_token", [False, True])
def test_scripted_rollouts_splice_observations_exactly(toolbox, call_end_token):
    tok = ByteTokenizer(call_end_token)
    answer = f"Answer: Parisa{IM_END}"
    bad_json = '<tool_call>{"name": "visit", "arguments": }</tool_call>'
    unknown = '<tool_call>{"name": "fly", "arguments": {}}</tool_call>'
    unclosed = '<tool_call>{"name": "visit"'
    scripts = [VISIT_D1 + answer,                                   # call, answer
               bad_json + "Answer: x" + IM_END,                     # malformed JSON, answer
               VISIT_D1 + VISIT_D1 + VISIT_D1,                      # over max_turns = 2
               unknown + answer,                                    # unknown tool
               unclosed + IM_END + answer]                          # unclosed call, turn ended
    loop = make_loop(tok, toolbox, scripts, max_turns=2)
    prompts = [encode_prompt(tok, [Message("user", f"Q{i}?")]) for i in range(5)]
    decoder = RecordingDecoder(5)
    trajs = loop.run(NoModel(), prompts, SamplingConfig(), VOCAB, decoder=decoder)

    bad_obs = "Error: the tool call is not valid JSON (Expecting value at char 31)"
    unknown_obs = "Error: unknown tool 'fly'; available: search, visit"
    unclosed_obs = "Error: <tool_call> is not closed by </tool_call>"
    want = [
        (tok.ids(VISIT_D1), observation_ids(tok, [D1_PAGE]), tok.ids(answer)),
        (tok.ids(bad_json), observation_ids(tok, [bad_obs]), tok.ids("Answer: x" + IM_END)),
        (tok.ids(VISIT_D1), observation_ids(tok, [D1_PAGE]), tok.ids(VISIT_D1)),
        (tok.ids(unknown), observation_ids(tok, [unknown_obs]), tok.ids(answer)),
        (tok.ids(unclosed + IM_END), observation_ids(tok, [unclosed_obs], closed=True),
         tok.ids(answer)),
    ]
    for i, (tr, (first, obs, last)) in enumerate(zip(trajs, want)):
        assert tr.tokens == first + obs + last, i
        assert tr.mask == [True] * len(first) + [False] * len(obs) + [True] * len(last), i
        assert tr.observation_tokens == len(obs) and tr.turns == 2 and tr.calls == 1, i
        assert all(math.isnan(x) for x in tr.logps[len(first):len(first) + len(obs)])
        assert tr.last_turn == last and not tr.truncated
        # every token went into the decoder once, in order: the context was never re-encoded
        ids = prompts[i] + tr.tokens
        assert decoder.fed[i][:len(ids) - 1] == ids[:-1]
    assert len(decoder.fed[0]) < max(len(p) for p in prompts) + max(len(t.tokens) for t in trajs)
    assert [t.invalid_calls for t in trajs] == [0, 1, 0, 1, 1]
    assert [t.malformed_calls for t in trajs] == [0, 1, 0, 0, 1]
    assert [t.answered for t in trajs] == [True, True, False, True, True]  # row 2: turn limit
    assert [t.format_ok() for t in trajs] == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert [t.tool_success() for t in trajs] == [1.0, 0.0, 1.0, 0.0, 0.0]


def test_token_budget_and_turn_length_cut_rollouts(toolbox):
    tok = ByteTokenizer()
    prompt = encode_prompt(tok, [Message("user", "Q?")])
    obs = observation_ids(tok, [D1_PAGE])
    call = tok.ids(VISIT_D1)
    # the observation does not fit: the rollout ends after the call, truncated, nothing forced
    loop = make_loop(tok, toolbox, [VISIT_D1 + "Answer: x" + IM_END],
                     max_tokens=len(call) + len(obs) - 1)
    [tr] = loop.run(NoModel(), [prompt], SamplingConfig(), VOCAB, decoder=RecordingDecoder(1))
    assert tr.truncated and tr.tokens == call and tr.calls == 0 and tr.mask == [True] * len(call)
    # it fits exactly, then the budget cuts the answer after one token
    loop = make_loop(tok, toolbox, [VISIT_D1 + "Answer: x" + IM_END],
                     max_tokens=len(call) + len(obs) + 1)
    [tr] = loop.run(NoModel(), [prompt], SamplingConfig(), VOCAB, decoder=RecordingDecoder(1))
    assert tr.truncated and tr.tokens == call + obs + tok.ids("A") and tr.turns == 2
    # a turn longer than max_turn_tokens (grpo.max_new_tokens) is cut
    loop = make_loop(tok, toolbox, ["Answer: a long one" + IM_END], max_turn_tokens=5)
    [tr] = loop.run(NoModel(), [prompt], SamplingConfig(), VOCAB, decoder=RecordingDecoder(1))
    assert tr.truncated and tr.tokens == tok.ids("Answe") and not tr.answered


def test_masks_normaliser_and_rewards_of_a_tool_group(toolbox):
    from data_recipes.rewards import RewardConfig, build_reward
    from stages.engine.losses import grpo_loss
    from stages.rl import make_batch

    tok = ByteTokenizer()
    answer = f"Answer: Parisa{IM_END}"
    scripts = [VISIT_D1 + answer, '<tool_call>{"name": 1}</tool_call>' + answer,
               VISIT_D1 + VISIT_D1 + VISIT_D1 + VISIT_D1, "Answer: Rome" + IM_END]
    loop = make_loop(tok, toolbox, scripts)
    real_run = loop.run
    loop.run = lambda gpt, p, s, v: real_run(gpt, p, s, v, decoder=RecordingDecoder(len(p)))
    policy = SimpleNamespace(
        tools=loop, batch_size=8, progress=None, gen=SimpleNamespace(model=NoModel(), tok=tok),
        final_text=lambda new: tok.decode([t for t in new if t < 256]))
    task = Task("t", "What is the capital of Freedonia?", answer="Parisa")
    g = SimpleNamespace(temperature=1.0, top_p=1.0, max_new_tokens=200)
    reward = build_reward(RewardConfig(kind="qa_substring", format_weight=0.2, tool_weight=0.2))
    ro = tool_rollouts(policy, reward, [task], g, seed=0, n=4)
    # correctness (substring) + 0.2 format (answered, every call parsed) + 0.2 * tool success:
    # right with a good call; right after a call that does not parse; no answer after 3 turns
    # (2 good calls); a wrong answer without calls
    assert ro.rewards == pytest.approx([1.4, 1.0, 0.2, 0.2])
    assert ro.texts[0] == "Answer: Parisa" and ro.texts[2] == ""  # row 2 stopped at max_turns 3
    assert ro.tool_sums == {"tools/turns": 2 + 2 + 3 + 1, "tools/calls": 1 + 1 + 2,
                            "tools/invalid_calls": 1,
                            "tools/observation_tokens": float(sum(m.count(False)
                                                                  for m in ro.masks))}
    rows = [(p, n, True, m) for p, n, m in zip(ro.prompts, ro.new, ro.masks)]
    batch = make_batch(rows, tok.pad_id, "cpu")
    for i, (p, n, _, m) in enumerate(rows):
        pad = batch["mask"].shape[1] - len(p) - len(n) + 1
        assert batch["mask"][i].tolist() == [False] * (len(p) - 1) + m + [False] * pad
        sampled = [t for t, keep in zip(n, m) if keep]
        assert batch["labels"][i][batch["mask"][i]].tolist() == sampled
    # the token-mean normaliser counts trained tokens only: a loss of -A per token sums to -A
    lp = torch.zeros(batch["mask"].shape)
    loss, _ = grpo_loss(lp, lp, torch.ones(4), batch["mask"], aggregation="token")
    assert float(loss) == pytest.approx(-1.0)
    assert int(batch["mask"].sum()) == sum(m.count(True) for m in ro.masks)


def test_max_turns_below_one_is_an_error_naming_the_key():
    from data_recipes.config_fields import hash_view
    from stages.configs.rl import RLSubstageConfig

    with pytest.raises(ValueError, match=r"^max_turns: 0, must be at least 1$"):
        RLSubstageConfig(name="s", max_turns=0)
    with pytest.raises(ValueError, match=r"^max_tokens: 0"):
        RLSubstageConfig(name="s", max_tokens=0)
    # the new fields stay out of the hash of a sub-stage without tools
    assert set(hash_view(RLSubstageConfig(name="s"))) == {"name", "prompts", "reward", "filter",
                                                            "grpo"}


def test_rollout_logps_equal_the_training_forward_on_a_multi_turn_batch(megatron_world, toolbox):
    """The rollout's logits (KV cache, observations forced through it) and the training forward
    over the whole trajectory give the same log-prob to every sampled token: ratio 1, no clip."""
    from stages.engine.losses import grpo_loss
    from stages.rl import forward_logps, make_batch
    from test_generate import MODEL, build

    import dataclasses

    tok = ByteTokenizer()
    model = build(dataclasses.replace(MODEL, seq_length=384), std=0.05)
    answer = f"Answer: Parisa{IM_END}"
    scripts = [VISIT_D1 + answer, "Answer: no" + IM_END,
               '<tool_call>{"name": "search", "arguments": {"query": "Ashen"}}</tool_call>'
               + answer,
               VISIT_D1 + '<tool_call>{"name": "visit", "arguments": {"id": "d2"}}</tool_call>'
               + answer]
    loop = make_loop(tok, toolbox, scripts)
    prompts = [encode_prompt(tok, [Message("user", "Q?" * (i + 1))]) for i in range(4)]
    trajs = loop.run(model, prompts, SamplingConfig(temperature=1.0), VOCAB)
    assert [t.turns for t in trajs] == [2, 1, 2, 3]
    rows = [(p, t.tokens, True, t.mask) for p, t in zip(prompts, trajs)]
    batch = make_batch(rows, tok.pad_id, "cpu")
    with torch.no_grad():
        train_lp = forward_logps(model, batch, VOCAB)[0]
    old = torch.zeros_like(train_lp)
    for i, (p, t) in enumerate(zip(prompts, trajs)):
        at = torch.arange(len(t.tokens))[torch.tensor(t.mask)] + len(p) - 1
        old[i, at] = torch.tensor([x for x, keep in zip(t.logps, t.mask) if keep])
    mask = batch["mask"]
    worst = (old - train_lp)[mask].abs().max().item()
    print(f"max |rollout - training| log-prob over {int(mask.sum())} sampled tokens: {worst:.2e}")
    assert worst <= 1e-4
    _, stats = grpo_loss(train_lp, old, torch.tensor([1.0, -1.0, 0.5, -0.5]), mask)
    assert float(stats["ratio_mean"]) == pytest.approx(1.0, abs=1e-4)
    assert float(stats["clip_frac"]) == 0.0



def tool_rl_spec(out, inputs, corpus_dir):
    """A tool-RL sub-stage (3 steps, a checkpoint after each) over a tiny tool corpus."""
    from dataclasses import asdict

    from data_recipes.prompts import PromptsConfig
    from data_recipes.rewards import RewardConfig
    from data_recipes.tool_corpus import write_tool_corpus
    from stages.configs.base import PostTrainingLRConfig
    from stages.configs.rl import GRPOConfig, PassRateFilterConfig, RLConfig, RLSubstageConfig
    from stages.contract import StageSpec, save_spec

    corpus, questions = write_tool_corpus(corpus_dir, seed=0, n_towns=3)
    sub = RLSubstageConfig(
        name="tools", prompts=PromptsConfig(kind="jsonl", path=str(questions), field="question",
                                            num=4, task="qa_substring"),
        reward=RewardConfig(kind="qa_substring", format_weight=0.2, tool_weight=0.2),
        filter=PassRateFilterConfig(enabled=False), tools=ToolsConfig(corpus=str(corpus)),
        max_turns=3, max_tokens=48,
        grpo=GRPOConfig(steps=3, prompts_per_step=2, group_size=2, micro_batch_size=4,
                        max_new_tokens=16, mask_truncated=False,
                        lr=PostTrainingLRConfig(max=1e-3, min=1e-3)))
    cfg = RLConfig(tokenizer="tok", init="student", substages=[sub], seed=3, thinking="off",
                   model={"seq_length": 1024}, checkpoint_every=1)
    return save_spec(StageSpec(name="rl.tools", kind="rl", config=asdict(cfg),
                               output_dir=str(out),
                               inputs={"tokenizer": inputs["tokenizer"],
                                       "init": inputs["student"]},
                               model=asdict(STUDENT)))


@pytest.fixture(scope="module")
def tool_rl_reference(tmp_path_factory, inputs):  # noqa: F811
    from conftest import finish_job, start_job

    root = tmp_path_factory.mktemp("tool_rl")
    finish_job(start_job("stages.rl", tool_rl_spec(root / "rl", inputs, root / "corpus")))
    return root


@pytest.mark.slow
def test_an_rl_substage_with_tools_runs_and_logs_the_tool_metrics(tool_rl_reference):
    """The stage end to end with `tools`: every rollout goes through the tool loop (the tools
    listed in the system prompt), the BM25 index is cached in the stage dir, the tool metrics and
    the masked share are logged per step. (A random model seldom writes a call: the exact
    multi-turn checks are the scripted ones above.)"""
    from stages.contract import read_json

    out = tool_rl_reference / "rl"
    assert read_json(out / "manifest.json")["final_step"] == 3
    assert (out / "tool_index").is_dir()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    assert len(steps) == 3
    for r in steps:
        print({k: v for k, v in r.items() if k.startswith("tools/") or k == "masked_share"})
        assert r["tools/turns"] >= 1 and 0 <= r["masked_share"] <= 1
        assert {"tools/calls", "tools/invalid_calls", "tools/observation_tokens"} <= set(r)
    rollouts = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 3 * 2 * 2


@pytest.mark.slow
def test_tool_rl_substage_resume_after_sigkill_is_bitwise_identical(tool_rl_reference, inputs,  # noqa: F811
                                                                    tmp_path):
    """SIGKILL after the first checkpoint, rerun: the same parameters, rewards and rollouts as
    the uninterrupted run (tool rollouts are seeded per step; the index is rebuilt or reused)."""
    from conftest import sigkill_at_first_checkpoint_then_rerun
    from stages.contract import read_json

    spec = tool_rl_spec(tmp_path / "rl", inputs, tmp_path / "corpus")
    sigkill_at_first_checkpoint_then_rerun("stages.rl", spec)
    got, want = (read_json(d / "rl" / "manifest.json") for d in (tmp_path, tool_rl_reference))
    assert got["params_sha256"] == want["params_sha256"]
    assert got["final"]["reward/mean"] == want["final"]["reward/mean"]
    rollouts = [(d / "rl" / "rollouts.jsonl").read_text() for d in (tmp_path, tool_rl_reference)]
    assert rollouts[0] == rollouts[1]

def test_qa_eval_reports_accuracy_with_and_without_tools(megatron_world, toolbox, tmp_path,
                                                         monkeypatch):
    """eval with `tools`: the same prompts answered through the tool loop (tools listed in the
    system prompt) and plainly (no tools offered). The with-tools policy is scripted per
    question (visit d1 then the right answer; a wrong answer without a call); the plain answers
    come from a random tiny model (never right)."""
    import dataclasses
    import time

    from data_recipes.prompts import PromptsConfig
    from stages import eval as eval_stage
    from stages.configs.eval import EvalConfig
    from stages.contract import StageSpec
    from stages.engine import generate as generate_module
    from stages.engine import tool_rollout
    from test_generate import MODEL, build

    tok = ByteTokenizer()
    questions = tmp_path / "questions.jsonl"
    questions.write_text(
        json.dumps({"question": "What is the capital of Freedonia?", "answer": "Parisa"}) + "\n"
        + json.dumps({"question": "Which way does the Ashen river run?", "answer": "north"}) + "\n")
    scripts = {"Freedonia": VISIT_D1 + f"Answer: Parisa{IM_END}",
               "Ashen": f"Answer: south{IM_END}"}

    class PerQuestion(ScriptedLoop):
        def run(self, gpt, prompts, sampling, vocab_size, decoder=None):
            texts = [tok.decode(p) for p in prompts]
            assert all("<tools>" in t and '"name": "visit"' in t for t in texts)
            self.scripts = [tok.ids(next(s for q, s in scripts.items() if q in t)) for t in texts]
            return super().run(gpt, prompts, sampling, vocab_size, decoder)

    plain_prompts = []

    def recording_generate(model, prompts, *args):
        plain_prompts.extend(tok.decode(p) for p in prompts)
        return real_generate(model, prompts, *args)

    real_generate = generate_module.generate
    monkeypatch.setattr(tool_rollout, "ToolLoop", PerQuestion)
    monkeypatch.setattr(generate_module, "generate", recording_generate)
    cfg = EvalConfig(tokenizer="tok", init="m", thinking="off", samples=1, k=[1],
                     max_new_tokens=80, batch_size=2, max_turns=3,
                     prompts=PromptsConfig(kind="jsonl", path=str(questions), field="question",
                                           task="qa_substring"),
                     tools=ToolsConfig(corpus=str(tmp_path / "corpus.jsonl")))
    model = build(dataclasses.replace(MODEL, seq_length=1536))
    out = tmp_path / "eval"
    out.mkdir()
    spec = StageSpec(name="eval", kind="eval", config={}, output_dir=str(out), inputs={"init": "m"})
    result = eval_stage.run_tool_qa(spec, cfg, model, tok, time.time())

    assert result["accuracy_with_tools"] == 0.5 and result["accuracy_without_tools"] == 0.0
    assert result["pass_at_1"] == 0.5  # the sampled answers: the same script
    assert result["answered_with_tools"] == 1.0
    assert result["tools/calls"] == 0.5 and result["tools/turns"] == 1.5
    think_off = len(encode_text(tok, EMPTY_THINK))  # thinking off: after the next header too
    assert result["tools/observation_tokens"] == (len(observation_ids(tok, [D1_PAGE]))
                                                  + think_off) / 2
    # the plain answers were asked with no tools offered, once per question
    assert len(plain_prompts) == 2 and not any("<tools>" in p for p in plain_prompts)
    rows = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in rows] == [True, False]
    assert [r["final"] for r in rows] == ["Answer: Parisa", "Answer: south"]
    assert D1_PAGE in rows[0]["with_tools"] and rows[1]["with_tools"] == "Answer: south" + IM_END
    assert not any(r["correct_without_tools"] for r in rows)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged[0]["eval/accuracy_with_tools"] == 0.5


def test_qa_eval_settings_name_the_key(tmp_path):
    from stages.configs.eval import EvalConfig

    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"id": "a", "title": "t", "text": "x"}) + "\n")
    tools = ToolsConfig(corpus=str(corpus))
    with pytest.raises(ValueError, match=r"^max_turns: 0, must be at least 1$"):
        EvalConfig(tokenizer="t", init="m", tools=tools, max_turns=0)
    with pytest.raises(ValueError, match=r"^tools: tool calls need prompt_format chat$"):
        EvalConfig(tokenizer="t", init="m", tools=tools, prompt_format="completion")
    # the new fields stay out of the hash of an eval without tools (its stage is not rerun)
    from data_recipes.config_fields import hash_view

    assert not {"tools", "max_turns", "max_tokens"} & set(hash_view(EvalConfig(tokenizer="t",
                                                                               init="m")))


def test_oracle_trajectories_are_what_the_tool_loop_produces(tmp_path):
    """The SFT warm start (data_recipes.oracles.tool_trajectories) renders, token for token, the
    sequence the tool loop builds when the policy writes the oracle's assistant turns: the same
    system prompt, the same tool results spliced in the same template. Only the `<|im_end|>`
    after a call differs in role: trained in SFT, forced (mask 0) in the rollout."""
    from data_recipes.chat import encode_chat
    from data_recipes.oracles import tool_trajectories
    from data_recipes.tool_corpus import write_tool_corpus

    tok = ByteTokenizer()
    corpus, questions = write_tool_corpus(tmp_path, seed=1, n_towns=4)
    box = build_toolbox(ToolsConfig(corpus=str(corpus), top_k=2, preview_chars=100),
                        str(tmp_path / "index"))
    qs = [json.loads(line) for line in questions.read_text().splitlines()]
    convs = tool_trajectories(qs, box)
    assert [c["calls"] for c in convs] == [1 if q["hops"] == 1 else 3 for q in qs]
    for q, c in zip(qs, convs):  # the answer was shown to the oracle before it answered
        assert q["answer"] in c["messages"][-2]["content"]
        assert c["messages"][-1] == {"role": "assistant", "content": q["answer"]}
    messages = [[Message(**m) for m in c["messages"]] for c in convs]
    loop = make_loop(tok, box, [], max_turns=4, max_turn_tokens=400, thinking="off")
    loop.scripts = [sum((tok.ids(m.content) + ([] if m.content.endswith("</tool_call>")
                                               else [tok.token_id(IM_END)])
                         for m in ms[2:] if m.role == "assistant"), []) for ms in messages]
    prompts = [loop.encode(Task(str(i), q["question"])) for i, q in enumerate(qs)]
    trajs = loop.run(NoModel(), prompts, SamplingConfig(), VOCAB,
                     decoder=RecordingDecoder(len(qs)))
    for ms, p, tr in zip(messages, prompts, trajs):
        ids, mask = encode_chat(tok, ms, "off")
        assert p + tr.tokens == ids[:-1]  # (the rendered conversation ends with a newline)
        assert tr.answered and tr.invalid_calls == 0
        sft = mask[len(p):len(ids) - 1]
        differ = [i for i, (a, b) in enumerate(zip(sft, tr.mask)) if a != b]
        assert all(tr.tokens[i] == tok.token_id(IM_END) and sft[i] and not tr.mask[i]
                   for i in differ) and len(differ) == tr.calls
