"""Phase-wise Megatron blends: each FG-WSD phase gets its own BlendedMegatronDatasetBuilder blend.

Input: the prepare stage's `manifest.json`:
    {"vocab_size": n, "eod_id": 2, "shards": {source: {"prefix": "/abs/prefix", ...}, ...}}

Data order contract: optimizer step s of phase p reads the phase dataset's samples
[(s - p.start_step) * gbs, (s - p.start_step + 1) * gbs) (gbs: the phase's global batch size),
data-parallel rank r takes the r-th
contiguous slice of that, split into micro-batches in order. A resumed run therefore needs only
the step number, and since each phase has its own blend (seeded by seed + phase index) a changed
mixture can never shift the samples of another phase (the Megatron-LM #457 problem).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Protocol

PAD_ID = 3  # tokenizer convention: unk 0, bos 1, eos (= EOD) 2, pad 3
SPLIT = "98,2,0"  # held-out documents per source for the end-of-phase eval


class Phase(Protocol):
    """What a blend needs of a phase laid out in steps: schedulers.fg_wsd.Phase has it (data_recipes
    and schedulers do not import each other; the pretrain stage hands one to the other)."""

    @property
    def index(self) -> int: ...

    @property
    def name(self) -> str: ...

    @property
    def start_step(self) -> int: ...

    @property
    def steps(self) -> int: ...

    @property
    def seq_length(self) -> int: ...

    @property
    def global_batch_size(self) -> int: ...

    @property
    def mixture(self) -> tuple[tuple[str, float], ...]: ...


@dataclass(frozen=True)
class DataTokenizer:
    """The four things GPTDataset asks of a tokenizer (it never tokenizes)."""

    vocab_size: int
    eod: int
    pad: int = PAD_ID

    @property
    def unique_identifiers(self) -> dict[str, Any]:
        # part of the dataset cache key: a different vocabulary must not reuse cached indices
        return {"class": "DataTokenizer", "vocab_size": self.vocab_size, "eod": self.eod,
                "pad": self.pad}


def build_tokenizer(manifest: dict[str, Any]) -> DataTokenizer:
    return DataTokenizer(vocab_size=int(manifest["vocab_size"]), eod=int(manifest["eod_id"]))


@dataclass
class PhaseData:
    phase: Phase
    train: Any  # a Megatron (Blended)GPT dataset; index i -> {"tokens", "labels", "loss_mask", ...}
    valid: Any


def build_phase_datasets(phase: Phase, manifest: dict[str, Any], *, seed: int, eval_samples: int,
                         cache_dir: str | os.PathLike) -> PhaseData:
    """The train and held-out datasets of one phase (collective when torch.distributed is up:
    rank 0 builds the index caches, the others read them)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    shards = manifest["shards"]
    missing = [s for s, _ in phase.mixture if s not in shards]
    if missing:
        raise ValueError(f"phases[{phase.index}].mixture names {', '.join(missing)}, which the "
                         f"prepare stage did not produce (it has {', '.join(sorted(shards))})")
    prefixes = [shards[s]["prefix"] for s, _ in phase.mixture]
    weights = [float(w) for _, w in phase.mixture]
    config = GPTDatasetConfig(
        random_seed=seed + phase.index,
        sequence_length=phase.seq_length,
        blend=(prefixes, weights),
        split=SPLIT,
        path_to_cache=str(cache_dir),
        tokenizer=build_tokenizer(manifest),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # one causal mask per sequence length is built by the loop
    )
    n_train = phase.steps * phase.global_batch_size
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [n_train, eval_samples, 0], lambda: True, config).build()
    if len(train) < n_train:
        raise ValueError(f"phase {phase.name!r}: built {len(train)} of {n_train} training samples")
    return PhaseData(phase, train, valid)


def step_samples(phase: Phase, step: int) -> range:
    """Phase-local sample indices of optimizer step `step` (all data-parallel ranks together)."""
    start = (step - phase.start_step) * phase.global_batch_size
    return range(start, start + phase.global_batch_size)


def rank_micro_batches(samples: range, dp_rank: int, dp_size: int, micro_batch_size: int) -> list[range]:
    """This data-parallel rank's contiguous share of a step's samples, cut into micro-batches."""
    per_rank = len(samples) // dp_size
    mine = samples[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    return [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
