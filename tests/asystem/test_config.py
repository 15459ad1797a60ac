"""The job configuration: YAML plus overrides, strictly checked."""

from __future__ import annotations

import re

import pytest

from asystem.config import ConfigError, load_config, to_dict
from asystem.train_config import TrainConfig


def test_defaults_are_the_main_job():
    config = load_config(TrainConfig)
    assert config.model.path == "smollm2"
    assert config.scheduler.kind == "c3po"
    assert config.task.source["name"] == "basic_arithmetic"


def test_yaml_and_overrides_compose(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("rollout:\n  workers: 2\n  group_size: 4\nrun:\n  steps: 5\n")
    config = load_config(TrainConfig, path, ["run.steps=7", "trainer.lr=1e-5", "run.minutes=null",
                                             "scheduler.token_budget=512"])
    assert config.rollout.workers == 2 and config.rollout.group_size == 4
    assert config.run.steps == 7 and config.run.minutes is None
    assert config.trainer["lr"] == 1e-5
    assert config.scheduler.token_budget == 512
    assert isinstance(config.run.minutes, type(None))


def test_an_override_inside_a_default_dict_changes_one_key():
    config = load_config(TrainConfig, None, ["task.source.verifier=pkg.mod:fn", "task.source.config.min_digits=2",
                                             "trainer.micro_batch_tokens=1024"])
    assert config.task.source["verifier"] == "pkg.mod:fn"
    assert config.task.source["name"] == "basic_arithmetic" and config.task.source["config"]["min_digits"] == 2
    assert config.trainer == {**TrainConfig().trainer, "micro_batch_tokens": 1024}  # lr and dtype kept
    # A whole mapping still replaces the default.
    assert load_config(TrainConfig, None, ["task.source={kind: jsonl, path: a.jsonl}"]).task.source == {
        "kind": "jsonl", "path": "a.jsonl"}


def test_int_where_float_is_expected_is_accepted():
    config = load_config(TrainConfig, None, ["rollout.temperature=1"])
    assert config.rollout.temperature == 1.0 and isinstance(config.rollout.temperature, float)


@pytest.mark.parametrize("override, message", [
    ("rollout.wrokers=2", "rollout: unknown key(s) ['wrokers']"),
    ("rollout.workers=two", "rollout.workers: expected int, got str 'two'"),
    ("rollout.workers=true", "rollout.workers: expected int, got bool"),
    ("run=3", "run: expected a mapping"),
    ("noequals", "expected key=value"),
])
def test_bad_config_names_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(TrainConfig, None, [override])


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top"):
        load_config(TrainConfig, path)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(TrainConfig, tmp_path / "missing.yaml")


def test_round_trip_through_plain_data():
    config = load_config(TrainConfig, None, ["rollout.workers=3"])
    from asystem.config import from_dict
    assert from_dict(TrainConfig, to_dict(config)) == config


def test_the_scheduler_section_reaches_the_scheduler():
    from asystem.job import make_scheduler

    config = load_config(TrainConfig, None, ["scheduler.infer_capacity=32", "scheduler.train_capacity=48",
                                             "scheduler.retention_limit=3"])
    scheduler = make_scheduler(config).config
    assert (scheduler.infer_capacity, scheduler.train_capacity, scheduler.retention_limit) == (32, 48, 3)
    assert make_scheduler(load_config(TrainConfig)).config.train_capacity == 96  # "auto": 1.5 x 64
    assert make_scheduler(load_config(TrainConfig, None, ["scheduler.infer_capacity=10"])).config.train_capacity == 15
    report = load_config(TrainConfig, None, ["scheduler.train_capacity=null"])
    assert make_scheduler(report).config.train_capacity is None  # the report's rule
    with pytest.raises(ConfigError, match="scheduler.train_capacity.*'lots'"):
        make_scheduler(load_config(TrainConfig, None, ["scheduler.train_capacity=lots"]))
    with pytest.raises(ConfigError, match="scheduler.train_capacity.*'lots'"):  # unused by sync, still wrong
        make_scheduler(load_config(TrainConfig, None, ["scheduler.kind=sync", "scheduler.train_capacity=lots"]))


@pytest.mark.parametrize("cores, overrides, engines, trainers", [
    (range(2), [], [0], [[1]]),  # this machine: an engine core and a trainer core
    (range(8), ["trainer_ranks=2"], [0, 1, 2, 3], [[4, 5], [6, 7]]),
    (range(4), ["trainer_ranks=3"], [0, 1], [[2, 3]] * 3),  # fewer free cores than ranks: shared
    (range(4), ["rollout.cpu_cores=0,1,2,3"], [0, 1, 2, 3], None),  # nothing left: not pinned
    (range(4), ["rollout.cpu_cores=all"], None, None),
    (range(1), [], None, None),
])
def test_cpu_jobs_pin_engines_and_trainer_ranks_to_their_own_cores(monkeypatch, cores, overrides, engines,
                                                                  trainers):
    from asystem import job

    monkeypatch.setattr(job.os, "sched_getaffinity", lambda pid: set(cores))
    monkeypatch.setattr("asystem.device.on_gpu", lambda: False)  # the rule for CPU jobs, on any host
    config = load_config(TrainConfig, None, overrides)
    assert job.engine_cores(config) == engines
    assert job.trainer_cores(config) == trainers
    if trainers is not None and len(trainers) > 1 and trainers[0] != trainers[1]:
        assert job.trainer_threads(config) == len(trainers[0])
