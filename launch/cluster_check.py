"""`asystem cluster --check`: is this cluster ready for a job? (the GPU check of docs/cluster.md)

Run the same command on every node as for the job, with `--check`. The head places the
job's roles as the job would (asystem/placement.py) and starts a `Probe` in every slot,
through the nodes' agents, with the slot's environment. Then it checks, and prints:

1. every probe runs on its node, sees exactly its GPUs (CUDA_VISIBLE_DEVICES) and names
   its device (GPU model and memory);
2. the trainer ranks form their process group across the nodes (NCCL on GPUs, gloo on
   CPUs) and an all-reduce adds up;
3. the weight group spans the nodes: trainer rank 0 broadcasts `--check-mb` MiB to every
   rollout slot through asystem/weights.py (the job's own code path), and each receiver
   checks every byte; the transfer rate is printed.

The last line is one JSON object; the exit status is 0 when every check passed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import time
from datetime import timedelta

from actors import Actor

CHECK_TIMEOUT_S = 300.0


def _weights(mb: int):
    """The tensors the weight check sends: deterministic, so each receiver can compare."""
    import torch

    gen = torch.Generator().manual_seed(1234)
    return [(f"layer{i}.weight", torch.randn(512, 512, generator=gen)) for i in range(max(1, mb))]  # 1 MiB each


class Probe(Actor):
    """Runs in one slot of the check: where am I, and the collectives of the check."""

    async def where(self) -> dict:
        from asystem.device import device

        dev = device()
        found = {"host": socket.gethostname(), "pid": os.getpid(), "device": str(dev),
                 "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
        if dev.type == "cuda":
            import torch

            props = torch.cuda.get_device_properties(dev)
            found.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                         gpus_seen=torch.cuda.device_count())
        return found

    async def allreduce(self, host: str, port: int, rank: int, world: int, timeout_s: float) -> float:
        """Join the trainers' default process group at host:port, all-reduce rank + 1."""
        return await asyncio.to_thread(self._allreduce, host, port, rank, world, timeout_s)

    def _allreduce(self, host: str, port: int, rank: int, world: int, timeout_s: float) -> float:
        import torch
        import torch.distributed as dist

        from asystem.device import collective_backend, device

        dev = device()
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(collective_backend(dev), init_method=f"tcp://{host}:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=timeout_s))
        try:
            value = torch.tensor([rank + 1.0], device=dev)
            dist.all_reduce(value)
            return value.item()
        finally:
            dist.destroy_process_group()

    async def weights(self, spec: dict, rank: int, mb: int, timeout_s: float) -> dict:
        """Join the weight group `spec` as `rank`: rank 0 sends `mb` MiB, the others receive
        and compare every tensor. Returns {"bytes", "seconds", "ok"}."""
        return await asyncio.to_thread(self._weights, spec, rank, mb, timeout_s)

    def _weights(self, spec: dict, rank: int, mb: int, timeout_s: float) -> dict:
        import torch

        from asystem.device import device
        from asystem.weights import (
            BucketPlan,
            WeightGroup,
            WeightReceiver,
            WeightSender,
            WeightSyncSpec,
        )

        dev = device()
        sent = [(name, t.to(dev)) for name, t in _weights(mb)]
        plan = BucketPlan.build(1, sent)
        with WeightGroup.join(WeightSyncSpec.from_dict(spec), rank, dev) as group:
            started = time.perf_counter()
            if rank == 0:
                WeightSender(group).send(plan, sent, timeout_s)
                ok = True
            else:
                got = WeightReceiver(group).receive(plan, timeout_s)
                ok = [n for n, _ in got] == [n for n, _ in sent] and all(
                    torch.equal(a, b) for (_, a), (_, b) in zip(got, sent))
            return {"bytes": plan.total_bytes, "seconds": time.perf_counter() - started, "ok": ok}


async def run_check(system, config, cluster, mb: int) -> int:
    """Place the roles of `config` on `cluster`, probe every slot, run the collectives."""
    from asystem.device import collective_backend
    from asystem.placement import Placement
    from asystem.weights import WeightSyncSpec

    say = cluster.report
    nodes = [dataclasses.replace(n, agent=n.agent.bind(system)) for n in cluster.nodes]
    placement = Placement(config.cluster, nodes, cluster.pass_env)
    planned = placement.plan({"trainer": config.trainer_ranks, "rollout": config.rollout.workers,
                              "reward": config.reward.workers})
    say(f"placement of the job's roles over {len(nodes)} nodes:\n{placement.describe()}")
    slots = [s for role in ("trainer", "rollout", "reward") for s in planned[role]]
    probes = await asyncio.gather(*(system.spawn(Probe, where=s.where, env=s.env, timeout=CHECK_TIMEOUT_S)
                                    for s in slots))
    failures: list[str] = []
    try:
        found = await asyncio.gather(*(p.ask("where", timeout=CHECK_TIMEOUT_S) for p in probes))
        for slot, probe, info in zip(slots, probes, found):
            gpu = f"{info['gpu']} ({info['gpu_memory_gib']} GiB)" if "gpu" in info else "no GPU"
            say(f"{slot.role} {slot.index}: {slot.node.name} host {info['host']} pid {info['pid']} at "
                f"{probe.address}: CUDA_VISIBLE_DEVICES={info['cuda_visible_devices']!r}, {info['device']}, {gpu}")
            if info["cuda_visible_devices"] != ",".join(slot.gpus):
                failures.append(f"{slot}: sees CUDA_VISIBLE_DEVICES={info['cuda_visible_devices']!r}")
            if info.get("gpus_seen", len(slot.gpus)) != len(slot.gpus):
                failures.append(f"{slot}: sees {info['gpus_seen']} GPUs")
        trainers = probes[:len(planned["trainer"])]
        rank0 = planned["trainer"][0]
        port = await rank0.where.ask("free_port", timeout=30.0)
        sums = await asyncio.gather(*(p.ask("allreduce", rank0.node.host, port, r, len(trainers), CHECK_TIMEOUT_S,
                                            timeout=CHECK_TIMEOUT_S + 10) for r, p in enumerate(trainers)))
        want = len(trainers) * (len(trainers) + 1) / 2
        say(f"trainer process group over {sorted({s.node.name for s in planned['trainer']})}: all-reduce "
            f"gave {sums[0]:g} on every rank" if len(set(sums)) == 1 else f"all-reduce gave {sums}")
        if any(s != want for s in sums):
            failures.append(f"trainer all-reduce: expected {want:g}, got {sums}")
        rollouts = probes[len(trainers):len(trainers) + len(planned["rollout"])]
        backend = collective_backend() if not rank0.gpus else "nccl"
        spec = WeightSyncSpec(host=rank0.node.host, port=await rank0.where.ask("free_port", timeout=30.0),
                              world_size=1 + len(rollouts), backend=backend, timeout_s=CHECK_TIMEOUT_S).to_dict()
        moved = await asyncio.gather(*(p.ask("weights", spec, r, mb, CHECK_TIMEOUT_S, timeout=CHECK_TIMEOUT_S + 10)
                                       for r, p in enumerate([trainers[0], *rollouts])))
        rate = moved[0]["bytes"] / max(moved[0]["seconds"], 1e-9) / 2**30
        say(f"weight group ({backend}) from trainer rank 0 on {rank0.node.name} to {len(rollouts)} rollout "
            f"slot(s) on {sorted({s.node.name for s in planned['rollout']})}: {moved[0]['bytes'] >> 20} MiB in "
            f"{moved[0]['seconds']:.2f}s ({rate:.2f} GiB/s)")
        failures += [f"rollout {i}: the weights arrived changed" for i, m in enumerate(moved[1:]) if not m["ok"]]
    finally:
        await asyncio.gather(*(system.stop(p, timeout=10.0) for p in probes), return_exceptions=True)
    for failure in failures:
        say(f"FAILED: {failure}")
    say("cluster check passed" if not failures else f"cluster check: {len(failures)} failure(s)")
    print(json.dumps({"nodes": len(nodes), "processes": len(slots), "failures": failures,
                      "weights_gib_per_s": round(rate, 3), "allreduce": sums[0]}), flush=True)
    return 1 if failures else 0
