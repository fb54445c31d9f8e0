"""Configs of the post-training stages that learn from fixed data: `sft` and `distill` (DPD)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from data_recipes.chat import check_thinking
from data_recipes.config_fields import added, ref, unhashed
from data_recipes.openai_client import TeacherServerConfig, teacher_server_config
from data_recipes.pairs import PairFilterConfig
from data_recipes.prompts import PromptsConfig
from stages.configs.base import PostTrainingLRConfig, TrainingConfig


@dataclass(kw_only=True)
class SFTConfig(TrainingConfig):
    """Supervised fine-tuning on chat samples: loss on assistant tokens, packed sequences, epochs."""

    kind: str = "sft"
    data: str = ref()
    """What is trained on: an sft_tokenize stage (conversation datasets) or an sft_data stage
    (refined samples), read from the SFT store they write (token ids + loss mask), memory-mapped."""
    more_data: Optional[str] = field(default=None, metadata={"ref": True, "added": True})
    """A second sft_tokenize or sft_data stage trained on together with `data` (see `mix`)."""
    mix: dict[str, float] = added(factory=dict)
    """Dataset -> weight (Tulu-style: each sample of it is taken floor(w) times per epoch plus a
    fixed share w - floor(w) of them; absent: 1). A dataset is an sft_tokenize stage's dataset
    name or an sft_data stage's name."""
    init: Optional[str] = ref(None)
    """The stage whose latest checkpoint is the starting point (its architecture is used)."""
    epochs: int = 2
    global_batch_size: int = 8
    """Packed sequences per optimizer step."""
    micro_batch_size: int = 4
    packing: bool = True
    """Several samples per sequence, attention blocked between them; off: one sample per sequence."""
    lr: PostTrainingLRConfig = field(default_factory=PostTrainingLRConfig)
    heldout_samples: int = 16
    """Samples kept out of training; their loss is measured after every epoch."""
    thinking: str = added("on")
    """on: assistant turns keep their thinking block | off: Qwen3's empty think block closes every
    assistant header and only answers are trained (data_recipes.chat)."""

    def __post_init__(self):
        check_thinking(self.thinking)
        for name, weight in self.mix.items():
            if not 0 <= weight <= 1000:  # copies of each sample per epoch
                raise ValueError(f"mix.{name}: {weight}, a weight is from 0 to 1000")


@dataclass
class DistillLossConfig:
    """The three DPD terms and their weights. The paper publishes none of these values; ours are
    chosen on the tiny task (see the README's DPD section and bench/distill.py)."""

    dpo_weight: float = 1.0
    """Sequence-level DPO (sigmoid) between the teacher's positive and the student's negative."""
    positive_weight: float = 1.0
    """Token-level distillation toward the teacher on the positive's tokens."""
    negative_weight: float = 1.0
    """Token-level distillation toward the teacher on the student's own negative tokens."""
    dpo_beta: float = 0.1
    """DPO's beta (the strength of the implicit KL to the reference: the frozen initial student)."""
    length_normalize: bool = False
    """DPO on mean instead of summed response log-probs (no preference for short answers)."""
    divergence: str = "forward_kl"
    """forward_kl (KL(teacher || student), mode covering) | reverse_kl (KL(student || teacher),
    mode seeking) | jsd (generalised Jensen-Shannon with `jsd_beta`, as in GKD)."""
    jsd_beta: float = 0.5
    """jsd: the mixture weight of the teacher; 0 = forward KL, 1 = reverse KL."""
    temperature: float = 1.0
    """Both models' logits are divided by it before the divergence."""
    teacher_topk: int = 0
    """0: teacher logits computed online by the teacher held in the job. k > 0: the teacher's
    top-k logits of every training token are written once before training (8 bytes per token per
    k) and the teacher is freed; the divergence is then taken on the teacher's top-k support."""

    def __post_init__(self):
        if self.divergence not in ("forward_kl", "reverse_kl", "jsd"):
            raise ValueError(f"divergence: {self.divergence!r}; one of forward_kl, reverse_kl, jsd")
        if not 0 <= self.jsd_beta <= 1:
            raise ValueError(f"jsd_beta: {self.jsd_beta}, must be in [0, 1]")
        if self.temperature <= 0:
            raise ValueError(f"temperature: {self.temperature}, must be positive")
        if self.teacher_topk < 0:
            raise ValueError(f"teacher_topk: {self.teacher_topk}, must be 0 or more")
        for key in ("dpo_weight", "positive_weight", "negative_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: {getattr(self, key)}, must be 0 or more")
        if self.dpo_weight + self.positive_weight + self.negative_weight == 0:
            raise ValueError("dpo_weight: 0, and so are positive_weight and negative_weight: "
                             "nothing to train")


@dataclass(kw_only=True)
class DistillConfig(TrainingConfig):
    """Dual Preference Distillation: teacher positives vs student negatives, DPO + token-level KD.

    `tokenizer` is the student's tokenizer stage; `model` overrides the student's model."""

    kind: str = "distill"
    student: str = ref()
    """The stage whose latest checkpoint is the student (its architecture is used)."""
    teacher: Any = ref()
    """The stage whose latest checkpoint is the teacher (any size, same tokenizer), or a teacher
    behind an OpenAI-compatible server, `{kind: http, url, model, top_k}`
    (data_recipes.openai_client): it samples the positives and returns its top-k log-probs of
    every training token, and the divergence is taken on that top-k support."""
    teacher_tokenizer: Optional[str] = ref(None)
    """The teacher's tokenizer stage when it is not `tokenizer`; the two must be identical (checked
    before any work). None: the teacher uses `tokenizer`."""
    teacher_model: Optional[dict[str, Any]] = None
    """Overrides of the teacher's model."""
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    teacher_samples: int = 4
    """Answers the teacher samples per prompt; the best-scored one is the positive."""
    student_samples: int = 4
    """Answers the student samples per prompt; the worst-scored one is the negative."""
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 96
    filter: PairFilterConfig = field(default_factory=PairFilterConfig)
    loss: DistillLossConfig = field(default_factory=DistillLossConfig)
    epochs: int = 2
    global_batch_size: int = 8
    """Pairs per optimizer step."""
    micro_batch_size: int = 4
    lr: PostTrainingLRConfig = field(
        default_factory=lambda: PostTrainingLRConfig(max=2e-4, min=2e-6, warmup_steps=2))
    heldout_pairs: int = 8
    """Pairs kept out of training; teacher-student KL and DPO accuracy on them after each epoch."""
    sample_batch_size: int = unhashed(32)
    """Prompts per generate() call while sampling pairs."""
    shard_size: int = unhashed(64)
    """Prompts per unit of pair sampling; finished shards are saved, a restart redoes the rest."""

    def __post_init__(self):
        for key in ("teacher_samples", "student_samples", "epochs", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: {getattr(self, key)}, must be at least 1")
        if isinstance(self.teacher, dict):
            try:
                self.teacher = teacher_server_config(self.teacher)
            except ValueError as e:
                raise ValueError(f"teacher.{e}") from None
        if isinstance(self.teacher, TeacherServerConfig):
            for key in ("teacher_tokenizer", "teacher_model"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key}: not used with an http teacher (the server's "
                                     "tokenizer is checked against the student's; leave it unset)")
            if self.loss.teacher_topk not in (0, self.teacher.top_k):
                raise ValueError(f"loss.teacher_topk: {self.loss.teacher_topk}; with an http "
                                 f"teacher the support is its top_k ({self.teacher.top_k})")
        elif not isinstance(self.teacher, str):
            raise ValueError(f"teacher: {self.teacher!r}; a stage name or "
                             "{kind: http, url, model, top_k}")
