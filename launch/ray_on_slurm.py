"""A Ray cluster inside a stage's Slurm allocation, for stages that want Ray workers (tokenization,
rollouts, verifiers) on the job's own nodes rather than the driver's Ray.

With `launcher.ray_cluster: true` the stage's sbatch script (launch/slurm.py) starts, before the
stage, a Ray head on the job's first node and a Ray worker on each other node, each a
`ray start --block` job step in the background; exports PIPELINE_RAY_ADDRESS (which the stage
joins, as it would join the driver's Ray) and prints `ray status`; and stops them after the stage.
All job steps use `--overlap`, so Ray and the stage share the allocation's CPUs.
"""

from __future__ import annotations

import shlex


def start_lines(python: str, port: int) -> list[str]:
    ray = f"{shlex.quote(python)} -m ray.scripts.scripts"
    step = "srun --overlap --ntasks-per-node=1 --cpus-per-task=$SLURM_CPUS_ON_NODE"
    return [
        "# a Ray cluster over this allocation (launch/ray_on_slurm.py)",
        'ray_head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "ray_ip=$(getent ahostsv4 \"$ray_head\" | awk '{print $1; exit}')",
        f"export PIPELINE_RAY_ADDRESS=$ray_ip:{port}",
        "export MALLOC_ARENA_MAX=2  # every Ray worker's (data_recipes.ray_tasks.WORKER_ENV)",
        f'{step} --nodes=1 -w "$ray_head" {ray} start --head --block --port={port} '
        '--node-ip-address="$ray_ip" --num-cpus=$SLURM_CPUS_ON_NODE --include-dashboard=false &',
        'if [ "$SLURM_NNODES" -gt 1 ]; then',
        f'    {step} --nodes=$((SLURM_NNODES - 1)) --exclude="$ray_head" {ray} start --block '
        '--address="$PIPELINE_RAY_ADDRESS" --num-cpus=$SLURM_CPUS_ON_NODE &',
        "fi",
        "for _ in $(seq 120); do  # until the head answers (and the workers have joined)",
        f'    [ "$({ray} status --address="$PIPELINE_RAY_ADDRESS" 2>/dev/null | grep -c "^ *1 node_")"'
        ' -ge "$SLURM_NNODES" ] && break',
        "    sleep 1",
        "done",
        f'{ray} status --address="$PIPELINE_RAY_ADDRESS"',
    ]


def stop_lines(port: int) -> list[str]:
    # srun hands the SIGTERM to `ray start --block`, which stops that node's Ray but leaves its
    # address in Ray's "current cluster" file, where a later ray.init() would look for it
    return ["kill $(jobs -p) 2>/dev/null; wait",
            f'grep -qs ":{port}$" /tmp/ray/ray_current_cluster && rm -f /tmp/ray/ray_current_cluster']
