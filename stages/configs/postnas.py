"""The `postnas` stage's config: Jet-Nemotron's PostNAS (arXiv 2508.15884) on a pretrained model."""

from __future__ import annotations

from dataclasses import dataclass, field

from data_recipes.config_fields import ref
from stages.configs.base import PostTrainingLRConfig, TrainingConfig

POSTNAS_TASKS = ("recall", "loss")
"""What a layout is scored on: `recall` = key-value recall accuracy (data_recipes.recall; greedy
answers, retrieval-heavy), `loss` = next-token loss on held-out windows of `data` (scored as its
negative, so higher is better everywhere)."""


@dataclass(kw_only=True)
class PostNASConfig(TrainingConfig):
    """Each layer's attention paired with a linear block initialised from it (a super-network);
    only the linear blocks train (MLPs, embeddings, norms and the attention frozen), by
    distillation from the frozen original, one sampled path per layer per step; then each layout
    is scored per task and a beam search keeps `keep_full` layers full."""

    kind: str = "postnas"
    init: str = ref()
    """The pretrained full-attention model (pretrain, sft, distill, rl or import stage)."""
    data: str = ref()
    """A prepare stage: windows of its tokens are what the super-network is distilled on."""
    keep_full: int = 2
    """Layers that keep full attention in the chosen layout."""
    beam: int = 2
    """Layouts kept after each round of the search (a round adds one full layer)."""
    tasks: list[str] = field(default_factory=lambda: list(POSTNAS_TASKS))
    steps: int = 100
    global_batch_size: int = 8
    micro_batch_size: int = 4
    lr: PostTrainingLRConfig = field(default_factory=PostTrainingLRConfig)
    linear_probability: float = 0.5
    """Chance that a layer takes its linear path at a training step."""
    temperature: float = 1.0
    """Distillation temperature (forward KL from the original model, per token)."""
    score_samples: int = 64
    """Examples per task a layout is scored on."""
    recall_pairs: int = 6
    """Key-value pairs per recall example."""

    def __post_init__(self):
        for i, task in enumerate(self.tasks):
            if task not in POSTNAS_TASKS:
                raise ValueError(f"tasks[{i}]: {task!r} is not a postnas task; one of "
                                 f"{', '.join(POSTNAS_TASKS)}")
        if not self.tasks:
            raise ValueError(f"tasks: empty; name at least one of {', '.join(POSTNAS_TASKS)}")
        for key in ("keep_full", "beam", "steps", "global_batch_size", "micro_batch_size",
                    "score_samples", "recall_pairs"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: {getattr(self, key)}, must be at least 1")
        if not 0 < self.linear_probability <= 1:
            raise ValueError(f"linear_probability: {self.linear_probability}, must be in (0, 1]")
        if self.temperature <= 0:
            raise ValueError(f"temperature: {self.temperature}, must be positive")

    def check_layers(self, num_layers: int) -> None:
        """keep_full against the model's depth (known once the init model is)."""
        if self.keep_full >= num_layers:
            raise ValueError(f"keep_full: {self.keep_full}, must be below the model's "
                             f"{num_layers} layers (some must become linear)")
