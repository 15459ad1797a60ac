"""`asystem train`: build a job from its configuration, run it, report what it learned.

    summary = asyncio.run(train(load_config(TrainConfig, "job.yaml", ["run.steps=10"])))

The job starts everything it needs on this host (rollout workers, trainer ranks, reward
workers, each in processes of its own), measures held-out greedy accuracy before training,
trains with the controller (asystem/controller.py), measures it again, and writes into
`run.out`: metrics.jsonl, batches.jsonl, tensorboard/, curves.png, summary.json and
checkpoints/. With `run.resume` it goes on from the newest checkpoint there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from actors import ActorSystem
from ring.tasks import PromptRenderer, make_task_source

from . import checkpoint
from .config import ConfigError, from_dict, to_dict
from .controller import Controller, Fleet, WorkerSupervisor
from .metrics import LiveView, MetricsLog, plot, read_jsonl, truncate_after
from .models import smollm2, tiny_llama
from .train_config import TrainConfig

log = logging.getLogger(__name__)

INSTRUCTION = "Give the final answer as a number at the end of your reply."


def resolve_model(path: str) -> Path:
    """"smollm2", "tiny" or a directory -> a transformers model directory."""
    if path == "smollm2":
        return smollm2()
    if path == "tiny":
        return tiny_llama()
    if not (Path(path) / "config.json").exists():
        raise ConfigError(f"model.path: {path!r} is neither 'smollm2', 'tiny' nor a transformers model directory")
    return Path(path)


class PromptStream:
    """Training prompts in source order, with the position a checkpoint saves."""

    def __init__(self, source, renderer: PromptRenderer, position: int = 0) -> None:
        self.source, self.renderer, self.position = source, renderer, position

    def __iter__(self):
        return self

    def __next__(self):
        if self.position >= len(self.source):
            raise StopIteration
        item = self.source[self.position]
        self.position += 1
        return self.renderer.prompt(item)


def _trainer_config(config: TrainConfig, model_path: Path):
    from .trainer import TrainerConfig

    from .device import engine_dtype

    # The engines get weights in their own precision: bf16 weights in an fp32 engine would
    # add rounding the trainer never sees.
    weights = "fp32" if engine_dtype(config.rollout.dtype) == "float32" else "bf16"
    fields = {"temperature": config.rollout.temperature, "total_steps": config.run.steps, "seed": config.run.seed,
              "weights_dtype": weights, **config.trainer, "model_path": str(model_path)}
    return from_dict(TrainerConfig, fields, "trainer")


def _worker_config(config: TrainConfig, model_path: Path) -> dict[str, Any]:
    from .device import engine_dtype
    from .rollout import WorkerConfig

    backend = config.rollout.backend
    if backend == "auto":  # decided here, so that only vLLM gets vLLM's options
        from .rollout import auto_backend

        backend = auto_backend()
    options: dict[str, Any] = {}
    if backend == "vllm" and config.rollout.gpu_memory_utilization is not None:
        options["gpu_memory_utilization"] = config.rollout.gpu_memory_utilization
    return WorkerConfig(model=str(model_path), backend=backend, dtype=engine_dtype(config.rollout.dtype),
                        cpu_cores=engine_cores(config),
                        max_batch=max(config.scheduler.infer_capacity, config.task.eval_size),
                        update_mode=config.rollout.update_mode,
                        start_timeout_s=config.rollout.start_timeout_s, engine_options=options).to_dict()


async def start_together(supervisor, worker_cfg: dict[str, Any], workers: int, timeout: float, rewards,
                         trainer_start) -> tuple[list, Any]:
    """Start `workers` rollout workers (through `supervisor`), the trainer group
    (`trainer_start`, a coroutine) and the reward pool at once, each within its deadline;
    the first failure is raised. Returns the worker refs and the trainer group."""
    started = await asyncio.gather(
        *(supervisor.ask("start_worker", worker_cfg, timeout, timeout=timeout + 30.0) for _ in range(workers)),
        trainer_start, rewards.start(), return_exceptions=True)
    failed = next((s for s in started if isinstance(s, BaseException)), None)
    if failed is not None:
        raise failed
    return list(started[:workers]), started[workers]


def engine_cores(config: TrainConfig) -> list[int] | None:
    """The cores the engines compute on in a CPU job (None: no pinning); see RolloutConfig."""
    from .device import on_gpu

    spec = config.rollout.cpu_cores
    cores = sorted(os.sched_getaffinity(0))
    if on_gpu() or spec == "all" or len(cores) < 2:
        return None
    if spec == "auto":
        return cores[:len(cores) // 2]
    try:
        return [int(c) for c in str(spec).split(",")]
    except ValueError:
        raise ConfigError(f"rollout.cpu_cores: expected 'auto', 'all' or a list like '0,1', got {spec!r}") from None


def trainer_cores(config: TrainConfig) -> list[list[int]] | None:
    """The cores each trainer rank computes on in a CPU job (None: no pinning): the cores
    the engines do not take, split evenly among the ranks (shared by all ranks when there
    are fewer cores than ranks). Unpinned, the trainer's thread wandered onto the engines'
    cores and slowed decoding by a fifth (docs/training.md)."""
    engines = engine_cores(config)
    free = [c for c in sorted(os.sched_getaffinity(0)) if c not in (engines or ())]
    if engines is None or not free:
        return None
    ranks = config.trainer_ranks
    if len(free) < ranks:
        return [free] * ranks
    share = len(free) // ranks
    return [free[rank * share:(rank + 1) * share] for rank in range(ranks)]


def trainer_threads(config: TrainConfig) -> int:
    """Torch threads per trainer rank: the cores the engines do not take, shared by the ranks."""
    cores = len(os.sched_getaffinity(0))
    free = cores - len(engine_cores(config) or [])
    return max(1, (free or cores) // config.trainer_ranks)


async def start_fleet(system: ActorSystem, config: TrainConfig, model_path: Path, resume: Path | None,
                      cluster=None) -> Fleet:
    """Start the rollout workers, the trainer ranks and the reward pool, all at once: on this
    host, or placed on the nodes of `cluster` (asystem/cluster.py)."""
    if cluster is not None:
        from .cluster import start_placed_fleet

        return await start_placed_fleet(system, config, model_path, resume, cluster)

    from .reward import RewardPool
    from .trainer_ranks import TrainerGroup

    supervisor = await system.spawn(WorkerSupervisor)
    worker_cfg = _worker_config(config, model_path)
    timeout = config.rollout.start_timeout_s
    rewards = RewardPool(system, workers=config.reward.workers, timeout=config.reward.timeout_s)
    workers, trainers = await start_together(
        supervisor, worker_cfg, config.rollout.workers, timeout, rewards,
        TrainerGroup.start(system, _trainer_config(config, model_path), world_size=config.trainer_ranks,
                           timeout_s=timeout, torch_threads=trainer_threads(config),
                           cpu_cores=trainer_cores(config)))
    if resume is not None:
        await trainers.load_checkpoint(resume / checkpoint.TRAINER_DIR, timeout=1800.0)
    return Fleet(workers=workers, trainers=trainers, rewards=rewards)


def make_scheduler(config: TrainConfig):
    from ring.scheduler import C3POConfig, C3POScheduler, SyncConfig, SyncScheduler

    s, g = config.scheduler, config.rollout.group_size
    train_capacity = _train_capacity(s)  # checked whatever the kind: a bad value is a bad config
    if s.kind == "c3po":
        return C3POScheduler(C3POConfig(group_size=g, infer_capacity=s.infer_capacity, token_budget=s.token_budget,
                                        retention_limit=s.retention_limit, requeue_dropped=s.requeue_dropped,
                                        train_capacity=train_capacity))
    if s.kind == "sync":
        return SyncScheduler(SyncConfig(group_size=g, groups_per_step=s.groups_per_step,
                                        requeue_dropped=s.requeue_dropped))
    raise ConfigError(f"scheduler.kind: expected 'c3po' or 'sync', got {s.kind!r}")


def _train_capacity(s) -> int | None:
    if s.train_capacity == "auto":
        return s.infer_capacity + s.infer_capacity // 2
    if isinstance(s.train_capacity, str):
        raise ConfigError(f"scheduler.train_capacity: expected 'auto', null or a number of rollouts, "
                          f"got {s.train_capacity!r}")
    return s.train_capacity


async def train(config: TrainConfig, on_start=None, cluster=None) -> dict[str, Any]:
    """Run the job; returns the summary also written to `<out>/summary.json`.

    `on_start(fleet)`, if given, is called once every actor is up (e.g. to watch or
    probe the workers from an embedding service, or to inject faults in tests).
    `cluster` (an asystem.cluster.Cluster, from launch/cluster.py) runs the fleet on its nodes.
    """
    from transformers import AutoTokenizer

    out = Path(config.run.out)
    out.mkdir(parents=True, exist_ok=True)
    resume = checkpoint.latest(out) if config.run.resume else None
    if config.run.resume and resume is None:
        log.warning("run.resume: no checkpoint in %s; starting from scratch", out)
    state = checkpoint.read_state(resume) if resume else None
    if state is not None:
        truncate_after(out, state["step"])  # steps after the checkpoint are redone
    (out / "config.yaml").write_text(json.dumps(to_dict(config), indent=2))
    model_path = resolve_model(config.model.path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    renderer = PromptRenderer(tokenizer, system_prompt=config.task.system_prompt, instruction=INSTRUCTION)
    source = make_task_source(config.task.source, split="train")
    eval_spec = config.task.eval_source or {**config.task.source, "size": config.task.eval_size * 20}
    held_out = list(make_task_source(eval_spec, split="eval"))[:config.task.eval_size]
    items = {item.item_id: item for item in held_out}

    def item_of(prompt_id: str):
        return items.get(prompt_id) or source.by_id(prompt_id)

    scheduler = make_scheduler(config)
    prompts = PromptStream(source, renderer)
    if state is not None:
        scheduler.load_state_dict(state["scheduler"])
        prompts.position = state["data_position"]
    metrics = MetricsLog(out)
    summary: dict[str, Any] = {"out": str(out), "model": str(model_path), "resumed_from": str(resume) if resume else None}
    title = f"asystem train: {config.model.path} on {config.task.source.get('name', config.task.source['kind'])}"
    async with ActorSystem(**(cluster.system_options(config.cluster) if cluster else {})) as system:
        view = LiveView(title) if config.run.live else None
        with view or _nothing():
            note = view.note if view else log.info
            note("starting rollout workers, trainer ranks and reward workers...")
            started = time.monotonic()
            fleet = await start_fleet(system, config, model_path, resume, cluster)
            summary["startup_s"] = time.monotonic() - started
            controller = Controller(config, fleet, scheduler, prompts, item_of, tokenizer, metrics, view,
                                    eval_prompts=[renderer.prompt(i) for i in held_out],
                                    step=state["step"] if state else 0, counters=state["counters"] if state else None)
            controller.start()
            if on_start is not None:
                on_start(fleet)
            try:
                if state is None:
                    note(f"measuring held-out greedy accuracy on {len(held_out)} problems before training...")
                    await controller.sync_weights(0)
                    summary["accuracy_before"] = await controller.evaluate()
                    metrics.write(0, {"eval/accuracy": summary["accuracy_before"]})
                    note(f"held-out greedy accuracy before training: {summary['accuracy_before']:.3f}")
                minutes = config.run.minutes
                deadline = None if minutes is None else time.monotonic() + 60 * minutes
                train_started = time.monotonic()
                await controller.run(config.run.steps, deadline,
                                     finished_unscored=state["finished_unscored"] if state else None)
                summary["train_s"] = time.monotonic() - train_started
                summary["steps"] = controller.step
                if config.run.checkpoint_every and controller.counters.get("checkpoints", 0) == 0 or \
                        (config.run.checkpoint_every and controller.step % config.run.checkpoint_every):
                    await controller.save_checkpoint()
                note("measuring held-out greedy accuracy after training...")
                summary["accuracy_after"] = await controller.evaluate()
                metrics.write(controller.step, {"eval/accuracy": summary["accuracy_after"]})
            finally:
                await controller.close()
                await fleet.rewards.close()
            summary["last_step"] = controller.last_record
            summary["counters"] = {**scheduler.counters(), **controller.counters}
            summary["data_position"] = prompts.position
            pool = scheduler.state_dict()  # prompts admitted and not trained: live groups, requeued
            summary["pending_prompts"] = sorted({g["prompt"]["prompt_id"] for g in pool["groups"]}
                                                | {p["prompt_id"] for p in pool["requeued"]})
    metrics.close()
    records = read_jsonl(metrics.path)
    summary["plot"] = str(plot(records, out / "curves.png", title))
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_plain))
    return summary


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None
