"""The trainer's end of the vLLM engine tests: a process that holds SmolLM2 in transformers,
broadcasts its weights as weight-group rank 0, and scores token sequences on them.

Run as `python -m tests.asystem.vllm_trainer MODEL_DIR`; it reads one JSON command per line
on stdin and writes one JSON reply per line on stdout (nothing is unpickled). Commands:

- `perturb {seed, scale}`: weights := checkpoint + scale * N(0, 1) (seed 0, scale 0: the
  checkpoint itself), held as bf16, the engine's precision.
- `join {spec}`: join the weight group as rank 0.
- `plan {version, bucket_bytes}`: the BucketPlan of the current weights.
- `send {plan, timeout, die_at?, stall_at?}`: broadcast. `die_at`: SIGKILL this process
  when bucket `die_at` is about to go. `stall_at`: at that bucket, write `{"at": index}`
  and wait for a "go" line before going on.
- `score {prompt, tokens}`: for each of `tokens` after `prompt`, its log-probability under
  the current weights (computed in float32), the largest log-probability there and its token.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import torch
from transformers import AutoModelForCausalLM

from asystem.weights import BucketPlan, WeightGroup, WeightSender, WeightSyncSpec


class Trainer:
    def __init__(self, model_dir: str):
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        # Parameters, not the state dict: a tied lm_head is the embedding, not a second tensor.
        self.original = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.weights: list[tuple[str, torch.Tensor]] = []
        self.group: WeightGroup | None = None
        self.perturb(0, 0.0)

    def perturb(self, seed: int, scale: float) -> dict:
        gen = torch.Generator().manual_seed(seed)
        state = {n: (t + scale * torch.randn(t.shape, generator=gen)).to(torch.bfloat16)
                 for n, t in self.original.items()}
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                param.copy_(state[name])
        self.weights = list(state.items())
        return {"tensors": len(self.weights)}

    def join(self, spec: dict) -> dict:
        if self.group is not None:
            self.group.close()
        self.group = WeightGroup.join(WeightSyncSpec.from_dict(spec), 0)
        return {}

    def plan(self, version: int, bucket_bytes: int | None = None) -> dict:
        return BucketPlan.build(version, self.weights, bucket_bytes).to_dict()

    def send(self, plan: dict, timeout: float, die_at: int | None = None, stall_at: int | None = None) -> dict:
        if self.group is None:
            raise RuntimeError("not in a weight group: `join` first")
        stats = WeightSender(self.group).send(_Hooked.make(plan, die_at, stall_at), self.weights, timeout)
        return {"buckets": stats.buckets, "bytes": stats.bytes, "seconds": stats.seconds}

    @torch.no_grad()
    def score(self, prompt: list[int], tokens: list[int]) -> dict:
        ids = torch.tensor([prompt + tokens])
        logprobs = self.model(ids).logits[0, len(prompt) - 1:-1].float().log_softmax(-1)
        best = logprobs.max(-1)
        return {"logprobs": logprobs.gather(-1, torch.tensor(tokens)[:, None])[:, 0].tolist(),
                "best": best.values.tolist(), "argmax": best.indices.tolist()}


class _Hooked(BucketPlan):
    """The plan as sent, with a hook where bucket `index` is packed or handed over whole."""

    @classmethod
    def make(cls, plan: dict, die_at: int | None, stall_at: int | None) -> BucketPlan:
        plain = BucketPlan.from_dict(plan)
        hooked = cls(plain.version, plain.buckets)
        object.__setattr__(hooked, "hooks", {"die_at": die_at, "stall_at": stall_at, "seen": set()})
        return hooked

    def _at(self, index: int) -> None:
        if index in self.hooks["seen"]:  # the sender asks for solo bytes, then packs
            return
        self.hooks["seen"].add(index)
        if index == self.hooks["die_at"]:
            os.kill(os.getpid(), signal.SIGKILL)
        if index == self.hooks["stall_at"]:
            _reply({"at": index})
            assert json.loads(sys.stdin.readline()) == "go"

    def pack(self, index, tensors, out):
        self._at(index)
        return super().pack(index, tensors, out)

    def solo_bytes(self, index, tensors, device):
        self._at(index)
        return super().solo_bytes(index, tensors, device)


def _reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    trainer = Trainer(sys.argv[1])
    _reply({"ready": os.getpid()})
    for line in sys.stdin:
        command = json.loads(line)
        start = time.monotonic()
        try:
            reply = {"ok": getattr(trainer, command["name"])(**command["args"])}
        except Exception as e:  # noqa: BLE001 - the test judges every failure
            reply = {"error": type(e).__name__, "message": str(e)}
        reply["elapsed"] = time.monotonic() - start
        _reply(reply)


if __name__ == "__main__":
    main()
