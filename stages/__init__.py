"""Stage jobs: one module per stage kind, run as `python -m stages.<kind> --spec spec.json`."""

import warnings

# megatron-core announces at import that optional accelerators are absent (TransformerEngine, Apex)
# and that a config default is deprecated: expected on CPU and in every log, so not worth a line.
for _pattern in (r".*Transformer Engine and Apex are not installed.*", r".*Apex is not installed.*",
                 r".*full scope is deprecated.*"):
    warnings.filterwarnings("ignore", message=_pattern, category=UserWarning)

# dist_checkpointing's load path calls torch.distributed.checkpoint APIs that torch 2.13 marks
# deprecated (load_state_dict, ShardedTensor): megatron-core 0.16.1's business, printed on every load.
for _pattern in (r".*`load_state_dict` is deprecated.*", r".*Please use DTensor instead.*"):
    warnings.filterwarnings("ignore", message=_pattern, category=FutureWarning)
