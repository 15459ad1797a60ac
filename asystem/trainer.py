"""The IcePop trainer: one `Trainer` per data-parallel rank, sharded with FSDP2 when there are several.

A training step, top to bottom (`Trainer.train_step`):

1. Advantages: the batch's groups are scored against themselves (GRPO, Dr.GRPO or RLOO,
   `ring/advantages.py`); groups whose rewards are all equal carry no signal and are dropped.
2. Plan: the batch is split across ranks balanced by tokens, then into micro-batches of at
   most `micro_batch_tokens` padded positions (`ring/batching.py`). With `share_prompts`,
   the responses of a group share one row behind one copy of their prompt. Every rank receives
   the whole batch and computes the same plan, so no rank waits for another to decide.
3. theta_old: log p_train(y | prefix; theta_old) of every response token with the weights
   the step starts from, the numerator of IcePop's k: a pass of its own before the
   updates, or, with one update per batch, the update's own forward pass.
4. Update: for each micro-batch, log p_train(theta) with gradients, `icepop_loss`, and a
   backward pass of the loss times its share of the batch (`loss_share`), so that the
   accumulated gradient is that of the loss over the whole batch, whatever the split.
   Then gradient clipping, the learning rate of this update, one AdamW step.
5. Metrics: reduced over micro-batches and ranks; every rank returns the same dict.

Precision: the master weights, the gradients' reduction and the optimizer state are fp32.
`dtype="bf16"` runs forward and backward in bf16 (FSDP2's mixed precision), the way the
engines sample; log-probabilities are always taken in fp32.

Distributed: `setup` joins the default torch.distributed group (gloo on CPU, NCCL on GPU,
as `asystem/device.py` decides) and shards every decoder layer and the root with
`fully_shard`; a single fp32 rank has nothing to shard or cast and runs the plain module.
Forward and backward passes are collectives, so all ranks must call
`train_step`, `response_logprobs`, `named_weights`, `save_checkpoint` and
`load_checkpoint` together, with the same arguments; `setup`'s timeout bounds every
collective, so a rank that never comes makes the others raise instead of hanging.

`asystem/trainer_ranks.py` runs each rank as an actor in a process of its own
(`TrainerRank`) and calls them together (`TrainerGroup`).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from asystem import attention, trainer_checkpoint
from asystem.device import collective_backend
from asystem.device import device as configured_device
from ring.advantages import ESTIMATORS, trajectory_advantages
from ring.batching import (
    BatchTotals,
    MicroBatch,
    collate,
    collate_rows,
    loss_share,
    micro_batches,
    row_length,
    sequence_length,
    shared_prompt_rows,
    step_plan,
)
from ring.icepop import IcePopConfig, icepop_loss
from ring.trajectory import FinishReason, Trajectory

log = logging.getLogger(__name__)

SCHEDULES = ("constant", "cosine", "linear")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}



@dataclass
class TrainerConfig:
    """Everything a trainer rank needs. Plain data: `to_dict` / `from_dict` carry it to ranks."""

    model_path: str
    """A transformers causal-LM directory, readable on every rank."""
    lr: float = 2e-6
    """Peak learning rate (Ring-1T: 2e-6)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's beta1, beta2."""
    weight_decay: float = 0.01
    """AdamW's decoupled weight decay."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup, from lr / warmup_steps up to lr."""
    total_steps: int | None = None
    """Optimizer steps over which "cosine" and "linear" decay lr to 0 (required for them)."""
    schedule: str = "constant"
    """Learning rate after warmup: "constant", "cosine" or "linear" (see `learning_rate`)."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this; None disables clipping (the norm is still reported)."""
    dtype: str = "fp32"
    """Forward/backward precision: "fp32" or "bf16". Master weights and optimizer stay fp32."""
    weights_dtype: str = "bf16"
    """Precision of the tensors `named_weights` hands to the engines ("bf16" for vLLM, or "fp32")."""
    micro_batch_tokens: int = 4096
    """Most padded positions (rows x longest row) in one forward/backward pass."""
    share_prompts: bool = True
    """Sequences with the same prompt (a group's responses) share one row of the forward
    pass, the prompt computed once (`ring/batching.py`); the same log-probabilities, fewer
    positions. False: one row per sequence."""
    ppo_epochs: int = 1
    """Passes over each batch. theta_old stays the weights the step started with."""
    minibatches: int = 1
    """Optimizer updates per pass: the batch is cut into this many consecutive parts."""
    icepop: IcePopConfig = field(default_factory=IcePopConfig)
    """The policy loss (method, band, clip, aggregation); a dict of its fields is accepted."""
    advantage: str = "grpo"
    """Group advantage estimator: "grpo", "dr_grpo" or "rloo" (`ring/advantages.py`)."""
    temperature: float = 1.0
    """Sampling temperature of the engines: logits are divided by it before log-softmax,
    so p_train and p_infer describe the same distribution."""
    seed: int = 0
    """Seeds torch's generators at every step, with the version and the rank."""

    def __post_init__(self) -> None:
        if isinstance(self.icepop, Mapping):
            self.icepop = IcePopConfig(**self.icepop)
        self.betas = tuple(self.betas)
        self.model_path = str(self.model_path)
        checks = [
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}"),
            (self.dtype in DTYPES, f"dtype must be one of {tuple(DTYPES)}"),
            (self.weights_dtype in DTYPES, f"weights_dtype must be one of {tuple(DTYPES)}"),
            (self.advantage in ESTIMATORS, f"advantage must be one of {ESTIMATORS}"),
            (self.lr > 0, "lr must be > 0"),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas must be two numbers in [0, 1)"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.schedule == "constant" or (self.total_steps or 0) > self.warmup_steps,
             "schedules 'cosine' and 'linear' need total_steps > warmup_steps"),
            (self.grad_clip is None or self.grad_clip > 0, "grad_clip must be > 0 or None"),
            (self.micro_batch_tokens >= 1, "micro_batch_tokens must be >= 1"),
            (self.ppo_epochs >= 1 and self.minibatches >= 1, "ppo_epochs and minibatches must be >= 1"),
            (self.temperature > 0, "temperature must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"TrainerConfig: {message}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainerConfig:
        """The config from plain data; unknown keys raise ValueError naming them."""
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"TrainerConfig: unknown keys {sorted(unknown)}")
        return cls(**data)


def learning_rate(config: TrainerConfig, step: int) -> float:
    """The learning rate of optimizer step `step` (counted from 0).

    Warmup: lr * (step + 1) / warmup_steps for the first warmup_steps steps. Then "constant"
    keeps lr; "cosine" and "linear" decay it to 0 at total_steps and stay at 0 after.
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    progress = min(1.0, (step - config.warmup_steps) / (config.total_steps - config.warmup_steps))
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.lr * (1.0 - progress)


class Trainer:
    """One data-parallel rank of the trainer (see the module docstring for the step).

    Not thread-safe; call it from one thread. `version` is the policy version: the number
    of `train_step`s completed (with the default one update per batch, also the number of
    optimizer steps; `optimizer_steps` counts those).
    """

    def __init__(self, config: TrainerConfig, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"Trainer: need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.device = _rank_device(rank)
        self.version = 0
        self.optimizer_steps = 0
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    # -- set-up -----------------------------------------------------------------------

    def setup(self, master_addr: str = "127.0.0.1", master_port: int = 29500, timeout_s: float = 600.0) -> dict:
        """Join the default process group at master_addr:master_port, load and shard the model.

        All ranks call it; rank 0's address is the master. `timeout_s` bounds the
        rendezvous and, from then on, every collective of this trainer. Returns `info()`.
        """
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        backend = collective_backend(self.device)
        try:
            dist.init_process_group(
                backend, init_method=f"tcp://{master_addr}:{master_port}", rank=self.rank,
                world_size=self.world_size, timeout=timedelta(seconds=timeout_s),
            )
        except Exception as exc:  # a timeout (DistStoreError) or a refused connection
            raise RuntimeError(
                f"trainer rank {self.rank}/{self.world_size}: could not join the {backend} group at "
                f"{master_addr}:{master_port} (deadline {timeout_s}s): {exc}"
            ) from exc
        model = _load_model(self.config.model_path, self.device)
        compute = DTYPES[self.config.dtype]
        if self.world_size > 1 or compute != torch.float32:
            mesh = init_device_mesh(self.device.type, (self.world_size,))
            policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
            # One FSDP unit per decoder layer: a layer's full weights exist only while it runs.
            for module in model.modules():
                if type(module).__name__ in (model._no_split_modules or ()):
                    fully_shard(module, mesh=mesh, mp_policy=policy)
            fully_shard(model, mesh=mesh, mp_policy=policy)
        # else one fp32 rank: nothing to shard or cast, and FSDP2 would only add DTensor
        # dispatch to every operation: SmolLM2's first step took 14-15 s with it, 8.9 s
        # without (docs/trainer.md, "One rank").
        model.train()
        self.model = model
        # fused: one kernel that reads and writes each parameter's state once; foreach
        # makes a pass over the state per operation (SmolLM2's AdamW step on one CPU core:
        # 0.12 s fused, 0.42-0.47 s foreach).
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=learning_rate(self.config, 0), betas=self.config.betas,
            weight_decay=self.config.weight_decay, fused=True,
        )
        self._vocab_size = model.config.vocab_size
        self._param_names = [name for name, _ in model.named_parameters()]
        return self.info()

    def info(self) -> dict:
        """Rank, world size, version, and parameter counts: the whole model and this rank's shard."""
        params = list(self._model().parameters())
        return {
            "rank": self.rank, "world_size": self.world_size, "version": self.version,
            "optimizer_steps": self.optimizer_steps, "device": str(self.device),
            "parameters": sum(p.numel() for p in params),
            "local_parameters": sum(_local(p).numel() for p in params),
        }

    def close(self) -> None:
        """Leave the process group (the trainer cannot be used afterwards)."""
        self.model = self.optimizer = None
        if dist.is_initialized():
            dist.destroy_process_group()

    # -- training ---------------------------------------------------------------------

    def train_step(self, trajectories: Sequence[Trajectory], advantages: Sequence[float] | None = None) -> dict:
        """One policy update on a batch of finished trajectories; returns the step's metrics.

        All ranks call it with the same trajectories in the same order. `advantages`, one
        per trajectory, replaces the group estimator (then rewards are not needed).
        Raises ValueError, before any collective, for a trajectory that is unfinished or
        aborted, has no prompt token, or holds a token outside the vocabulary.

        Metrics (every rank returns the same): version (after the step), optimizer_steps,
        loss (mean over this step's updates of the batch loss -J), grad_norm (largest
        pre-clip global norm), lr (of the last update), the IcePop diagnostics of
        `icepop_loss` (masked_frac, below_alpha_frac, above_beta_frac, tis_capped_frac,
        mismatch_abs_mean, mismatch_abs_max, kl_k3, clip_frac) over all response tokens,
        entropy (mean per token under theta_old), sequences and tokens trained,
        groups_dropped and sequences_dropped (no signal, or empty responses), reward_mean
        and response_length_mean of the batch given, pad_frac (share of the forward
        passes' positions that are not response tokens: prompts and padding),
        skipped_updates (non-finite gradient norm: the update is not applied), and
        seconds: time_logprob_s (theta_old), time_update_s, time_step_s.
        """
        model = self._model()
        started = time.perf_counter()
        kept, adv, dropped = self._select(trajectories, advantages)
        self._reseed()
        parts = [self._plan(kept[lo:hi], adv[lo:hi]) for lo, hi in _chunks(len(kept), self.config.minibatches)]
        stats = _StepStats(self.device)

        if self.config.ppo_epochs == 1 and self.config.minibatches == 1:
            # One update per batch: theta_old is the weights the update starts from, so the
            # update's own forward pass gives log p(theta_old) (detached); a separate pass
            # would compute the same numbers again, a third of the step's time.
            old: list[list[torch.Tensor | None]] = [[None] * len(micro) for _, micro in parts]
        else:
            with torch.no_grad():
                old = [[self._logprobs(model, mb, stats) for mb in micro] for _, micro in parts]
            if hasattr(model, "reshard"):
                # FSDP keeps the root's weights gathered after a forward pass, expecting a
                # backward pass; without one they must be sharded again by hand.
                model.reshard()
        recomputed = time.perf_counter()

        for _ in range(self.config.ppo_epochs):
            for (totals, micro), old_logp in zip(parts, old):
                if totals.sequences:
                    self._update(model, totals, micro, old_logp, stats)
        self.version += 1
        metrics = stats.reduce(self.world_size)
        metrics.update(
            version=self.version, optimizer_steps=self.optimizer_steps, **dropped,
            lr=learning_rate(self.config, max(self.optimizer_steps - 1, 0)),
            reward_mean=_mean([t.reward for t in trajectories if t.reward is not None]),
            response_length_mean=_mean([t.num_response_tokens for t in trajectories]),
            time_logprob_s=recomputed - started, time_update_s=time.perf_counter() - recomputed,
            time_step_s=time.perf_counter() - started,
        )
        log.info("trainer rank %d: step %d loss %.4f grad_norm %.3f masked %.4f tokens %d in %.2fs",
                 self.rank, self.version, metrics["loss"], metrics["grad_norm"], metrics["masked_frac"],
                 metrics["tokens"], metrics["time_step_s"])
        return metrics

    def response_logprobs(self, trajectories: Sequence[Trajectory]) -> list[list[float]]:
        """log p_train(y_t | prefix) of every response token under the current weights.

        All ranks call it with the same trajectories; each computes all of them (no data
        parallelism: it is for checks and evaluation, not the training path).
        """
        model = self._model()
        trajs = list(trajectories)
        for traj in trajs:
            self._check_tokens(traj)
        result: list[list[float]] = [[] for _ in trajs]
        with torch.no_grad():
            for indices in micro_batches([sequence_length(t) for t in trajs], self.config.micro_batch_tokens):
                mb = collate(trajs, [0.0] * len(trajs), indices).to(self.device)
                logp = self._logprobs(model, mb).cpu()
                mask = mb.response_mask.cpu()
                for row, i in enumerate(indices):
                    result[i] = logp[row][mask[row]].tolist()
        if hasattr(model, "reshard"):  # sharded: no backward pass follows (see train_step)
            model.reshard()
        return result

    # -- weights and checkpoints --------------------------------------------------------

    def named_weights(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(transformers name, full tensor) for every parameter, gathered from the shards.

        All ranks must iterate it to the end, together: every tensor is an all-gather.
        Rank 0 yields each full tensor, on the trainer's device, in `dtype` (default:
        `weights_dtype`); the other ranks yield nothing. Names are the model's parameter
        names, which are the checkpoint names for dense transformers models; a tied
        output embedding appears once, under the input embedding's name.
        """
        model = self._model()
        dtype = dtype or DTYPES[self.config.weights_dtype]
        for name, param in model.named_parameters():
            full = _full(param.detach())
            if self.rank == 0:
                yield name, full.to(dtype)

    def weight_layout(self, dtype: torch.dtype | None = None) -> list[tuple[str, torch.Tensor]]:
        """(name, meta tensor) with the full shape and `dtype` of every tensor that
        `named_weights` yields, in the same order; no collective, no memory."""
        dtype = dtype or DTYPES[self.config.weights_dtype]
        return [(name, torch.empty(param.shape, dtype=dtype, device="meta"))
                for name, param in self._model().named_parameters()]

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Write a resumable checkpoint to `path`, atomically. All ranks call it.

        Rank 0 gathers the model and the optimizer state and writes them
        (asystem/trainer_checkpoint.py): the model as a transformers directory in fp32
        (config and tokenizer files from `model_path`), which transformers and vLLM load;
        the AdamW state; the version and optimizer steps. The learning rate is a function
        of the optimizer steps and the RNG is reseeded from (seed, version, rank) every
        step, so neither needs more. Gathering lets any number of ranks resume, at the
        cost of rank 0 holding the full model and optimizer state in host memory while it
        writes. If rank 0 fails to write, every rank raises.
        """
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        model = self._model()
        weights = {name: t.cpu() for name, t in self.named_weights(torch.float32)}
        optimizer = get_optimizer_state_dict(
            model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        state = {"version": self.version, "optimizer_steps": self.optimizer_steps,
                 "world_size": self.world_size, "config": self.config.to_dict()}
        model_config = model.config.to_dict()
        model_config["dtype"] = "float32"  # the master weights: resuming loses nothing
        self._on_rank0(f"writing checkpoint {path}", lambda: trainer_checkpoint.write(
            Path(path), Path(self.config.model_path), model_config, weights, optimizer, state))

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore model, optimizer, version and optimizer steps from `save_checkpoint`'s output.

        All ranks call it; only rank 0 reads `path` and the others receive the state from
        it, so the checkpoint need not be on a shared file system. The next `train_step`
        then does exactly what it would have done in the run that saved the checkpoint.
        Raises (on every rank) if rank 0 cannot read it or its parameters differ.
        """
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        model = self._model()
        loaded: dict[str, Any] = {"weights": {}, "optimizer": {}, "counters": [0, 0]}
        self._on_rank0(f"reading checkpoint {path}", lambda: loaded.update(self._read_checkpoint(Path(path))))
        counters = torch.tensor(loaded["counters"], dtype=torch.int64, device=self.device)
        dist.broadcast(counters, src=0)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, loaded["weights"], options=options)
        set_optimizer_state_dict(model, self.optimizer, loaded["optimizer"], options=options)
        self.version, self.optimizer_steps = (int(c) for c in counters.tolist())

    # -- internals ----------------------------------------------------------------------

    def _model(self) -> torch.nn.Module:
        if self.model is None:
            raise RuntimeError(f"trainer rank {self.rank}: call setup() first (or it was closed)")
        return self.model

    def _select(self, trajectories, advantages) -> tuple[list[Trajectory], list[float], dict]:
        """The trajectories to train on, their advantages, and what was dropped."""
        trajs = list(trajectories)
        for traj in trajs:
            if traj.finish_reason not in (FinishReason.EOS, FinishReason.LENGTH):
                raise ValueError(f"train_step: trajectory {traj.traj_id} is not trainable "
                                 f"(finish_reason {traj.finish_reason})")
            self._check_tokens(traj)
        if advantages is not None:
            if len(advantages) != len(trajs):
                raise ValueError(f"train_step: {len(advantages)} advantages for {len(trajs)} trajectories")
            adv: list[float | None] = [float(a) for a in advantages]
            groups_dropped = 0
        else:
            groups: dict[int, list[Trajectory]] = {}
            for traj in trajs:
                if traj.reward is not None and not math.isfinite(traj.reward):
                    # It would make its group look uniform, and be dropped without a word.
                    raise ValueError(f"train_step: trajectory {traj.traj_id} has reward {traj.reward}")
                groups.setdefault(traj.group_id, []).append(traj)
            by_id, result = trajectory_advantages(list(groups.values()), self.config.advantage)
            adv = [by_id.get(t.traj_id) for t in trajs]  # None: its group carries no signal
            groups_dropped = result.groups_dropped
        for traj, a in zip(trajs, adv):
            if a is not None and not math.isfinite(a):
                raise ValueError(f"train_step: trajectory {traj.traj_id} has advantage {a}")
        kept = [(t, a) for t, a in zip(trajs, adv) if a is not None and t.num_response_tokens > 0]
        dropped = {"groups_dropped": groups_dropped, "sequences_dropped": len(trajs) - len(kept)}
        return [t for t, _ in kept], [a for _, a in kept], dropped

    def _check_tokens(self, traj: Trajectory) -> None:
        if not traj.prompt_tokens:
            raise ValueError(f"trajectory {traj.traj_id} has no prompt token")
        ids = traj.prompt_tokens + traj.response_tokens
        if min(ids) < 0 or max(ids) >= self._vocab_size:
            raise ValueError(f"trajectory {traj.traj_id}: token ids must be in [0, {self._vocab_size}), "
                             f"got {min(ids)}..{max(ids)}")

    def _plan(self, trajs: list[Trajectory], adv: list[float]) -> tuple[BatchTotals, list[MicroBatch]]:
        budget = self.config.micro_batch_tokens
        if self.config.share_prompts:
            rows = shared_prompt_rows([t.prompt_tokens for t in trajs], [t.num_response_tokens for t in trajs], budget)
        else:
            rows = [[i] for i in range(len(trajs))]
        plan = step_plan([row_length(trajs, row) for row in rows], self.world_size, budget)
        return BatchTotals.of(trajs), [collate_rows(trajs, adv, [rows[r] for r in mb_rows]).to(self.device)
                                       for mb_rows in plan[self.rank]]

    def _logprobs(self, model, mb: MicroBatch, stats: _StepStats | None = None) -> torch.Tensor:
        """[B, L] fp32 log p(token j | tokens < j) at response positions, 0 elsewhere.

        One row per sequence: no attention mask, since padding is on the right and attention
        is causal, so it never reaches a real token; logits at position j predict token j + 1.
        Rows that share a prompt (`mb.packed`) run with their own positions and mask, and
        `packed.source` says which logits predict which token.
        """
        targets = mb.input_ids[mb.response_mask]  # [response tokens], row-major
        packed = mb.packed
        if packed is None:
            # Logits only from the first position that predicts a response token: the
            # prompt's [B, P, V] logits would cost a share of the lm_head's time and most
            # of the memory.
            length = mb.input_ids.shape[1]
            first = int(mb.response_mask.float().argmax(dim=1).min()) - 1 if mb.indices else 0
            first = max(first, 0)
            keep = torch.arange(first, length - 1, device=mb.input_ids.device)
            logits = model(input_ids=mb.input_ids, use_cache=False, logits_to_keep=keep).logits
            pred = logits[mb.response_mask[:, first + 1:]]  # [response tokens, V]
        else:
            first = int(packed.source[:, 1].min())
            keep = torch.arange(first, packed.input_ids.shape[1], device=packed.input_ids.device)
            logits = model(input_ids=packed.input_ids, position_ids=packed.position_ids,
                           attention_mask=packed.attention_mask, use_cache=False, logits_to_keep=keep).logits
            pred = logits[packed.source[:, 0], packed.source[:, 1] - first]
        pred = pred.float()
        if self.config.temperature != 1.0:
            pred = pred / self.config.temperature
        log_z = pred.logsumexp(dim=-1)
        token_logp = pred.gather(-1, targets[:, None]).squeeze(-1) - log_z
        if stats is not None:
            stats.observe_old(pred.detach(), log_z.detach(), mb)
        zeros = torch.zeros(mb.response_mask.shape, dtype=torch.float32, device=self.device)
        return zeros.masked_scatter(mb.response_mask, token_logp)

    def _update(self, model, totals: BatchTotals, micro: list[MicroBatch], old: list[torch.Tensor | None],
                stats: _StepStats) -> None:
        """Accumulate the gradient of the batch loss over the micro-batches; one AdamW step.
        An `old` entry None: theta_old is the current weights (see `train_step`)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for mb, old_logp in zip(micro, old):
            if old_logp is None:  # on-policy: this pass is theta_old's (see train_step)
                logp = self._logprobs(model, mb, stats)
                old_logp = logp.detach()
            else:
                logp = self._logprobs(model, mb)
            loss, metrics = icepop_loss(logp, old_logp, mb.infer_logprobs, mb.advantages,
                                        mb.response_mask, self.config.icepop)
            share = loss_share(self.config.icepop.aggregation, mb.response_mask, totals)
            # FSDP averages gradients over ranks; times world_size they add up instead, and
            # the shares of all ranks' micro-batches sum to the whole batch's loss.
            (loss * (share * self.world_size)).backward()
            loss_sum += float(loss.detach()) * share
            stats.observe_loss(metrics)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.config.grad_clip or float("inf"))
        norm = float(_full(norm))
        lr = learning_rate(self.config, self.optimizer_steps)
        if math.isfinite(norm):
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self.optimizer_steps += 1
        else:
            log.warning("trainer rank %d: gradient norm %s at step %d; update skipped",
                        self.rank, norm, self.version + 1)
        stats.observe_update(loss_sum, norm)

    def _reseed(self) -> None:
        # The state of every generator is a function of (seed, version, rank): a resumed
        # run draws the same numbers as the run that saved the checkpoint.
        torch.manual_seed((self.config.seed * 1_000_003 + self.version) * 4099 + self.rank)

    def _read_checkpoint(self, path: Path) -> dict:
        state, weights, optimizer = trainer_checkpoint.read(path)
        names = set(self._param_names)
        if names != set(weights):
            raise ValueError(f"checkpoint {path}: missing parameters {sorted(names - set(weights))[:5]}, "
                             f"unknown parameters {sorted(set(weights) - names)[:5]}")
        # Tied parameters have one tensor but a name per module; every name wants it.
        for alias, canonical in _aliases(self._model()).items():
            weights[alias] = weights[canonical]
        return {"weights": weights, "optimizer": optimizer,
                "counters": [state["version"], state["optimizer_steps"]]}

    def _on_rank0(self, what: str, fn: Callable[[], None]) -> None:
        """Run fn on rank 0; the other ranks learn whether it worked (and raise if not)."""
        ok = torch.ones(1, dtype=torch.int64, device=self.device)
        try:
            if self.rank == 0:
                fn()
        except BaseException:
            ok.zero_()
            dist.broadcast(ok, src=0)
            raise
        dist.broadcast(ok, src=0)
        if not ok.item():
            raise RuntimeError(f"trainer rank {self.rank}: rank 0 failed {what}")


class _StepStats:
    """Sums of a step's metrics on this rank, reduced over ranks at the end."""

    # icepop_loss metrics averaged over response tokens; mismatch_abs_max is a max.
    TOKEN_MEANS = ("masked_frac", "below_alpha_frac", "above_beta_frac", "tis_capped_frac",
                   "mismatch_abs_mean", "kl_k3", "clip_frac")

    def __init__(self, device: torch.device):
        self.device = device
        self.sums = dict.fromkeys(self.TOKEN_MEANS, 0.0)
        self.loss_tokens = 0.0
        self.mismatch_max = 0.0
        self.entropy_sum = 0.0
        self.tokens = 0.0
        self.sequences = 0.0
        self.positions = 0.0
        self.losses: list[float] = []
        self.norms: list[float] = []

    def observe_old(self, pred: torch.Tensor, log_z: torch.Tensor, mb: MicroBatch) -> None:
        log_p = pred - log_z[:, None]
        self.entropy_sum += float(-(log_p.exp() * log_p).sum())
        self.tokens += mb.num_tokens
        self.sequences += len(mb.indices)
        self.positions += mb.positions

    def observe_loss(self, metrics: dict[str, float]) -> None:
        n = metrics["num_tokens"]
        for key in self.TOKEN_MEANS:
            self.sums[key] += metrics[key] * n
        self.loss_tokens += n
        self.mismatch_max = max(self.mismatch_max, metrics["mismatch_abs_max"])

    def observe_update(self, loss: float, norm: float) -> None:
        self.losses.append(loss)
        self.norms.append(norm)

    def reduce(self, world_size: int) -> dict[str, float]:
        """The step's metrics over all ranks (a collective: every rank calls it)."""
        sums = torch.tensor([*self.sums.values(), self.loss_tokens, self.entropy_sum, self.tokens,
                             self.sequences, self.positions, *self.losses],
                            dtype=torch.float64, device=self.device)
        if world_size > 1:
            dist.all_reduce(sums)
            top = torch.tensor([self.mismatch_max], dtype=torch.float64, device=self.device)
            dist.all_reduce(top, op=dist.ReduceOp.MAX)
            self.mismatch_max = float(top)
        values = sums.tolist()
        n_keys = len(self.TOKEN_MEANS)
        loss_tokens, entropy, tokens, sequences, positions = values[n_keys:n_keys + 5]
        metrics = {key: v / max(loss_tokens, 1.0) for key, v in zip(self.TOKEN_MEANS, values)}
        skipped = [n for n in self.norms if not math.isfinite(n)]
        metrics.update(
            mismatch_abs_max=self.mismatch_max,
            loss=_mean(values[n_keys + 5:]),
            grad_norm=skipped[0] if skipped else max(self.norms, default=0.0),
            skipped_updates=len(skipped),
            entropy=entropy / max(tokens, 1.0), tokens=int(tokens), sequences=int(sequences),
            pad_frac=1.0 - tokens / positions if positions else 0.0,
        )
        return metrics


# -- helpers ------------------------------------------------------------------------------


def _rank_device(rank: int) -> torch.device:
    dev = configured_device()
    if dev.type == "cuda" and dev.index is None:
        # Ranks of one host take one GPU each.
        dev = torch.device("cuda", rank % torch.cuda.device_count())
    return dev


def _load_model(path: str, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation=attention.implementation(device))
    model.config.use_cache = False
    return model


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if hasattr(param, "to_local") else param


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from the ranks' shards if sharded (a DTensor), else itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def _chunks(n: int, parts: int) -> list[tuple[int, int]]:
    """(start, end) of `parts` consecutive slices of range(n), sizes differing by at most one."""
    size, extra = divmod(n, parts)
    bounds = [i * size + min(i, extra) for i in range(parts + 1)]
    return list(itertools.pairwise(bounds))


def _aliases(model: torch.nn.Module) -> dict[str, str]:
    """{name: canonical name} for parameters reachable under more than one name (tied)."""
    canonical = {id(p): name for name, p in model.named_parameters()}
    return {name: canonical[id(p)] for name, p in model.named_parameters(remove_duplicate=False)
            if canonical[id(p)] != name}
