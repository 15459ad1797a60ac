"""The IcePop trainer: the log-probabilities it recomputes, the gradient IcePop lets
through, data parallelism across real processes, checkpoints, and learning itself.

Trainers in this process join a one-rank gloo group (one at a time: a process has one
default group), trainers in child processes their own. Torch runs one thread here: the
machine is small and shared, and idle OpenMP threads spinning for busy cores slow small
operations a hundredfold.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys

import pytest
import pytest_asyncio
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from actors import Actor
from asystem.device import collective_backend, device
from asystem.malloc import TUNABLES
from asystem.models import tiny_llama
from asystem.trainer import Trainer, TrainerConfig, learning_rate
from asystem.trainer_ranks import TrainerGroup, free_port
from ring.trajectory import FinishReason, Trajectory
from tests.actors.conftest import assert_no_descendants, new_system


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny() -> str:
    return str(tiny_llama())


@pytest.fixture(scope="module")
def reference(tiny):
    """The tiny model as transformers loads it: the ground truth for weights and logprobs."""
    return AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()


@pytest_asyncio.fixture
async def system():
    sys_ = await new_system(default_timeout=60.0).start()
    try:
        yield sys_
    finally:
        async with asyncio.timeout(60):
            await sys_.shutdown()
    await assert_no_descendants()


@contextlib.contextmanager
def trainer(config: TrainerConfig):
    t = Trainer(config)
    t.setup("127.0.0.1", free_port(), timeout_s=60)
    try:
        yield t
    finally:
        t.close()


def reference_logprobs(model, traj: Trajectory) -> list[float]:
    ids = torch.tensor([traj.prompt_tokens + traj.response_tokens])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    per_token = logp.gather(-1, ids[0, 1:, None]).squeeze(-1)
    return per_token[len(traj.prompt_tokens) - 1:].tolist()


def make_batch(response_lengths, seed=0, vocab=1000, prompt_len=3, group_size=2) -> list[Trajectory]:
    """Trajectories with random tokens; infer_logprobs are placeholders (-5) until set."""
    g = torch.Generator().manual_seed(seed)
    return [
        Trajectory(
            traj_id=i, group_id=i // group_size, prompt_id=f"p{i // group_size}", sample_index=i % group_size,
            prompt_tokens=torch.randint(2, vocab, (prompt_len,), generator=g).tolist(),
            response_tokens=torch.randint(2, vocab, (n,), generator=g).tolist(),
            infer_logprobs=[-5.0] * n, versions=[0] * n, reward=float(i % group_size == 0),
            finish_reason=FinishReason.EOS,
        )
        for i, n in enumerate(response_lengths)
    ]


def with_infer_logprobs(model, trajs, noise=0.0, seed=0) -> list[Trajectory]:
    """The engine's logprobs = the reference model's, plus noise (a bf16-like mismatch)."""
    g = torch.Generator().manual_seed(seed)
    for traj in trajs:
        exact = torch.tensor(reference_logprobs(model, traj))
        traj.infer_logprobs = (exact + noise * torch.randn(exact.shape, generator=g)).tolist()
    return trajs


def weights(t: Trainer) -> dict[str, torch.Tensor]:
    return {name: w.clone() for name, w in t.named_weights(torch.float32)}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).detach().abs().max()) for k in a)


# -- config and schedule ---------------------------------------------------------------------


def test_config_travels_as_plain_data_and_rejects_mistakes(tiny):
    config = TrainerConfig(model_path=tiny, icepop={"beta": 3.0}, betas=[0.9, 0.95])
    back = TrainerConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert back == config and back.icepop.beta == 3.0 and back.betas == (0.9, 0.95)
    with pytest.raises(ValueError, match="unknown keys.*'learning_rate'"):
        TrainerConfig.from_dict({"model_path": tiny, "learning_rate": 1.0})
    with pytest.raises(ValueError, match="total_steps"):
        TrainerConfig(model_path=tiny, schedule="cosine")
    with pytest.raises(ValueError, match="dtype"):
        TrainerConfig(model_path=tiny, dtype="fp16")


def test_learning_rate_warms_up_then_follows_the_schedule(tiny):
    cosine = TrainerConfig(model_path=tiny, lr=1.0, warmup_steps=4, total_steps=14, schedule="cosine")
    assert [learning_rate(cosine, s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate(cosine, 9) == pytest.approx(0.5)
    assert learning_rate(cosine, 14) == learning_rate(cosine, 100) == pytest.approx(0.0)
    linear = TrainerConfig(model_path=tiny, lr=2.0, total_steps=10, schedule="linear")
    assert [learning_rate(linear, s) for s in (0, 5, 10)] == pytest.approx([2.0, 1.0, 0.0])
    assert learning_rate(TrainerConfig(model_path=tiny, lr=3.0), 10**6) == 3.0


# -- log-probabilities and the IcePop gradient ------------------------------------------------


def test_recomputed_logprobs_equal_transformers(tiny, reference):
    # Lengths differ, so rows are padded and split over several micro-batches.
    batch = with_infer_logprobs(reference, make_batch([1, 9, 4, 14, 6, 2]))
    with trainer(TrainerConfig(model_path=tiny, micro_batch_tokens=24, lr=1e-3)) as t:
        got = t.response_logprobs(batch)
        for traj, logp in zip(batch, got):
            assert logp == pytest.approx(traj.infer_logprobs, abs=1e-5)
        # The same recompute is train_step's theta_old: against the exact engine
        # probabilities, it sees no mismatch at all.
        metrics = t.train_step(batch)
    assert metrics["mismatch_abs_max"] < 1e-5 and metrics["masked_frac"] == 0.0
    assert metrics["kl_k3"] == pytest.approx(0.0, abs=1e-8)
    assert metrics["tokens"] == sum(len(x.response_tokens) for x in batch)
    assert metrics["version"] == 1 and metrics["optimizer_steps"] == 1


def shared_prompt_batch(response_lengths, group_size, seed=0, vocab=1000, prompt_len=7) -> list[Trajectory]:
    """Like make_batch, but the trajectories of a group share their prompt, as rollouts do."""
    batch = make_batch(response_lengths, seed=seed, vocab=vocab, group_size=group_size)
    for traj in batch:
        g = torch.Generator().manual_seed(1000 * seed + traj.group_id)
        traj.prompt_tokens = torch.randint(2, vocab, (prompt_len,), generator=g).tolist()
    return batch


def test_groups_sharing_a_prompt_train_exactly_as_separate_rows(tiny, reference):
    """A group's responses in one row behind one copy of their prompt (share_prompts) get the
    same log-probabilities, so the same update, as one row per sequence; with fewer positions.
    The budget of 30 positions splits the 4-response groups over several rows."""
    batch = with_infer_logprobs(reference, shared_prompt_batch([3, 9, 1, 5, 6, 2, 8, 4], group_size=4))
    results = {}
    for share in (False, True):
        with trainer(TrainerConfig(model_path=tiny, micro_batch_tokens=30, lr=1e-3, share_prompts=share)) as t:
            before = weights(t)
            metrics = t.train_step(batch, [1.0, -0.5, 0.25, -1.0, 0.5, -0.25, 1.0, -0.75])
            results[share] = (weights(t), metrics)
    (separate, m_separate), (shared, m_shared) = results[False], results[True]
    # Against the exact engine probabilities both see no mismatch: the shared rows'
    # positions and mask give every token the logits of its own row.
    assert m_shared["mismatch_abs_max"] < 1e-5 and m_separate["mismatch_abs_max"] < 1e-5
    assert m_shared["loss"] == pytest.approx(m_separate["loss"], abs=1e-6)
    assert m_shared["entropy"] == pytest.approx(m_separate["entropy"], rel=1e-5)
    # Adam's first step moves each weight by about lr whatever its gradient's size, so
    # rounding-level gradient differences show up at 1e-6 here: compare with the update.
    assert max_diff(separate, shared) < 1e-2 * max_diff(before, separate)
    assert m_shared["tokens"] == m_separate["tokens"] == 38


def test_tokens_outside_the_icepop_band_change_nothing(tiny, reference):
    """A trajectory whose engine probabilities are absurd (k far above beta) contributes no
    gradient: adding it to a batch leaves the update as it was. The same trajectory with
    sane probabilities does move the weights. (Aggregation "budget" keeps the loss's
    normaliser independent of the batch, so the updates are comparable.)"""
    icepop = {"aggregation": "budget", "token_budget": 64}
    config = TrainerConfig(model_path=tiny, lr=1e-3, icepop=icepop, grad_clip=None)
    base = with_infer_logprobs(reference, make_batch([5, 7, 3, 6], seed=1), noise=0.05)
    absurd = with_infer_logprobs(reference, make_batch([8], seed=2))[0]
    absurd.traj_id = 99
    sane = Trajectory.from_dict(absurd.to_dict())
    absurd.infer_logprobs = [lp - 30.0 for lp in absurd.infer_logprobs]  # k = e^30 > beta
    advantages = [1.0, -1.0, 0.5, -0.5]

    results = {}
    for name, batch, adv in (("base", base, advantages), ("absurd", [*base, absurd], [*advantages, 2.0]),
                             ("sane", [*base, sane], [*advantages, 2.0])):
        with trainer(config) as t:
            metrics = t.train_step(batch, adv)
            results[name] = (weights(t), metrics)

    base_w, absurd_w, sane_w = (results[k][0] for k in ("base", "absurd", "sane"))
    assert results["absurd"][1]["above_beta_frac"] == pytest.approx(8 / 29)
    assert results["absurd"][1]["masked_frac"] == pytest.approx(8 / 29)
    assert results["sane"][1]["masked_frac"] == 0.0
    moved = max_diff(base_w, sane_w)
    assert moved > 5e-4, "the in-band trajectory should change the update (about lr)"
    assert max_diff(base_w, absurd_w) < moved * 1e-3


def test_bf16_compute_updates_fp32_master_weights(tiny, reference):
    batch = with_infer_logprobs(reference, make_batch([6, 4, 9, 3]))
    with trainer(TrainerConfig(model_path=tiny, dtype="bf16", lr=1e-3)) as t:
        before = weights(t)
        metrics = t.train_step(batch)
        after = weights(t)
        served = dict(t.named_weights())
    # bf16 forward passes against fp32 engine probabilities: a visible but small mismatch.
    assert 1e-4 < metrics["mismatch_abs_mean"] < 0.1 and metrics["masked_frac"] == 0.0
    assert all(w.dtype == torch.float32 for w in after.values())
    assert max_diff(before, after) > 1e-4
    # The engines get bf16 (weights_dtype's default), the master weights rounded.
    assert all(w.dtype == torch.bfloat16 for w in served.values())
    assert torch.equal(served["model.norm.weight"], after["model.norm.weight"].bfloat16())


def test_one_fp32_rank_runs_unsharded_and_bf16_compute_through_fsdp(tiny):
    """One fp32 rank has nothing to shard or cast: plain parameters, no DTensor dispatch
    (docs/trainer.md, "One rank"). bf16 compute needs FSDP2's casting, even on one rank."""
    with trainer(TrainerConfig(model_path=tiny)) as t:
        assert not any(hasattr(p, "full_tensor") for p in t.model.parameters())
    with trainer(TrainerConfig(model_path=tiny, dtype="bf16")) as t:
        assert all(hasattr(p, "full_tensor") for p in t.model.parameters())


def test_several_updates_per_batch_keep_theta_old(tiny, reference):
    """ppo_epochs x minibatches optimizer steps make one policy version. theta_old stays
    the weights the step began with, so after the first update the ratio r leaves 1 and
    the PPO clip starts to bite."""
    batch = with_infer_logprobs(reference, make_batch([5, 6, 4, 7, 3, 6], seed=4))
    config = TrainerConfig(model_path=tiny, lr=3e-2, ppo_epochs=2, minibatches=2, warmup_steps=8, grad_clip=None,
                           icepop={"eps": 0.01})
    with trainer(config) as t:
        first = t.train_step(batch)
        assert (first["version"], first["optimizer_steps"]) == (1, 4)
        assert first["lr"] == learning_rate(t.config, 3) == pytest.approx(3e-2 * 4 / 8)
        assert first["clip_frac"] > 0
    with trainer(TrainerConfig(model_path=tiny, lr=3e-2, icepop={"eps": 0.01})) as t:
        assert t.train_step(batch)["clip_frac"] == 0.0, "one update from theta_old never clips"


def test_bad_trajectories_are_refused_by_name(tiny):
    with trainer(TrainerConfig(model_path=tiny)) as t:
        unfinished = make_batch([3, 3])
        unfinished[1].finish_reason = None
        with pytest.raises(ValueError, match="trajectory 1 is not trainable"):
            t.train_step(unfinished)
        aborted = make_batch([3, 3])
        aborted[0].finish_reason = FinishReason.ABORTED
        with pytest.raises(ValueError, match="trajectory 0 is not trainable"):
            t.train_step(aborted)
        foreign = make_batch([3, 3])
        foreign[1].response_tokens[0] = 10**6
        with pytest.raises(ValueError, match=r"trajectory 1: token ids must be in \[0, 49152\)"):
            t.train_step(foreign)
        with pytest.raises(ValueError, match="2 advantages for 3 trajectories"):
            t.train_step(make_batch([2, 2, 2]), [1.0, 2.0])
        nan_reward = make_batch([2, 2])
        nan_reward[0].reward = float("nan")
        with pytest.raises(ValueError, match="trajectory 0 has reward nan"):
            t.train_step(nan_reward)
        with pytest.raises(ValueError, match="trajectory 1 has advantage inf"):
            t.train_step(make_batch([2, 2]), [0.5, float("inf")])
        assert t.version == 0, "a refused batch is not a step"


def test_groups_without_signal_are_dropped_and_counted(tiny):
    batch = make_batch([3, 4, 5, 6])  # groups {0, 1} and {2, 3}
    batch[2].reward = batch[3].reward = 0.5  # all equal: no signal
    with trainer(TrainerConfig(model_path=tiny)) as t:
        metrics = t.train_step(batch)
    assert metrics["groups_dropped"] == 1 and metrics["sequences_dropped"] == 2
    assert metrics["sequences"] == 2 and metrics["tokens"] == 7


# -- checkpoints --------------------------------------------------------------------------


def test_checkpoint_resumes_exactly_and_loads_in_transformers(tiny, reference, tmp_path):
    # Warmup makes every step's learning rate different, so a lost step count would show.
    config = TrainerConfig(model_path=tiny, lr=1e-3, warmup_steps=5)
    batches = [with_infer_logprobs(reference, make_batch([4, 6, 3, 5], seed=s), noise=0.1) for s in range(3)]
    ckpt = tmp_path / "ckpt"
    with trainer(config) as t:
        t.train_step(batches[0])
        t.save_checkpoint(ckpt)  # overwritten below: a checkpoint replaces an older one
        t.train_step(batches[1])
        t.save_checkpoint(ckpt)
        saved = weights(t)
        expected = t.train_step(batches[2])
        expected_w = weights(t)

    assert not [p.name for p in tmp_path.iterdir() if p.name != "ckpt"], "no temporary left behind"
    # vLLM takes every top-level *.safetensors of an unsharded model for weights.
    assert [p.name for p in ckpt.glob("*.safetensors")] == ["model.safetensors"]
    loaded = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    assert max_diff(saved, {k: v for k, v in loaded.state_dict().items() if k in saved}) == 0.0

    with trainer(config) as t:
        t.load_checkpoint(ckpt)
        assert (t.version, t.optimizer_steps) == (2, 2)
        assert max_diff(weights(t), saved) == 0.0
        resumed = t.train_step(batches[2])
        assert max_diff(weights(t), expected_w) == 0.0
    for key in ("loss", "grad_norm", "lr", "kl_k3", "clip_frac", "version"):
        assert resumed[key] == expected[key], key


SERVE_IN_VLLM = """
import json, sys
from vllm import LLM, SamplingParams

if __name__ == "__main__":  # vLLM's engine process re-imports this file
    llm = LLM(model=sys.argv[1], dtype="bfloat16", gpu_memory_utilization=0.1, max_model_len=128, seed=0)
    out = llm.generate([{"prompt_token_ids": json.loads(sys.argv[2])}], SamplingParams(temperature=0, max_tokens=6))
    print("TOKENS", json.dumps(list(out[0].outputs[0].token_ids)))
"""


@pytest.mark.slow  # a vLLM engine starts in about 35 s; 4 minutes were seen on a loaded machine
@pytest.mark.timeout(900)
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed here")
def test_a_checkpoint_serves_in_vllm(tmp_path):
    """The trainer teaches a tiny model (head size 64: vLLM's CPU attention needs it) to
    answer one token; vLLM, started on the checkpoint, answers it too."""
    base, prompt, taught = str(tiny_llama(hidden=256)), [5, 6, 7], 777
    good, bad = make_batch([6, 6], seed=5)
    good.prompt_tokens = bad.prompt_tokens = prompt
    good.response_tokens = [taught] * 6
    with trainer(TrainerConfig(model_path=base, lr=1e-2, weights_dtype="fp32")) as t:
        for _ in range(5):
            t.train_step(with_infer_logprobs_from(t, [good, bad]), [1.0, -1.0])
        t.save_checkpoint(tmp_path / "ckpt")
    greedy = AutoModelForCausalLM.from_pretrained(base).generate(torch.tensor([prompt]), max_new_tokens=1,
                                                                 do_sample=False)
    assert greedy[0, -1] != taught, "the base model must not answer it already"

    script = tmp_path / "serve.py"
    script.write_text(SERVE_IN_VLLM)
    # A session of its own, so that a timeout kills vLLM's engine processes too.
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "ckpt"), json.dumps(prompt)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=840)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 0, stderr[-4000:]
    tokens = json.loads(next(line for line in stdout.splitlines() if line.startswith("TOKENS"))[6:])
    assert tokens == [taught] * 6


def with_infer_logprobs_from(t: Trainer, trajs: list[Trajectory]) -> list[Trajectory]:
    for traj, logp in zip(trajs, t.response_logprobs(trajs)):
        traj.infer_logprobs = logp
    return trajs


def test_loading_something_that_is_not_a_checkpoint_fails_clearly(tiny):
    with trainer(TrainerConfig(model_path=tiny)) as t, pytest.raises(FileNotFoundError, match="not a trainer"):
        t.load_checkpoint(tiny)


# -- learning ---------------------------------------------------------------------------------


def test_reward_rises_on_an_easy_task(tmp_path):
    """Reward = share of response tokens equal to one target token. A tiny random model
    (vocabulary 16, so the target starts at about 1/16) samples its own responses with
    torch and learns from them through the trainer; the sampler takes the trainer's
    weights before every step, as an engine would."""
    vocab, target, group, prompts, length = 16, 3, 8, 4, 12
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    sampler = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    rewards = []
    with trainer(TrainerConfig(model_path=str(tmp_path / "model"), lr=1e-2, weights_dtype="fp32")) as t:
        for step in range(12):
            sampler.load_state_dict(dict(t.named_weights()), strict=False)
            prompt = torch.randint(2, vocab, (prompts, 4), generator=g)
            ids, logps = prompt.repeat_interleave(group, 0), []
            with torch.no_grad():
                for _ in range(length):
                    logp = sampler(input_ids=ids).logits[:, -1].float().log_softmax(-1)
                    token = torch.multinomial(logp.exp(), 1, generator=g)
                    logps.append(logp.gather(-1, token))
                    ids = torch.cat([ids, token], dim=1)
            response, logp = ids[:, 4:], torch.cat(logps, dim=1)
            batch = [
                Trajectory(traj_id=step * 100 + i, group_id=step * 100 + i // group, prompt_id=str(i // group),
                           sample_index=i % group, prompt_tokens=prompt[i // group].tolist(),
                           response_tokens=response[i].tolist(), infer_logprobs=logp[i].tolist(),
                           versions=[step] * length, reward=float((response[i] == target).float().mean()),
                           finish_reason=FinishReason.LENGTH)
                for i in range(prompts * group)
            ]
            metrics = t.train_step(batch)
            assert metrics["mismatch_abs_max"] < 1e-4  # same weights, same precision
            rewards.append(metrics["reward_mean"])
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.3, f"reward did not rise: {[round(r, 2) for r in rewards]}"


# -- data parallelism across processes --------------------------------------------------------


# Not marked slow (7-8 s alone, 17-32 s seen on loaded cores): one fp32 rank runs unsharded, so this is the
# fast selection's only check of FSDP2, the path of every multi-rank and every bf16 trainer.
async def test_two_fsdp_ranks_make_the_same_update_as_one(tiny, reference, system):
    """Two ranks in two processes (FSDP2 over gloo) against one rank here, on a batch that
    splits unevenly (3 and 2 sequences, 2 and 1 micro-batches, so one rank runs a
    placeholder pass): the same loss, gradient norm, metrics and new weights. A wrong loss
    normalisation across ranks would change the loss and the gradient norm. Then the
    weights reach engines, through the broadcast group and through actor messages, while
    both ranks gather."""
    from asystem.weights import BucketPlan, WeightGroup, WeightReceiver, WeightSyncSpec

    dev = device()
    if dev.type == "cuda" and torch.cuda.device_count() < 3:
        pytest.skip("on CUDA this needs 3 GPUs: NCCL puts each rank (2 trainer, 1 engine) on its own")
    config = TrainerConfig(model_path=tiny, lr=1e-3, micro_batch_tokens=24)
    batch = with_infer_logprobs(reference, make_batch([12, 2, 7, 9, 4], seed=3), noise=0.3)
    batch[0].infer_logprobs[3] -= 10.0  # one token far out of band
    advantages = [1.0, -0.5, 0.3, -1.2, 0.8]
    with trainer(config) as one:
        expected = one.train_step(batch, advantages)
        expected_w = weights(one)

    cores = sorted(os.sched_getaffinity(0))
    pins = [cores[:1], cores[-1:]]  # each rank on a core of its own (one shared on a 1-core host)
    group = await TrainerGroup.start(system, config, world_size=2, timeout_s=120, cpu_cores=pins)
    try:
        info = await group.info()
        assert [i["rank"] for i in info] == [0, 1]
        assert [i["cpu_cores"] for i in info] == pins
        assert info[0]["glibc_tunables"] == os.environ.get("GLIBC_TUNABLES", TUNABLES)
        assert sum(i["local_parameters"] for i in info) == info[0]["parameters"] > info[0]["local_parameters"]
        initial = await group.gather_weights("fp32")
        assert max_diff(initial, {k: v for k, v in reference.state_dict().items() if k in initial}) == 0.0

        got = await group.train_step(batch, advantages, timeout=120)
        for key in ("loss", "grad_norm", "masked_frac", "mismatch_abs_mean", "mismatch_abs_max", "kl_k3",
                    "clip_frac", "entropy"):
            assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
        assert got["masked_frac"] > 0
        assert (got["tokens"], got["sequences"], got["version"]) == (34, 5, 1)
        assert max_diff(await group.gather_weights("fp32"), expected_w) < 1e-6

        spec = WeightSyncSpec("127.0.0.1", free_port(), world_size=2, backend=collective_backend(dev), timeout_s=60)
        joined = asyncio.to_thread(WeightGroup.join, spec, 1, torch.device("cuda", 2) if dev.type == "cuda" else None)
        _, engine_side = await asyncio.gather(group.join_weight_group(spec.to_dict()), joined)
        plan = await group.weight_plan(bucket_bytes=1 << 20)
        receiver = WeightReceiver(engine_side)
        sent, received = await asyncio.gather(
            group.broadcast_weights(plan, timeout=60),
            asyncio.to_thread(receiver.receive, BucketPlan.from_dict(plan), 60))
        engine_side.close()
        assert sent["version"] == 1
        served = await group.gather_weights()  # bf16, as the engines take them
        assert {n for n, _ in received} == set(served)
        assert all(torch.equal(t.cpu(), served[n].cpu()) for n, t in received)

        # The other path: rank 0 asks an engine actor (here, in this process) bucket by bucket.
        engine = await system.spawn(StagingEngine)
        plan = await group.weight_plan()  # the device's default bucket size
        pushed = await group.push_weights([engine], plan, timeout=60)
        committed = await engine.ask("weights", timeout=10)
        assert pushed["version"] == 1 and committed.keys() == served.keys()
        assert all(torch.equal(t, served[n]) for n, t in committed.items())
    finally:
        await group.stop()


class StagingEngine(Actor):
    """What an engine does with weights pushed through actor messages: stage, then commit."""

    def __init__(self):
        from asystem.weights import WeightStaging

        self.staging = WeightStaging()
        self.committed: dict[str, torch.Tensor] = {}

    async def load_weight_bucket(self, version, index, plan, buffer) -> None:
        self.staging.add(version, index, buffer, plan)

    async def commit_weights(self, version) -> None:
        self.committed = {name: t.clone() for name, t in self.staging.commit(version)}

    async def weights(self) -> dict:
        return self.committed

