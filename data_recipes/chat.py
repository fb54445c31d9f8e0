"""The chat format: system/user/assistant turns with ChatML markers and a thinking block.

    <|im_start|>system\n{system}<|im_end|>\n
    <|im_start|>user\n{prompt}<|im_end|>\n
    <|im_start|>assistant\n<think>\n{reasoning}\n</think>\n\n{answer}<|im_end|>\n

The four markers are single tokens (the tokenizer stage adds them as user-defined symbols). Every
assistant turn has a thinking block, empty when there is no reasoning (as Qwen3 does), so a
generation prompt always ends with `<|im_start|>assistant\n` and the model writes `<think>` next.

Training targets are the assistant turns from `<think>` through `<|im_end|>` (the model must
learn to stop); system, user, the `<|im_start|>assistant\n` headers and the newline after each
turn are context only.
Text is encoded piece by piece between the markers, so a sequence's tokens are a pure function
of its text, and the loss-mask boundaries fall exactly on marker tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

IM_START, IM_END, THINK, END_THINK = "<|im_start|>", "<|im_end|>", "<think>", "</think>"
SPECIAL_TOKENS = [IM_START, IM_END, THINK, END_THINK]
ROLES = ("system", "user", "assistant")
_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")

# The same format for transformers' `apply_chat_template` (HF export ships it in tokenizer_config).
CHAT_TEMPLATE_JINJA = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' %}"
    "{{ '<think>\\n' + (m.get('reasoning') or '') + '\\n</think>\\n\\n' }}"
    "{% endif %}"
    "{{ m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@dataclass
class Message:
    role: str
    content: str
    reasoning: str = ""
    """The thinking block of an assistant turn (empty: an empty block)."""

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role {self.role!r} is not one of {', '.join(ROLES)}")


def render_turn(m: Message) -> tuple[str, str]:
    """(header, body) of one turn (a newline follows); an assistant turn is trained on its body."""
    header = f"{IM_START}{m.role}\n"
    body = m.content + IM_END
    if m.role == "assistant":
        body = f"{THINK}\n{m.reasoning}\n{END_THINK}\n\n" + body
    return header, body


def render(messages: list[Message], add_generation_prompt: bool = False) -> str:
    text = "".join(h + b + "\n" for h, b in map(render_turn, messages))
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of `text`, markers as their single special tokens, the rest encoded between them."""
    ids: list[int] = []
    for piece in _SPLIT.split(text):
        if not piece:
            continue
        if piece in SPECIAL_TOKENS:
            tid = tokenizer.token_id(piece)
            if tid is None:
                raise ValueError(f"the tokenizer has no {piece!r} token: train it with the chat "
                                 "special tokens (tokenizer stage `special_tokens`)")
            ids.append(tid)
        else:
            ids.extend(tokenizer.encode(piece))
    return ids


def encode_chat(tokenizer, messages: list[Message]) -> tuple[list[int], list[int]]:
    """(token ids, loss mask): the mask is 1 exactly on the assistant bodies' tokens."""
    ids: list[int] = []
    mask: list[int] = []
    for m in messages:
        header, body = render_turn(m)
        for text, trained in ((header, False), (body, m.role == "assistant"), ("\n", False)):
            part = encode_text(tokenizer, text)
            ids.extend(part)
            mask.extend([int(trained)] * len(part))
    return ids, mask


def encode_prompt(tokenizer, messages: list[Message]) -> list[int]:
    """Tokens a model continues from to write the next assistant turn."""
    return encode_text(tokenizer, render(messages, add_generation_prompt=True))


def parse_assistant(text: str) -> Message:
    """An assistant turn back from generated text (up to `<|im_end|>`; a missing close is lenient)."""
    text = text.split(IM_END, 1)[0]
    reasoning = ""
    if text.startswith(THINK):
        inner, closed, rest = text[len(THINK):].partition(END_THINK)
        reasoning = inner.removeprefix("\n").removesuffix("\n")
        text = rest.removeprefix("\n\n") if closed else ""  # cut off while thinking: no answer
    return Message("assistant", text, reasoning)


@dataclass(kw_only=True)
class PromptFormat:
    """How a prompt reaches a model and where its answer is read: the fields of every config that
    samples a model (generators, eval, rl). The final answer of a response is `final_text`."""

    prompt_format: str = "chat"
    """chat (our chat template) | completion (`completion_template`, for a base model)."""
    completion_template: str = "{prompt}"
    stop: list[str] = field(default_factory=list)
    """Text that ends a generation (cut there), besides the end-of-turn / end-of-document tokens."""

    def __post_init__(self):
        if self.prompt_format not in ("chat", "completion"):
            raise ValueError(f"prompt_format: {self.prompt_format!r}; one of chat, completion")


def final_text(text: str, prompt_format: str) -> str:
    """What is scored: a chat answer without its thinking block, or the completion."""
    return parse_assistant(text).content if prompt_format == "chat" else text
