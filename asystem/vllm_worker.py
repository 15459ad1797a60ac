"""The half of VLLMEngine that runs inside vLLM's worker process, next to the weights.

vLLM mixes `WeightSyncExtension` into its worker class when the engine is started with
`worker_extension_cls="asystem.vllm_worker.WeightSyncExtension"`; `VLLMEngine` calls its
methods through `AsyncLLM.collective_rpc`. They run in the worker's main thread, between two
engine steps, so nothing is decoded while one runs.

Weights go in through vLLM's own in-place reload (`reload_weights`), with checkpoint
(transformers) names: vLLM fuses q/k/v and gate/up and repacks linear weights for its
kernels itself, which is why writing into the parameters directly is wrong on CPU.

Every method returns plain data and never raises for a failure of the update itself: it
reports `{"ok": False, "stage": ..., "error": ...}`, so that the frontend can tell a transfer
that failed (nothing was loaded, the old weights serve on) from a load that failed part-way
(the weights are mixed; the engine must stop serving).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import traceback
from typing import Any

import psutil
import torch

from .weights import BucketPlan, WeightGroup, WeightReceiver, WeightSyncSpec

log = logging.getLogger(__name__)


class WeightSyncExtension:
    """Methods vLLM adds to its worker. Names carry an `asystem_` prefix because vLLM refuses
    an extension whose attributes clash with the worker's own (it has `update_weights`)."""

    _asystem_group: WeightGroup | None = None

    def asystem_describe(self, frontend_pid: int) -> dict[str, Any]:
        """What the frontend needs to validate updates: vLLM's fused modules
        (e.g. {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}) and the worker's device. Starts
        the watch on the frontend process (see `_die_with`)."""
        _die_with(frontend_pid)
        model = self.model_runner.get_model()
        packed = getattr(model, "packed_modules_mapping", {}) or {}
        return {"packed": {k: list(v) for k, v in packed.items()}, "device": str(self.device)}

    def asystem_load_weights(self, packed: list[list[Any]]) -> dict[str, Any]:
        """Load checkpoint-named tensors (`pack_tensors`; validated by the frontend) in place."""
        named = unpack_tensors(packed)
        return _load(self, named, {"ok": True, "bytes": _nbytes(named)})

    def asystem_join_weight_group(self, spec: dict[str, Any], rank: int) -> dict[str, Any]:
        """Join the trainer's broadcast group as `rank`, on this worker's device; a group joined
        before is left first (a failed update leaves it broken). Blocks until every rank joined
        or the spec's deadline passed."""
        self.asystem_leave_weight_group()
        try:
            with _on_every_cpu():
                self._asystem_group = WeightGroup.join(WeightSyncSpec.from_dict(spec), rank, self.device)
        except Exception as exc:  # noqa: BLE001 - reported to the frontend, which raises
            return {"ok": False, "stage": "join", "error": f"{type(exc).__name__}: {exc}"}
        return {"ok": True}

    def asystem_leave_weight_group(self) -> None:
        group, self._asystem_group = self._asystem_group, None
        if group is not None:
            group.close()

    def asystem_receive_weights(self, plan: dict[str, Any], timeout: float, drop: list[str],
                                reject: str | None) -> dict[str, Any]:
        """Receive one broadcast within `timeout` seconds, then load it (without the tensors
        named in `drop`). With `reject` (why the frontend refuses this plan), take part in the
        update only to fail it at the first bucket, so that the trainer and the other engines
        learn it at once instead of at their deadline."""
        if self._asystem_group is None:
            return {"ok": False, "stage": "receive", "error": "no weight group: join_weight_group first"}
        start = time.monotonic()
        try:
            received = WeightReceiver(self._asystem_group).receive(
                BucketPlan.from_dict(plan), timeout, on_bucket=_refuse(reject) if reject else None)
        except Exception as exc:  # noqa: BLE001 - nothing was loaded: reported, not raised
            return {"ok": False, "stage": "receive", "error": f"{type(exc).__name__}: {exc}"}
        skip = set(drop)
        named = [(name, t) for name, t in received if name not in skip]
        del received  # the bucket buffers are reused by the next update once nobody holds them
        stats = {"ok": True, "bytes": _nbytes(named), "receive_s": time.monotonic() - start}
        return _load(self, named, stats)


@contextlib.contextmanager
def _on_every_cpu():
    """Let this thread, and the threads it starts meanwhile, run on every CPU.

    vLLM-CPU pins its worker to the cores it computes on (one, on a 2-core machine), and new
    threads inherit the pin. The group's I/O threads start at `WeightGroup.join`; pinned, they
    would receive the weights on a core shared with the worker's own threads while the other
    cores idle (measured: ~1.5-2.5x the raw broadcast's time instead of ~1x). Decoding is
    stopped while weights arrive, so they take no core from it. On GPU nothing is pinned."""
    pinned = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    except OSError:  # a cpuset narrower than the machine: stay as we are
        pinned = None
    try:
        yield
    finally:
        if pinned is not None:
            os.sched_setaffinity(0, pinned)


def _die_with(frontend_pid: int, interval: float = 1.0) -> None:
    """Kill the engine-core process and this worker once the frontend process is gone.

    vLLM's engine core outlives a frontend that was killed (SIGKILL, or a SIGTERM that skipped
    its shutdown) and keeps its memory; a RolloutWorker's process that dies must not leave
    gigabytes behind. The worker's parent is the engine core."""
    frontend = psutil.Process(frontend_pid)
    core_pid = os.getppid()

    def alive() -> bool:
        try:
            return frontend.is_running() and frontend.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def watch() -> None:
        while alive():
            time.sleep(interval)
        log.error("asystem: the vLLM frontend (pid %d) is gone: ending its engine processes", frontend_pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(core_pid, signal.SIGKILL)
        os._exit(1)

    threading.Thread(target=watch, name="asystem-frontend-watch", daemon=True).start()


def pack_tensors(named: list[tuple[str, torch.Tensor]]) -> list[list[Any]]:
    """Tensors as plain data for `collective_rpc`, whose arguments vLLM decodes without
    types (a tensor would arrive as a list): [name, dtype, shape, raw bytes] each."""
    return [[name, str(t.dtype).removeprefix("torch."), list(t.shape),
             t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()]
            for name, t in named]


def unpack_tensors(packed: list[list[Any]]) -> list[tuple[str, torch.Tensor]]:
    """The inverse of `pack_tensors` (the tensors share the received bytes' memory)."""
    named = []
    for name, dtype, shape, data in packed:
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        named.append((name, raw.view(getattr(torch, dtype)).reshape(shape)))
    return named


def _load(worker: Any, named: list[tuple[str, torch.Tensor]], stats: dict[str, Any]) -> dict[str, Any]:
    start = time.monotonic()
    try:
        worker.reload_weights(weights_iterator=iter(named))
        _reprocess_aliases(worker)
    except Exception as exc:  # noqa: BLE001 - the frontend marks the engine broken
        log.error("asystem: reloading weights failed part-way:\n%s", traceback.format_exc())
        return {"ok": False, "stage": "load", "error": f"{type(exc).__name__}: {exc}"}
    stats["load_s"] = time.monotonic() - start
    return stats


def _reprocess_aliases(worker: Any) -> None:
    """Redo the weight processing of the modules that only borrow another module's
    parameters: a tied lm_head, whose weight is the embedding's.

    vLLM's in-place reload processes each module that received weights once it has them all
    (`process_weights_after_loading`: on CPU that packs a copy of the weight for its GEMM
    kernel, oneDNN or SGL, into `cpu_linear`). A tied lm_head receives none (the checkpoint
    names only the embedding), so vLLM only puts its old parameter back, which the
    embedding's reload has overwritten in place, and leaves its packed copy alone: the
    logits would keep coming from the first weights ever loaded (the checkpoint's) while
    everything else follows the updates. On GPU the embedding method's processing does
    nothing, so this costs nothing there."""
    from vllm.config import set_current_vllm_config

    model = worker.model_runner.get_model()
    # The first module to hold a parameter is the one the checkpoint name loads it into
    # (vLLM dedups tied parameters this way too: model.embed_tokens.weight, not lm_head's).
    owner: dict[int, torch.nn.Module] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owner.setdefault(id(param), module)
    with set_current_vllm_config(worker.vllm_config), torch.no_grad():
        for module in model.modules():
            params = list(module.parameters(recurse=False))
            method = getattr(module, "quant_method", None)
            if params and method is not None and all(owner[id(p)] is not module for p in params):
                method.process_weights_after_loading(module)


def _refuse(reason: str):
    def on_bucket(index: int, named: list[tuple[str, torch.Tensor]]) -> None:
        raise ValueError(reason)

    return on_bucket


def _nbytes(named: list[tuple[str, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for _, t in named)
