#!/usr/bin/env bash
# The GPU paths on one GPU, in under 8 minutes: CUDA trainer (FSDP2 over NCCL, world 1), the
# vLLM GPU engine against transformers, weights into it, and a short end-to-end job.
# With 2+ GPUs it also runs the NCCL weight broadcast between two processes.
#   scripts/gpu_check.sh            (creates .venv with the `gpu` extra on first use)
# Every step has a time limit; the script stops at the first failure and says which.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
nvidia-smi -L || { echo "gpu_check: no GPU visible (nvidia-smi -L failed)"; exit 2; }
"$root/scripts/bootstrap.sh" dev
py="$root/.venv/bin/python"
export ASYSTEM_DEVICE=cuda
out="${GPU_CHECK_OUT:-$root/runs/gpu_check}"
rm -rf "$out"; mkdir -p "$out"
step() { echo; echo "== gpu_check: $1"; }

step "torch sees CUDA, vLLM imports"
timeout 120 "$py" -c "import torch, vllm; assert torch.cuda.is_available(); print(torch.__version__, vllm.__version__, torch.cuda.get_device_name(0), torch.cuda.device_count(), 'GPU(s)')"

step "trainer on CUDA (NCCL default group) and the vLLM GPU engine, against transformers"
timeout 300 "$py" -m pytest -q -x -p no:cacheprovider -m "" \
    tests/asystem/test_trainer.py -k "transformers or named_weights" \
    tests/asystem/test_vllm_engine.py -k "greedy or follows or interrupt"

if [ "$("$py" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    step "NCCL weight broadcast between two GPUs (asystem/weights.py)"
    timeout 180 "$py" - <<'PY'
import torch, torch.multiprocessing as mp
from asystem.weights import BucketPlan, WeightGroup, WeightReceiver, WeightSender, WeightSyncSpec, free_port

def tensors(dev):
    g = torch.Generator().manual_seed(0)
    return [(f"w{i}", torch.randn(1024, 1024 + i, generator=g).to(torch.bfloat16).to(dev)) for i in range(40)]

def run(rank, spec):
    dev = torch.device("cuda", rank)
    group = WeightGroup.join(spec, rank, dev)
    named = tensors(dev)
    plan = BucketPlan.build(1, named, 16 << 20)
    if rank == 0:
        print("sent", WeightSender(group).send(plan, named, timeout=60))
    else:
        got = dict(WeightReceiver(group, dev).receive(plan, timeout=60))
        assert all(torch.equal(got[n], t) for n, t in named), "received tensors differ"
        print("received", plan.total_bytes, "bytes over NCCL, bit-identical")
    group.close()

if __name__ == "__main__":
    spec = WeightSyncSpec("127.0.0.1", free_port(), 2, backend="nccl", timeout_s=60)
    mp.spawn(run, args=(spec,), nprocs=2)
PY
fi

step "a short training job end to end (trainer and engine share the GPU)"
timeout 420 "$py" -m launch.cli train --config gpu_check "run.out=$out"
"$py" - "$out" <<'PY'
import json, sys
s = json.load(open(f"{sys.argv[1]}/summary.json"))
print("steps", s["steps"], "accuracy before", s.get("accuracy_before"), "after", s.get("accuracy_after"))
assert s["steps"] >= 1, "no training step finished"
PY
echo; echo "gpu_check: all passed"
