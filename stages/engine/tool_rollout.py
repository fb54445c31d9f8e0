"""Multi-turn rollouts with tools (Jan-nano): the policy writes, a tool answers, the policy goes on.

Each row of a batch samples until its turn closes a tool call (`</tool_call>`) or ends
(`<|im_end|>` / end of document). A closed call runs (data_recipes.tools; a malformed one becomes
an `Error: ...` observation) and the observation is written into the row's token buffer as Qwen3's
template renders it: the assistant turn closed, a user turn of `<tool_response>` blocks, the next
assistant header. Those tokens are then *forced*: at their positions the row feeds them instead
of a sample, one position per step beside the rows that sample (as generate() feeds the longer
prompts of a batch), or as one prefill chunk when no row samples. They enter the KV cache
(stages.engine.kv_decode) like any token: the context is never re-encoded. The loop stops a row
after `max_turns` turns, at its token budget, or at `max_turn_tokens` sampled tokens in a turn.

The trajectory keeps the token ids exactly as sampled (nothing is decoded and encoded again); its
mask is 1 on sampled tokens, 0 on forced ones, so GRPO trains only on what the policy wrote, and
the log-prob of every sampled token under the rollout's logits is kept (tests compare it with the
training forward's).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from data_recipes.chat import EMPTY_THINK, IM_END, IM_START, encode_prompt, encode_text
from data_recipes.tools import Toolbox, build_toolbox, parse_tool_calls, tool_response_turn
from stages.engine.generate import SamplingConfig, sample_next

TOOL_CALL, TOOL_CALL_END = "<tool_call>", "</tool_call>"


@dataclass
class Rollouts:
    """One step's samples: prompt ids, new ids (tool rollouts: sampled and forced), the scored
    texts, rewards; tool rollouts add each row's loss mask over `new` and the tool counts."""

    prompts: list[list[int]]
    new: list[list[int]]
    texts: list[str]
    rewards: list[float]
    truncated: list[bool]
    rollout_s: float
    reward_s: float
    masks: Optional[list[list[bool]]] = None
    tool_sums: dict[str, float] = field(default_factory=dict)
    """Sums over this rank's rollouts (turns, calls, invalid calls, observation tokens)."""


@dataclass
class Trajectory:
    tokens: list[int] = field(default_factory=list)
    """After the prompt: sampled and forced (observation) tokens, in order."""
    mask: list[bool] = field(default_factory=list)
    """True where the policy sampled the token (trained), False where it was forced."""
    logps: list[float] = field(default_factory=list)
    """The rollout's log-prob (temperature 1) of each sampled token; nan where forced."""
    last_turn: list[int] = field(default_factory=list)
    turns: int = 0
    calls: int = 0
    invalid_calls: int = 0
    """Calls that gave an error observation (malformed, unknown tool, bad arguments, tool error)."""
    malformed_calls: int = 0
    """Calls that did not parse (bad JSON, no name, unclosed)."""
    observation_tokens: int = 0
    truncated: bool = False
    """Cut by the token budget or the per-turn limit (not by max_turns)."""
    answered: bool = False
    """The last turn is an answer (no tool call) closed by <|im_end|>."""
    ended_in_call: bool = False
    """The last turn is a tool call that was not run (max_turns, or no room for its result):
    there is no answer to score."""

    def format_ok(self) -> float:
        return float(self.answered and self.malformed_calls == 0)

    def tool_success(self) -> float:
        return (self.calls - self.invalid_calls) / self.calls if self.calls else 0.0


class ToolLoop:
    """The multi-turn sampler of one sub-stage: its tools, limits and extra reward terms."""

    def __init__(self, toolbox: Toolbox, tok, stop_ids: set[int], *, max_turns: int,
                 max_tokens: Optional[int], max_turn_tokens: int, thinking: str = "on",
                 format_weight: float = 0.0, tool_weight: float = 0.0):
        self.toolbox, self.tok, self.stop_ids = toolbox, tok, set(stop_ids)
        self.max_turns, self.max_tokens = max_turns, max_tokens
        self.max_turn_tokens = max_turn_tokens
        self.thinking, self.format_weight, self.tool_weight = thinking, format_weight, tool_weight
        self.im_end = tok.token_id(IM_END)
        self.call_end = tok.token_id(TOOL_CALL_END)  # one token in Qwen3's vocabulary

    def encode(self, task) -> list[int]:
        """The task's prompt with the tools listed in its system prompt (Qwen3's `<tools>`)."""
        task = dataclasses.replace(task, system=self.toolbox.system_prompt(task.system))
        return encode_prompt(self.tok, task.chat(), self.thinking)

    def closes_call(self, turn: list[int]) -> bool:
        if self.call_end is not None:
            return turn[-1] == self.call_end
        # a tag of several tokens: it ends within the last few (turns stop at the first one)
        return TOOL_CALL_END in self.tok.decode(turn[-len(TOOL_CALL_END) - 4:])

    def observation(self, turn_text: str, closed: bool) -> tuple[list[int], list]:
        """The forced tokens after a tool-call turn and the tool results."""
        results = self.toolbox.run_text(turn_text)
        text = ("" if closed else IM_END) + "\n" + tool_response_turn(
            [r.observation for r in results]) + f"{IM_START}assistant\n" + (
            EMPTY_THINK if self.thinking == "off" else "")
        return encode_text(self.tok, text), results

    def choose(self, logits: torch.Tensor, sampling: SamplingConfig, gen, rows: list[int],
               vocab_size: int) -> torch.Tensor:
        """Next token of every row [b] (only `rows` are used); a scripted policy overrides it."""
        return sample_next(logits[:, :vocab_size], sampling, gen)

    @torch.no_grad()
    def run(self, gpt, prompts: list[list[int]], sampling: SamplingConfig, vocab_size: int,
            decoder=None) -> list[Trajectory]:
        from stages.engine.kv_decode import KVDecoder

        b, lengths, seq = len(prompts), [len(p) for p in prompts], gpt.max_sequence_length
        if max(lengths) >= seq:
            raise ValueError(f"a prompt of {max(lengths)} tokens leaves no room in the model's "
                             f"seq_length ({seq})")
        budget = self.max_tokens or seq
        total = min(max(lengths) + budget, seq)
        ends = [min(n + budget, total) for n in lengths]
        device = next(gpt.parameters()).device
        tokens = torch.zeros(b, total, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = torch.tensor(p)
        tokens = tokens.to(device)
        was_training = gpt.training
        gpt.eval()
        decoder = decoder or KVDecoder(gpt, b, total)
        gen = torch.Generator(device=device).manual_seed(sampling.seed)
        forced_until, done = list(lengths), [False] * b
        trajs, turns = [Trajectory() for _ in range(b)], [[] for _ in range(b)]
        pos = min(lengths)
        logits = decoder.step(tokens[:, :pos])
        while pos < total:
            active = [i for i in range(b) if not done[i]]
            if not active:
                break
            rows = [i for i in active if pos >= forced_until[i]]
            if not rows:  # every live row is forced here: feed the run of forced tokens at once
                k = min(forced_until[i] for i in active) - pos
                logits = decoder.step(tokens[:, pos:pos + k])
                pos += k
                continue
            nxt = self.choose(logits, sampling, gen, rows, vocab_size).to(device)
            logps = torch.log_softmax(logits[:, :vocab_size].float(), -1).gather(
                -1, nxt[:, None])[:, 0].tolist()
            idx = torch.tensor(rows, device=device)
            tokens[idx, pos] = nxt[idx]
            sampled = nxt.tolist()
            for i in rows:
                forced = self._push(trajs[i], turns[i], sampled[i], logps[i], ends[i] - pos - 1)
                if forced is None:
                    done[i] = True
                elif forced:
                    tokens[i, pos + 1:pos + 1 + len(forced)] = torch.tensor(forced)
                    forced_until[i] = pos + 1 + len(forced)
                    turns[i] = []
            pos += 1
            if pos < total and not all(done):
                logits = decoder.step(tokens[:, pos - 1:pos])
        gpt.train(was_training)
        return trajs

    def _push(self, tr: Trajectory, turn: list[int], t: int, logp: float,
              room: int) -> Optional[list[int]]:
        """Add a sampled token to a row: [] (sample on), forced tokens to feed next (a tool
        turn's observation), or None (the row is done). `room`: positions left after it."""
        tr.tokens.append(t)
        tr.mask.append(True)
        tr.logps.append(logp)
        turn.append(t)
        stopped = t in self.stop_ids
        call_closed = not stopped and self.closes_call(turn)
        if not (stopped or call_closed):
            if len(turn) >= self.max_turn_tokens or room <= 0:
                tr.truncated, tr.last_turn = True, list(turn)
                tr.turns += 1
                return None
            return []
        tr.turns += 1
        tr.last_turn = list(turn)
        text = self.tok.decode([x for x in turn if x not in self.stop_ids])
        if not (call_closed or (t == self.im_end and TOOL_CALL in text)):
            tr.answered = t == self.im_end
            return None
        if tr.turns >= self.max_turns:  # a call in the last turn is not run
            tr.ended_in_call = True
            return None
        forced, results = self.observation(text, closed=t == self.im_end)
        if len(forced) > room:  # the observation does not fit the token budget
            tr.truncated = tr.ended_in_call = True
            return None
        calls = parse_tool_calls(text)
        tr.calls += len(results)
        tr.invalid_calls += sum(not r.ok for r in results)
        tr.malformed_calls += sum(c.error is not None for c in calls)
        tr.observation_tokens += len(forced)
        tr.tokens += forced
        tr.mask += [False] * len(forced)
        tr.logps += [math.nan] * len(forced)
        return forced


def build_tool_loop(sub, cfg, tok, out, stop_ids: set[int]) -> Optional[ToolLoop]:
    """The sub-stage's tool loop (None without `tools`); the BM25 index is cached in `out`."""
    if sub.tools is None:
        return None
    toolbox = build_toolbox(sub.tools, str(out / "tool_index"),
                            count_tokens=lambda s: len(tok.encode(s)))
    return ToolLoop(toolbox, tok, stop_ids, max_turns=sub.max_turns, max_tokens=sub.max_tokens,
                    max_turn_tokens=sub.grpo.max_new_tokens, thinking=cfg.thinking,
                    format_weight=sub.reward.format_weight, tool_weight=sub.reward.tool_weight)


def run_batched(loop: ToolLoop, model, prompts: list[list[int]], sampling: SamplingConfig,
                vocab_size: int, batch_size: int, progress=None) -> list[Trajectory]:
    """`loop.run` over batches of `batch_size` prompts; batch i samples from sampling.seed + i
    (i: its first prompt's index), so a rerun is the same. `progress`, when given, is updated
    to the rows done."""
    trajs: list[Trajectory] = []
    for i in range(0, len(prompts), batch_size):
        s = dataclasses.replace(sampling, seed=sampling.seed + i)
        trajs += loop.run(model, prompts[i:i + batch_size], s, vocab_size)
        if progress is not None:
            progress.update(len(trajs))
    return trajs


def answers(trajs: list[Trajectory], final_text) -> list[str]:
    """What is scored: the last turn's answer text ("" when the rollout ended in a tool call)."""
    return ["" if tr.ended_in_call else final_text(tr.last_turn) for tr in trajs]


def tool_sums(trajs: list[Trajectory]) -> dict[str, float]:
    """tools/<count> summed over the trajectories (turns, calls, invalid calls, observation
    tokens)."""
    return {f"tools/{k}": float(sum(getattr(tr, k) for tr in trajs))
            for k in ("turns", "calls", "invalid_calls", "observation_tokens")}


def tool_rollouts(policy, reward, tasks, g, seed: int, n: int) -> Rollouts:
    """`n` multi-turn rollouts of each task (batch i of the policy seeded seed + i), scored:
    correctness of the last turn's answer + format_weight * format + tool_weight * tool success."""
    loop: ToolLoop = policy.tools
    t0 = time.time()
    prompts = [loop.encode(t) for t in tasks for _ in range(n)]
    sampling = SamplingConfig(g.temperature, g.top_p, g.max_new_tokens, seed)
    trajs = run_batched(loop, policy.gen.model, prompts, sampling, policy.gen.tok.vocab_size,
                        policy.batch_size, policy.progress)
    rollout_s = time.time() - t0
    texts = answers(trajs, policy.final_text)
    t1 = time.time()
    correct = reward.score(tasks, texts, n)
    rewards = [c + loop.format_weight * tr.format_ok() + loop.tool_weight * tr.tool_success()
               for c, tr in zip(correct, trajs)]
    sums = tool_sums(trajs)
    return Rollouts(prompts, [tr.tokens for tr in trajs], texts, rewards,
                    [tr.truncated for tr in trajs], rollout_s, time.time() - t1,
                    masks=[tr.mask for tr in trajs], tool_sums=sums)
