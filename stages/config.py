"""Config dataclasses of the stage kinds: the single source of truth for what a recipe may say.

Torch-free on purpose: the driver (`pipeline/`) validates recipes against these classes without
importing torch or megatron, and the stage jobs rebuild the same classes from their spec.

Fields marked `ref()` name another stage of the recipe; they are the DAG's edges (as in Marin's
executor, nobody writes edges by hand). Fields marked `unhashed()` change how a stage runs but not
what it produces, so they stay out of the stage's content hash.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from data_recipes.chat import SPECIAL_TOKENS as CHAT_SPECIAL_TOKENS

MISSING: Any = "???"  # OmegaConf's marker for a value the recipe must give


def ref(default: Any = MISSING) -> Any:
    """A field that names an upstream stage (an edge of the DAG)."""
    return field(default=default, metadata={"ref": True})


def unhashed(default: Any = None) -> Any:
    """A field that does not change a stage's outputs (logging cadence, process count, ...)."""
    return field(default=default, metadata={"unhashed": True})


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """A stage job's config dataclass back from its spec's dict (nested dataclasses included)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), data))


def ref_fields(cls: type) -> list[str]:
    return [f.name for f in fields(cls) if f.metadata.get("ref")]


def unhashed_fields(cls: type) -> list[str]:
    return [f.name for f in fields(cls) if f.metadata.get("unhashed")]


# --------------------------------------------------------------------------------------------
# Model


@dataclass
class ModelConfig:
    """A Llama-style decoder: RMSNorm, SwiGLU, RoPE, GQA, no biases."""

    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 176
    """SwiGLU inner size (Llama uses ~8/3 of hidden, rounded)."""
    num_attention_heads: int = 4
    num_query_groups: int = 2
    """GQA: number of key/value heads; equal to num_attention_heads for plain MHA."""
    seq_length: int = 128
    rotary_base: float = 10000.0
    tie_embeddings: bool = False
    make_vocab_size_divisible_by: int = 128
    """The tokenizer's vocabulary is padded up to a multiple of this (Megatron's convention)."""
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    head_dim: Optional[int] = None
    """Per-head size (megatron's kv_channels); None = hidden_size / num_attention_heads. Qwen3
    sets it apart (Qwen3-4B: hidden 2560, 32 heads, head_dim 128)."""
    qk_layernorm: bool = False
    """RMSNorm over each query and key head before RoPE (Qwen3)."""
    rope_scaling: Optional[str] = None
    """None | llama3 (Llama 3.x frequency scaling) | linear (position interpolation)."""
    rope_scaling_factor: float = 1.0
    """The factor of `rope_scaling` (ignored when it is None)."""

    def __post_init__(self):
        if self.rope_scaling not in (None, "llama3", "linear"):
            raise ValueError(f"rope_scaling: {self.rope_scaling!r} is not supported; one of "
                             "null, llama3, linear")


@dataclass
class ParallelConfig:
    """Megatron parallelism; data-parallel size = world size / (tensor * pipeline)."""

    tensor: int = 1
    pipeline: int = 1


@dataclass
class LaunchConfig:
    """How a stage job is started. Global in the recipe, overridable per stage.

    The fields after `gpus_per_node` are read by the Slurm launcher only (launch/slurm.py)."""

    kind: str = "local"
    """local (torchrun subprocess on this machine) | slurm (an sbatch job per stage)."""
    nproc_per_node: int = 1
    nodes: int = 1
    gpus_per_node: int = 0
    """0 on CPU; used by `pipeline plan` for the GPU-hours estimate."""
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    cpus_per_node: Optional[int] = None
    """CPUs for torchrun and its workers on each node (sbatch --cpus-per-task; one task a node)."""
    mem: Optional[str] = None
    """Memory per node, sbatch --mem syntax: 512G, 64000M, 0 (all of it)."""
    time: Optional[str] = None
    """Time limit, sbatch --time syntax: minutes, HH:MM:SS, D-HH:MM:SS. A job stopped by it
    resumes from its checkpoint on its next start."""
    signal_grace_s: int = 300
    """Seconds before the time limit that the job is told (SIGUSR1) to checkpoint and requeue
    itself; 0: no warning (a timed-out job is then resubmitted by the driver)."""
    max_resubmits: int = 10
    """How often the driver resubmits a job that ended TIMEOUT / PREEMPTED / NODE_FAIL (Slurm's own
    requeues do not count); then the stage fails."""
    extra_sbatch: list[str] = field(default_factory=list)
    """More sbatch options, one per item: ["--exclusive", "--reservation=big"]."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before the job: module loads, venv activation, exports."""
    srun_args: list[str] = field(default_factory=list)
    """More srun options, e.g. a pyxis container: ["--container-image=nvcr.io#nvidia/pytorch:25.01-py3"]."""
    wrapper: str = ""
    """A prefix of the command each node runs, e.g. `apptainer exec --nv train.sif`."""
    python: Optional[str] = None
    """The interpreter on the compute nodes; default: the driver's (sys.executable)."""
    rdzv_port: int = 29500
    """torchrun's c10d rendezvous port on the job's first node."""
    ray_cluster: bool = False
    """Start a Ray cluster over the job's nodes for the stage to use (launch/ray_on_slurm.py)."""
    ray_port: int = 6379
    """The port of that Ray cluster's head (GCS) on the job's first node."""
    poll_s: float = 10.0
    """Seconds between the driver's squeue/scontrol polls of a job."""

    def __post_init__(self):
        if self.kind not in ("local", "slurm"):
            raise ValueError(f"kind: {self.kind!r} is not a launcher; one of local, slurm")
        for key in ("nodes", "nproc_per_node", "cpus_per_node"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"{key}: must be at least 1, got {getattr(self, key)}")
        for key in ("gpus_per_node", "signal_grace_s", "max_resubmits"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: must be 0 or more, got {getattr(self, key)}")
        if self.poll_s <= 0:
            raise ValueError(f"poll_s: must be positive, got {self.poll_s}")
        if self.time is not None and not re.fullmatch(
                r"(\d+-)?\d+(:\d{1,2}){0,2}|UNLIMITED|INFINITE", str(self.time)):
            raise ValueError(f"time: {self.time!r} is not a Slurm time limit "
                             "(minutes, HH:MM:SS or D-HH:MM:SS)")
        if self.mem is not None and not re.fullmatch(r"\d+[KMGT]?", str(self.mem)):
            raise ValueError(f"mem: {self.mem!r} is not a Slurm memory size (e.g. 512G, 64000M, 0)")
        bad = [o for o in self.extra_sbatch if not o.startswith("-")]
        if bad:
            raise ValueError(f"extra_sbatch: {bad[0]!r} is not an sbatch option (--name=value)")
        bad = [o for o in self.srun_args if not o.startswith("-")]
        if bad:
            raise ValueError(f"srun_args: {bad[0]!r} is not an srun option (--name=value)")


# --------------------------------------------------------------------------------------------
# Stage kinds


@dataclass
class TokenizerConfig:
    """Train a sentencepiece BPE tokenizer (byte fallback) on a sample of sources, or adopt one."""

    kind: str = "tokenizer"
    after: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    """Names of recipe sources to sample the training text from."""
    vocab_size: int = 4096
    sample_bytes: int = 5_000_000
    """At most this many bytes of text are sampled (evenly over the sources) for training."""
    model_file: Optional[str] = None
    """An existing sentencepiece .model to adopt instead of training one."""
    special_tokens: list[str] = field(default_factory=lambda: list(CHAT_SPECIAL_TOKENS))
    """Pieces that are always one token (the chat markers of data_recipes.chat by default)."""
    seed: int = 0
    launcher: Optional[dict[str, Any]] = unhashed()
    """Overrides of the recipe's `launcher` for this stage."""


@dataclass
class PrepareConfig:
    """Tokenize sources into Megatron .bin/.idx shards, one shard set per source."""

    kind: str = "prepare"
    after: list[str] = field(default_factory=list)
    tokenizer: str = ref()
    sources: list[str] = field(default_factory=list)
    docs_per_task: int = unhashed(512)
    """Documents per Ray tokenization task (throughput knob, not an output knob)."""
    launcher: Optional[dict[str, Any]] = unhashed()
    """Overrides of the recipe's `launcher` for this stage."""


@dataclass
class LRConfig:
    """FG-WSD learning rate: linear warmup, constant through all stable phases, then decay."""

    max: float = 3e-3
    min: float = 3e-5
    init: float = 0.0
    warmup_tokens: float = MISSING
    decay_tokens: float = MISSING
    """The last `decay_tokens` of the run decay from max to min."""
    decay_style: str = "minus_sqrt"
    """linear | cosine | exponential | minus_sqrt, exactly as Megatron's WSD defines them."""


@dataclass
class OptimizerConfig:
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass
class PhaseConfig:
    """One FG-WSD phase: a token budget and the data mixture used throughout it."""

    name: str = MISSING
    tokens: float = MISSING
    mixture: dict[str, float] = field(default_factory=dict)
    """Source name (an output of the `data` stage) -> weight; weights sum to 1."""
    seq_length: Optional[int] = None
    """Longer context for this phase (the decay in the paper); default: the model's."""
    rotary_base: Optional[float] = None
    """Larger RoPE base for this phase (ABF); default: the model's."""
    global_batch_size: Optional[int] = None
    """Sequences per step in this phase; default: the stage's."""


@dataclass
class PretrainConfig:
    """FG-WSD pretraining of a GPTModel over phase-wise blended datasets."""

    kind: str = "pretrain"
    after: list[str] = field(default_factory=list)
    tokenizer: str = ref()
    data: str = ref()
    """The prepare stage whose shards the phase mixtures name."""
    init: Optional[str] = ref(None)
    """A stage whose final checkpoint initialises the model (weights only)."""
    model: Optional[dict[str, Any]] = None
    """Overrides of the recipe's `model` for this stage."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    global_batch_size: int = 8
    """Sequences per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int = 4
    lr: LRConfig = field(default_factory=LRConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    phases: list[PhaseConfig] = field(default_factory=list)
    seed: int = 1234
    checkpoint_every: int = unhashed(50)
    """Steps between checkpoints (a checkpoint is also written at each phase end and on preemption)."""
    keep_checkpoints: int = unhashed(2)
    eval_samples: int = 16
    """Held-out sequences scored at the end of every phase."""
    log_every: int = unhashed(5)
    launcher: Optional[dict[str, Any]] = unhashed()
    """Overrides of the recipe's `launcher` for this stage."""


@dataclass
class NoopConfig:
    """A stage that only waits: exercises the DAG, launcher and tracking (tests, benches)."""

    kind: str = "noop"
    after: list[str] = field(default_factory=list)
    input: Optional[str] = ref(None)
    """Any upstream stage (an edge, to build test DAGs)."""
    seconds: float = 0.0
    fail: bool = False
    fail_message: str = "failed on purpose (noop stage with fail: true)"
    launcher: Optional[dict[str, Any]] = unhashed()


@dataclass
class PromptsConfig:
    """A set of prompts: generated arithmetic questions (split train / heldout) or a jsonl file."""

    kind: str = "arithmetic"
    """arithmetic | code (tiny Python function tasks with asserts) | jsonl"""
    num: int = 256
    """At most this many prompts."""
    split: str = "train"
    """arithmetic: train | heldout; the two are disjoint (by a hash of the question)."""
    heldout_fraction: float = 0.1
    seed: int = 0
    max_digits: int = 2
    path: Optional[str] = None
    """jsonl: the file; each line an object with the prompt under `field`."""
    field: str = "prompt"
    answer_field: str = "answer"
    """jsonl: the reference answer (for a math reward), when the lines have one."""

    def __post_init__(self):
        if self.kind not in ("arithmetic", "code", "jsonl"):
            raise ValueError(f"kind: {self.kind!r} is not a prompt set kind; one of arithmetic, "
                             "code, jsonl")
        if self.split not in ("train", "heldout"):
            raise ValueError(f"split: {self.split!r}; one of train, heldout")
        if self.kind == "jsonl":
            import os

            if not self.path:
                raise ValueError("path: a jsonl prompt set needs a path")
            self.path = os.path.abspath(os.path.expanduser(self.path))  # like source paths
            if not os.path.isfile(self.path):
                raise ValueError(f"path: {self.path} does not exist")


@dataclass
class GeneratorConfig:
    """A text generator backend for one role (draft, evaluate, revise, CoT) of `sft_data`."""

    kind: str = "oracle"
    """engine (the checkpoint of the stage's `engine` ref) | http (an OpenAI-compatible
    chat-completions endpoint) | oracle (a programmatic solver/checker for a verifiable task)."""
    task: str = "auto"
    """oracle: the task it solves and checks: arithmetic | code | auto (each prompt by its kind)."""
    error_rate: float = 0.0
    """oracle: the share of its answers it gets wrong on purpose (a stand-in for a fallible teacher)."""
    url: str = ""
    """http: base URL, e.g. http://127.0.0.1:8000/v1"""
    model: str = ""
    """http: the served model name."""
    api_key_env: str = "OPENAI_API_KEY"
    """http: the environment variable holding the API key (sent only when set)."""
    concurrency: int = unhashed(8)
    timeout_s: float = unhashed(60.0)
    max_retries: int = unhashed(4)
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int = 0
    batch_size: int = unhashed(16)
    """engine: prompts per generate() call."""
    prompt_format: str = "chat"
    """engine: chat (our chat template) | completion (`completion_template`, for base models)."""
    completion_template: str = "{prompt}"
    stop: list[str] = field(default_factory=list)
    """Text that ends a generation (cut there), besides the end-of-turn / end-of-document tokens."""

    def __post_init__(self):
        if self.kind not in ("engine", "http", "oracle"):
            raise ValueError(f"kind: {self.kind!r} is not a generator backend; one of engine, http, "
                             "oracle")
        if self.kind == "http" and not self.url:
            raise ValueError("url: the http backend needs the endpoint's base URL")
        if self.prompt_format not in ("chat", "completion"):
            raise ValueError(f"prompt_format: {self.prompt_format!r}; one of chat, completion")


@dataclass
class SFTDataConfig:
    """Deliberative generation refinement + chain-of-thought reconstruction -> SFT samples."""

    kind: str = "sft_data"
    after: list[str] = field(default_factory=list)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    more_prompts: list[PromptsConfig] = field(default_factory=list)
    """Further prompt sets refined alongside `prompts` (e.g. coding tasks next to arithmetic)."""
    engine: Optional[str] = ref(None)
    """The stage whose latest checkpoint backs every `kind: engine` role."""
    tokenizer: Optional[str] = ref(None)
    """The tokenizer of the `engine` checkpoint."""
    drafter: GeneratorConfig = field(default_factory=GeneratorConfig)
    evaluators: list[GeneratorConfig] = field(default_factory=lambda: [GeneratorConfig()])
    """Each scores every checklist item; an item passes only if every evaluator passes it."""
    reviser: GeneratorConfig = field(default_factory=GeneratorConfig)
    cot: GeneratorConfig = field(default_factory=GeneratorConfig)
    max_rounds: int = 3
    """Evaluation rounds per sample (a revision between two rounds); then it is rejected."""
    accept_min_pass: float = 1.0
    """The share of checklist items that must pass for a sample to be accepted."""
    system_prompt: str = ""
    """A system turn for every SFT sample (none when empty)."""
    shard_size: int = unhashed(64)
    """Samples per unit of work (one Ray task when workers > 1); finished samples are saved as
    they finish, so a restart redoes only unfinished ones."""
    workers: int = unhashed(1)
    """Ray tasks working on shards at once (engine backends need 1: the model lives in the job)."""
    launcher: Optional[dict[str, Any]] = unhashed()

    def __post_init__(self):
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds: {self.max_rounds}, must be >= 1")
        if not 0 < self.accept_min_pass <= 1:
            raise ValueError(f"accept_min_pass: {self.accept_min_pass}, must be in (0, 1]")
        if not self.evaluators:
            raise ValueError("evaluators: name at least one evaluator")


@dataclass
class SFTLRConfig:
    max: float = 1e-3
    min: float = 1e-5
    warmup_steps: int = 0
    decay_style: str = "cosine"
    """linear | cosine | exponential | minus_sqrt over the steps after warmup."""


@dataclass
class SFTConfig:
    """Supervised fine-tuning on chat samples: loss on assistant tokens, packed sequences, epochs."""

    kind: str = "sft"
    after: list[str] = field(default_factory=list)
    tokenizer: str = ref()
    data: str = ref()
    """The sft_data stage whose samples are trained on."""
    init: Optional[str] = ref(None)
    """The stage whose latest checkpoint is the starting point (its architecture is used)."""
    model: Optional[dict[str, Any]] = None
    """Overrides of the model (e.g. a longer seq_length than pretraining)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    epochs: int = 2
    global_batch_size: int = 8
    """Packed sequences per optimizer step."""
    micro_batch_size: int = 4
    packing: bool = True
    """Several samples per sequence, attention blocked between them; off: one sample per sequence."""
    lr: SFTLRConfig = field(default_factory=SFTLRConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    heldout_samples: int = 16
    """Samples kept out of training; their loss is measured after every epoch."""
    seed: int = 1234
    checkpoint_every: int = unhashed(50)
    keep_checkpoints: int = unhashed(2)
    log_every: int = unhashed(5)
    launcher: Optional[dict[str, Any]] = unhashed()


@dataclass
class PairFilterConfig:
    """Which sampled (positive, negative) pairs DPD trains on: the positive must clearly win."""

    kind: str = "verifier"
    """verifier (the task's exact checker: 1 right, 0 wrong) | judge (a generator backend rates
    each answer 0-10, scaled to [0, 1]; http, or the arithmetic oracle)."""
    task: str = "arithmetic"
    """verifier: the task whose checker scores answers."""
    judge: GeneratorConfig = field(default_factory=GeneratorConfig)
    """judge: the backend that rates answers."""
    min_margin: float = 1.0
    """Keep a pair when score(positive) - score(negative) >= this (verifier: 1 = right vs wrong)."""

    def __post_init__(self):
        if self.kind not in ("verifier", "judge"):
            raise ValueError(f"kind: {self.kind!r} is not a pair filter; one of verifier, judge")
        if self.kind == "verifier" and self.task != "arithmetic":
            raise ValueError(f"task: {self.task!r} has no verifier; the verifier task is arithmetic")


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
            raise ValueError("dpo_weight, positive_weight, negative_weight: all 0, nothing to train")


@dataclass
class DistillConfig:
    """Dual Preference Distillation: teacher positives vs student negatives, DPO + token-level KD."""

    kind: str = "distill"
    after: list[str] = field(default_factory=list)
    tokenizer: str = ref()
    """The student's tokenizer stage."""
    student: str = ref()
    """The stage whose latest checkpoint is the student (its architecture is used)."""
    teacher: str = ref()
    """The stage whose latest checkpoint is the teacher (any size, same tokenizer)."""
    teacher_tokenizer: Optional[str] = ref(None)
    """The teacher's tokenizer stage when it is not `tokenizer`; the two must be identical (checked
    before any work). None: the teacher uses `tokenizer`."""
    model: Optional[dict[str, Any]] = None
    """Overrides of the student's model."""
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
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    epochs: int = 2
    global_batch_size: int = 8
    """Pairs per optimizer step."""
    micro_batch_size: int = 4
    lr: SFTLRConfig = field(default_factory=lambda: SFTLRConfig(max=2e-4, min=2e-6, warmup_steps=2))
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    heldout_pairs: int = 8
    """Pairs kept out of training; teacher-student KL and DPO accuracy on them after each epoch."""
    seed: int = 1234
    sample_batch_size: int = unhashed(32)
    """Prompts per generate() call while sampling pairs."""
    shard_size: int = unhashed(64)
    """Prompts per unit of pair sampling; finished shards are saved, a restart redoes the rest."""
    checkpoint_every: int = unhashed(50)
    keep_checkpoints: int = unhashed(2)
    log_every: int = unhashed(5)
    launcher: Optional[dict[str, Any]] = unhashed()

    def __post_init__(self):
        for key in ("teacher_samples", "student_samples", "epochs", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: {getattr(self, key)}, must be at least 1")


@dataclass
class EvalConfig:
    """Verifiable benchmark on a checkpoint: exact match (greedy) and pass@k (sampled)."""

    kind: str = "eval"
    after: list[str] = field(default_factory=list)
    tokenizer: str = ref()
    init: str = ref()
    """The stage whose latest checkpoint is evaluated."""
    model: Optional[dict[str, Any]] = None
    prompts: PromptsConfig = field(default_factory=lambda: PromptsConfig(split="heldout", num=64))
    prompt_format: str = "chat"
    """chat (our chat template) | completion (`completion_template`, for a base model)."""
    completion_template: str = "Question: {prompt}\n"
    stop: list[str] = field(default_factory=list)
    """Text that ends a generation (cut there), besides the end-of-turn / end-of-document tokens."""
    max_new_tokens: int = 96
    samples: int = 4
    """Sampled answers per prompt for pass@k (0: greedy only)."""
    k: list[int] = field(default_factory=lambda: [1, 4])
    temperature: float = 0.7
    top_p: float = 0.95
    batch_size: int = unhashed(32)
    seed: int = 0
    launcher: Optional[dict[str, Any]] = unhashed()

    def __post_init__(self):
        if self.prompt_format not in ("chat", "completion"):
            raise ValueError(f"prompt_format: {self.prompt_format!r}; one of chat, completion")
        bad = [k for k in self.k if not 1 <= k <= max(self.samples, 1)]
        if self.samples and bad:
            raise ValueError(f"k: {bad} must be between 1 and samples ({self.samples})")


@dataclass
class RewardConfig:
    """How a sub-stage scores a rollout."""

    kind: str = "math"
    """math (final answer vs the reference, checked in a sandbox) | code (the response's function
    run against the task's public and private asserts in a sandbox) | judge (a pairwise judge
    compares every two samples of a group, both orders; reward = the sample's win rate)."""
    judge: GeneratorConfig = field(default_factory=GeneratorConfig)
    """judge: the backend: engine (the rl stage's `judge` checkpoint), http, or the arithmetic
    oracle (prefers a right answer, then the shorter one: a programmatic stand-in for a
    preference model)."""
    workers: int = unhashed(8)
    """Sandboxes run at once."""

    def __post_init__(self):
        if self.kind not in ("math", "code", "judge"):
            raise ValueError(f"kind: {self.kind!r} is not a reward; one of math, code, judge")


@dataclass
class PassRateFilterConfig:
    """Before a sub-stage trains, keep the prompts the current model solves sometimes, not always."""

    enabled: bool = True
    samples: int = 16
    """Answers sampled per prompt to measure its pass rate."""
    min_pass: float = 0.1
    """Keep prompts with min_pass < pass rate < max_pass (both exclusive)."""
    max_pass: float = 0.9

    def __post_init__(self):
        if not 0 <= self.min_pass < self.max_pass <= 1:
            raise ValueError(f"min_pass, max_pass: {self.min_pass}, {self.max_pass}; need "
                             "0 <= min_pass < max_pass <= 1")
        if self.samples < 1:
            raise ValueError(f"samples: {self.samples}, must be at least 1")


@dataclass
class GRPOConfig:
    """On-policy GRPO: G samples per prompt, group-normalised advantages, clipped ratio."""

    steps: int = 20
    """Rollout batches (each followed by `updates_per_batch` optimizer steps)."""
    prompts_per_step: int = 8
    group_size: int = 8
    """G: samples per prompt."""
    updates_per_batch: int = 1
    """Optimizer steps per rollout batch; > 1 makes the later ones off-policy (ratio != 1)."""
    micro_batch_size: int = 8
    """Sequences per forward/backward."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 96
    eps_low: float = 0.2
    eps_high: float = 0.28
    """Clip-higher (DAPO): the ratio may rise to 1 + eps_high for positive advantages."""
    normalize_std: bool = True
    """Divide advantages by the group's std (off: Dr. GRPO)."""
    aggregation: str = "token"
    """token (every response token of the batch weighs the same) | sequence (mean per sample)."""
    kl_coef: float = 0.0
    """KL to the initial policy (k3 estimator); 0 as in Nanbeige4-3B and DAPO."""
    mask_truncated: bool = True
    """Samples cut at max_new_tokens get no loss (their reward is not about a finished answer)."""
    lr: SFTLRConfig = field(default_factory=lambda: SFTLRConfig(max=1e-5, min=1e-5))
    """Constant by default (min = max); warmup/decay over the optimizer steps when they differ."""

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"group_size: {self.group_size}; GRPO needs at least 2 samples")
        if self.aggregation not in ("token", "sequence"):
            raise ValueError(f"aggregation: {self.aggregation!r}; one of token, sequence")
        for key in ("steps", "prompts_per_step", "updates_per_batch", "micro_batch_size",
                    "max_new_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: {getattr(self, key)}, must be at least 1")


@dataclass
class RLSubstageConfig:
    """One sub-stage of `rl`: its prompts, reward, pass-rate filter and GRPO settings."""

    name: str = MISSING
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    filter: PassRateFilterConfig = field(default_factory=PassRateFilterConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)

    def __post_init__(self):
        if self.name != MISSING and not re.fullmatch(r"[A-Za-z0-9_]+", self.name):
            raise ValueError(f"name: {self.name!r}; letters, digits and _ only (it names a stage)")


@dataclass
class RLConfig:
    """Multi-stage RL: GRPO sub-stages run in order, each its own resumable stage of the DAG.

    The recipe loader turns an `rl` stage with sub-stages [a, b, c] into stages `<name>.a`,
    `<name>.b`, `<name>.c`, each starting from the previous one's checkpoint (a from `init`); a
    reference to `<name>` elsewhere means its last sub-stage."""

    kind: str = "rl"
    after: list[str] = field(default_factory=list)
    tokenizer: str = ref()
    init: str = ref()
    """The checkpoint RL starts from: SFT, distill, or a pretrained base model (Jan-nano style)."""
    judge: Optional[str] = ref(None)
    """A checkpoint stage that plays the judge of `reward.kind: judge` with `judge.kind: engine`."""
    model: Optional[dict[str, Any]] = None
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    prompt_format: str = "chat"
    """chat (our chat template) | completion (`completion_template`, for a base model)."""
    completion_template: str = "Question: {prompt}\n"
    stop: list[str] = field(default_factory=list)
    """Text that ends a rollout, besides the end-of-turn / end-of-document tokens."""
    substages: list[RLSubstageConfig] = field(default_factory=list)
    seed: int = 1234
    rollout_batch_size: int = unhashed(64)
    """Sequences per generate() call."""
    checkpoint_every: int = unhashed(10)
    keep_checkpoints: int = unhashed(2)
    log_every: int = unhashed(1)
    launcher: Optional[dict[str, Any]] = unhashed()

    def __post_init__(self):
        if self.prompt_format not in ("chat", "completion"):
            raise ValueError(f"prompt_format: {self.prompt_format!r}; one of chat, completion")
        names = [s.name for s in self.substages]
        if len(set(names)) != len(names):
            raise ValueError(f"substages: names repeat ({', '.join(names)})")


@dataclass
class ImportConfig:
    """A Hugging Face Llama/Qwen3 model directory as a pipeline checkpoint plus its tokenizer.

    Later stages use it as `init:` (weights) and `tokenizer:`. Their recipe `model:` must describe
    the same architecture: validation reads config.json and names every field that differs."""

    kind: str = "import"
    after: list[str] = field(default_factory=list)
    path: str = MISSING
    """The HF model directory: config.json, *.safetensors (one file or an index), tokenizer.json.
    Its contents are not hashed: put a version in the path (or `revision`) to rerun on a change."""
    revision: str = ""
    """Free text that is part of the stage hash (e.g. the hub commit the directory came from)."""
    eod_token: Optional[str] = None
    """The token that ends each document in `prepare` shards; default: the model's eos_token_id
    (a chat model's eos may be its end-of-turn token, e.g. Qwen3's <|im_end|>)."""
    launcher: Optional[dict[str, Any]] = unhashed()

    def __post_init__(self):
        if self.path != MISSING:  # like source paths: relative to where the recipe is loaded
            import os

            self.path = os.path.abspath(os.path.expanduser(self.path))


@dataclass
class ExportConfig:
    """A stage's latest checkpoint as a Hugging Face directory (safetensors, config.json,
    generation_config.json, tokenizer files with our chat template) for transformers, no custom code."""

    kind: str = "export"
    after: list[str] = field(default_factory=list)
    init: str = ref()
    """The stage whose latest checkpoint is exported (pretrain, sft, import, ...)."""
    tokenizer: str = ref()
    """A tokenizer stage (its sentencepiece model is converted) or an import stage (copied)."""
    model: Optional[dict[str, Any]] = None
    """Overrides of the recipe's `model` for this stage (must match the checkpoint)."""
    dtype: str = "bfloat16"
    """bfloat16 | float16 | float32: the safetensors dtype (conversion itself runs in fp32)."""
    launcher: Optional[dict[str, Any]] = unhashed()

    def __post_init__(self):
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype: {self.dtype!r}; one of bfloat16, float16, float32")


STAGE_KINDS: dict[str, type] = {
    "noop": NoopConfig,
    "tokenizer": TokenizerConfig,
    "prepare": PrepareConfig,
    "pretrain": PretrainConfig,
    "sft_data": SFTDataConfig,
    "sft": SFTConfig,
    "eval": EvalConfig,
    "distill": DistillConfig,
    "rl": RLConfig,
    "import": ImportConfig,
    "export": ExportConfig,
}

_MODULE_OF_KIND = {"import": "hf_import", "export": "hf_export"}  # `import` is a Python keyword


def stage_module(kind: str) -> str:
    """The module a launcher runs for a stage kind (`python -m <module> --spec ...`)."""
    return f"stages.{_MODULE_OF_KIND.get(kind, kind)}"


def checkpoint_model(spec_model: dict[str, Any], upstream_manifest: dict[str, Any],
                     overrides: Optional[dict[str, Any]]) -> ModelConfig:
    """The architecture of a stage that starts from another stage's checkpoint: the one recorded
    in that stage's manifest (e.g. pretraining's last seq length and RoPE base), with this stage's
    own `model:` overrides on top; the recipe's model when the upstream records none."""
    base = upstream_manifest.get("model") or spec_model
    return from_dict(ModelConfig, {**base, **(overrides or {})})


def phase_specs(cfg: PretrainConfig, model: ModelConfig) -> list:
    """The recipe's phases with the model's defaults filled in (for `schedulers.fg_wsd`)."""
    from schedulers.fg_wsd import PhaseSpec

    return [PhaseSpec(p.name, float(p.tokens), dict(p.mixture), p.seq_length or model.seq_length,
                      p.rotary_base or model.rotary_base,
                      p.global_batch_size or cfg.global_batch_size) for p in cfg.phases]


def pretrain_schedule(cfg: PretrainConfig, model: ModelConfig):
    """The FG-WSD schedule (phases in steps, LR) that a pretrain config describes."""
    from schedulers.fg_wsd import build_schedule

    return build_schedule(phase_specs(cfg, model), lr_max=cfg.lr.max,
                          lr_min=cfg.lr.min, lr_init=cfg.lr.init,
                          warmup_tokens=float(cfg.lr.warmup_tokens),
                          decay_tokens=float(cfg.lr.decay_tokens), decay_style=cfg.lr.decay_style)


def padded_vocab_size(vocab_size: int, model: ModelConfig) -> int:
    """Megatron pads the embedding table up to a multiple (for TP splits and fast GEMMs)."""
    multiple = model.make_vocab_size_divisible_by
    return -(-vocab_size // multiple) * multiple


def num_params(model: ModelConfig, vocab_size: int) -> int:
    """Parameters of the Llama-style GPTModel that stages.model builds (analytic, torch-free)."""
    h, layers = model.hidden_size, model.num_layers
    head_dim = model.head_dim or h // model.num_attention_heads
    q = model.num_attention_heads * head_dim
    kv = model.num_query_groups * head_dim
    attention = h * (q + 2 * kv) + q * h  # fused QKV (GQA) + output projection, no biases
    mlp = h * 2 * model.ffn_hidden_size + model.ffn_hidden_size * h  # SwiGLU: gate+up, down
    per_layer = attention + mlp + 2 * h  # + two RMSNorm weights
    if model.qk_layernorm:
        per_layer += 2 * head_dim  # one RMSNorm weight shared by all query heads, one for keys
    vocab = padded_vocab_size(vocab_size, model)
    embeddings = vocab * h * (1 if model.tie_embeddings else 2)
    return layers * per_layer + h + embeddings  # + final norm
