"""Batched sampling from the engine's GPTModel with a KV cache.

Prompts are left-padded to the longest one and the whole batch is prefilled in one forward
(stages.engine.kv_decode: per-row RoPE positions, padding masked), then every row takes one new
token per step. Sampling: greedy (temperature 0) or temperature + top-p, from a seeded generator,
so a batch is reproducible.

The steps run through stages.engine.kv_decode (the model's own weights, a compact cache sized to
the batch's longest sequence; why, measured, in its docstring). A model that path does not cover
(kv_decode.unsupported_reason) runs through megatron's StaticInferenceContext, as before: it has
one RoPE position per step for the whole batch, so there the prompts are left-aligned, prefilled
up to the shortest one, and a longer prompt is fed its own tokens one step at a time (megatron's
static-batching text generator does the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from data_recipes.generators import Generator
from stages.engine.model import unwrap


@dataclass
class SamplingConfig:
    temperature: float = 0.0
    """0 = greedy."""
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator) -> torch.Tensor:
    """Next token ids [b] from last-position logits [b, vocab]."""
    if cfg.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / cfg.temperature, -1)
    if cfg.top_p < 1.0:  # nucleus: keep the smallest set of tokens whose mass reaches top_p
        sorted_p, order = probs.sort(-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > cfg.top_p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate(model, prompts: list[list[int]], cfg: SamplingConfig, stop_ids: set[int],
             vocab_size: int) -> list[list[int]]:
    """The new tokens of each prompt (ending with a stop token when one was sampled).

    `vocab_size` is the tokenizer's: the padded embedding rows beyond it are never sampled.
    """
    from stages.engine.kv_decode import KVDecoder, unsupported_reason

    gpt = unwrap(model)
    was_training = gpt.training
    gpt.eval()
    device = next(gpt.parameters()).device
    b = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts])
    if lengths.min() < 1:
        raise ValueError("every prompt needs at least one token")
    longest = int(lengths.max())
    total = longest + cfg.max_new_tokens
    if total > gpt.max_sequence_length:
        raise ValueError(f"the longest prompt ({longest} tokens) + max_new_tokens "
                         f"({cfg.max_new_tokens}) exceeds the model's seq_length "
                         f"({gpt.max_sequence_length})")
    fast = unsupported_reason(gpt) is None
    # where each row's prompt starts and ends in the token buffer
    starts = longest - lengths if fast else torch.zeros_like(lengths)
    tokens = torch.zeros(b, total, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, int(starts[i]):int(starts[i]) + len(p)] = torch.tensor(p)
    tokens = tokens.to(device)
    prompt_ends = (starts + lengths).to(device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    step = (KVDecoder(gpt, b, total, left_pad=starts).step if fast
            else _megatron_static_step(gpt, b, total))
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    ends = prompt_ends + cfg.max_new_tokens
    first, forced_until = int(prompt_ends.min()), int(prompt_ends.max())
    logits = step(tokens[:, :first])
    for pos in range(first, total):
        nxt = sample_next(logits[:, :vocab_size], cfg, gen)
        if pos < forced_until:  # rows still in their prompt (megatron's path) feed it
            nxt = torch.where(pos < prompt_ends, tokens[:, pos], nxt)
        tokens[:, pos] = nxt
        if len(stop_ids):
            done |= torch.isin(nxt, stop) & (pos >= prompt_ends) | (pos + 1 >= ends)
            if bool(done.all()):
                break
        if pos + 1 < total:
            logits = step(tokens[:, pos:pos + 1])
    gpt.train(was_training)
    out = []
    for i in range(b):
        end = int(prompt_ends[i])
        new = tokens[i, end:end + cfg.max_new_tokens].tolist()
        for j, t in enumerate(new):
            if t in stop_ids:
                new = new[:j + 1]
                break
        out.append(new)
    return out


def _megatron_static_step(gpt, batch: int, total: int):
    """KVDecoder.step's contract over megatron's StaticInferenceContext."""
    from megatron.core.inference.contexts import StaticInferenceContext

    ctx = StaticInferenceContext(batch, total)

    def step(chunk: torch.Tensor) -> torch.Tensor:
        n, start = chunk.shape[1], ctx.sequence_len_offset
        positions = torch.arange(start, start + n, device=chunk.device).expand(batch, -1)
        mask = None
        if chunk.device.type == "cpu":  # megatron's default mask is built on cuda (notes #4)
            mask = torch.triu(torch.ones(1, 1, n, n, dtype=torch.bool), diagonal=1)
        logits = gpt(chunk, positions, mask, inference_context=ctx, runtime_gather_output=True)
        ctx.sequence_len_offset += n
        return logits[:, -1]

    return step


def cut_at_stop(text: str, stop: list[str]) -> str:
    """`text` up to the first stop string (exclusive)."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[:min(cuts)] if cuts else text


def load_checkpoint_model(stage_dir: str, model_cfg, vocab_size: int):
    """A GPTModel of `model_cfg` with the latest checkpoint of `stage_dir` loaded, in eval mode."""
    from stages.engine.checkpoint import load_model_weights_only
    from stages.engine.model import build_model

    model = build_model(model_cfg, vocab_size, model_cfg.seq_length)
    load_model_weights_only(stage_dir, model)
    return model.eval()


class EngineGenerator(Generator):
    """The generator interface (data_recipes.generators) over a pipeline checkpoint.

    `chat` prompts use our chat template and stop at `<|im_end|>`; `completion` prompts fill
    `completion_template` with the last user message (a base model continues a document).
    `cfg` is a GeneratorConfig; for `encode`, `stop_ids` and `decode` any PromptFormat will do
    (RL's policy samples through them). `progress` (stages.engine.progress), when given, advances
    by the prompts of every finished batch.
    """

    def __init__(self, model, tokenizer, cfg, progress=None):
        from data_recipes.chat import IM_END

        self.model, self.tok, self.cfg, self.progress = model, tokenizer, cfg, progress
        self.stop_ids = {tokenizer.eod_id}
        if cfg.prompt_format == "chat":
            self.stop_ids.add(tokenizer.token_id(IM_END))
        self.tokens_generated = 0

    def encode(self, chat) -> list[int]:
        from data_recipes.chat import encode_prompt, encode_text

        if self.cfg.prompt_format == "chat":
            return encode_prompt(self.tok, chat, getattr(self.cfg, "thinking", "on"))
        return encode_text(self.tok, self.cfg.completion_template.format(prompt=chat[-1].content))

    def complete(self, chats) -> list[str]:
        c = self.cfg
        sampling = SamplingConfig(temperature=c.temperature, top_p=c.top_p,
                                  max_new_tokens=c.max_tokens, seed=c.seed)
        out = []
        for i in range(0, len(chats), c.batch_size):
            prompts = [self.encode(chat) for chat in chats[i:i + c.batch_size]]
            for new in generate(self.model, prompts, sampling, self.stop_ids, self.tok.vocab_size):
                self.tokens_generated += len(new)
                out.append(self.decode(new))
            if self.progress is not None:
                self.progress.advance(len(prompts))
        return out

    def decode(self, new: list[int]) -> str:
        """The text of sampled tokens: stop tokens dropped, cut at the first stop string."""
        return cut_at_stop(self.tok.decode([t for t in new if t not in self.stop_ids]),
                           list(self.cfg.stop))

