#!/usr/bin/env bash
# The GPU paths on one GPU, in under 8 minutes: the CUDA trainer (FSDP2 over NCCL, world 1),
# the rollout engine on CUDA against transformers, weights into it, learning through the
# whole pipeline, and a short SmolLM2 job end to end. With 2+ GPUs it also runs the NCCL
# weight broadcast between two processes.
#   scripts/gpu_check.sh                          (creates .venv with the `gpu` extra on first use)
#   ASYSTEM_PYTHON=python3 scripts/gpu_check.sh   (that Python and its packages; installs nothing)
# Where that Python has no vLLM, the torch engine stands in for it, and the summary says
# that the vLLM GPU engine was not checked.
# Every step has a time limit. Every step runs, even after a failure; the summary lists each
# step's result, and the exit status is 1 if any failed.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
nvidia-smi -L || { echo "gpu_check: no GPU visible (nvidia-smi -L failed)"; exit 2; }
py="${ASYSTEM_PYTHON:-}"
if [ -z "$py" ]; then
    "$root/scripts/bootstrap.sh" dev || exit 2
    py="$root/.venv/bin/python"
fi
export ASYSTEM_DEVICE=cuda PYTHONUNBUFFERED=1
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # the checkout, also where it is not installed
out="${GPU_CHECK_OUT:-$root/runs/gpu_check}"
rm -rf "$out"; mkdir -p "$out"
gpus="$("$py" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
if "$py" -c 'import vllm' >/dev/null 2>&1; then engine=vllm; else engine=torch; fi
pytest=("$py" -m pytest -q -p no:cacheprovider -m "" -o addopts="" -rs)

results=()
step() {  # step NAME SECONDS COMMAND...: run it under its time limit and record the outcome
    local name="$1" limit="$2" start rc
    shift 2
    echo; echo "== gpu_check: $name"
    start=$SECONDS
    timeout "$limit" "$@"
    rc=$?
    if [ $rc -eq 0 ]; then
        results+=("passed  $(printf '%4ds' $((SECONDS - start)))  $name")
    else
        [ $rc -eq 124 ] && echo "gpu_check: '$name' did not finish within ${limit}s"
        results+=("FAILED  $(printf '%4ds' $((SECONDS - start)))  $name (exit $rc)")
    fi
}

step "torch sees CUDA ($gpus GPU(s)); rollout engine: $engine" 120 "$py" -c "
import torch; assert torch.cuda.is_available(), 'torch.cuda.is_available() is False'
print('torch', torch.__version__, '|', torch.cuda.get_device_name(0), '|', torch.cuda.device_count(), 'GPU(s)')
if '$engine' == 'vllm':
    import vllm; print('vllm', vllm.__version__)
else:
    print('vLLM is not installed in this Python: the torch engine stands in for it')"

step "trainer on CUDA (FSDP2, NCCL), CUDA tensors on the wire, checkpoints" 300 "${pytest[@]}" \
    tests/transport/test_codec.py::test_cuda_tensors_arrive_on_the_cpu tests/asystem/test_trainer.py

if [ "$engine" = vllm ]; then
    step "the vLLM GPU engine against transformers, weights into it" 300 "${pytest[@]}" \
        tests/asystem/test_vllm_engine.py -k "greedy or follows or interrupt"
fi
step "the torch engine on CUDA against transformers; rollout workers; weights into them" 300 "${pytest[@]}" \
    tests/asystem/test_torch_engine.py tests/asystem/test_rollout_worker.py

if [ "$gpus" -ge 2 ]; then
    step "NCCL weight broadcast between two GPUs (asystem/weights.py)" 180 "$py" - <<'PY'
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

step "reward rises through the whole pipeline (tiny model, CUDA)" 300 "${pytest[@]}" tests/asystem/test_learning.py

check_summary='import json, sys
s = json.load(open(sys.argv[1] + "/summary.json"))
print("steps", s["steps"], "| accuracy before", s.get("accuracy_before"), "after", s.get("accuracy_after"))
assert s["steps"] >= 1, "no training step finished"'
step "a short SmolLM2 job end to end ($engine engine and trainer share the GPU)" 420 bash -c \
    '"$1" -m launch.cli train --config gpu_check "rollout.backend=$2" "run.out=$3" && "$1" -c "$4" "$3"' \
    _ "$py" "$engine" "$out" "$check_summary"

echo; echo "== gpu_check summary (engine: $engine, $gpus GPU(s))"
printf '%s\n' "${results[@]}"
[ "$engine" = vllm ] || echo "NOT CHECKED  the vLLM GPU engine (vllm is not installed in $py)"
if printf '%s\n' "${results[@]}" | grep -q '^FAILED'; then
    echo "gpu_check: FAILED"; exit 1
fi
echo "gpu_check: all passed"
