"""Trajectory and Prompt: appending tokens, and the plain-data form a codec carries."""

import msgpack
import pytest

from ring.trajectory import FinishReason, Prompt, Trajectory


def make_traj(**overrides) -> Trajectory:
    fields = dict(traj_id=7, group_id=2, prompt_id="gsm8k/13", sample_index=1, prompt_tokens=[101, 102])
    return Trajectory(**(fields | overrides))


def test_append_records_each_tokens_version_and_logprob():
    traj = make_traj()
    traj.append([5, 6], [-0.1, -0.2], version=3)
    traj.append([7], [-0.3], version=4)
    assert traj.response_tokens == [5, 6, 7]
    assert traj.infer_logprobs == [-0.1, -0.2, -0.3]
    assert traj.versions == [3, 3, 4]
    assert traj.num_response_tokens == 3
    assert traj.versions_spanned() == [3, 4]


def test_append_rejects_older_version_mismatched_lengths_and_finished():
    traj = make_traj()
    traj.append([5], [-0.1], version=3)
    with pytest.raises(ValueError, match="older"):
        traj.append([6], [-0.1], version=2)
    with pytest.raises(ValueError, match="logprobs"):
        traj.append([6, 7], [-0.1], version=3)
    traj.finish_reason = FinishReason.EOS
    with pytest.raises(ValueError, match="after finish"):
        traj.append([6], [-0.1], version=3)
    assert traj.response_tokens == [5]


def test_dict_round_trip_through_msgpack_is_exact():
    traj = make_traj(reward=1.0, retention=2)
    traj.append([5, 6], [-0.25, -1.5], version=0)
    traj.finish_reason = FinishReason.LENGTH
    data = traj.to_dict()
    wire = msgpack.unpackb(msgpack.packb(data))
    assert wire == data
    assert Trajectory.from_dict(wire) == traj
    assert data["finish_reason"] == "length"  # plain str on the wire, not an enum


def test_to_dict_holds_only_plain_types():
    traj = make_traj(reward=0.5)
    traj.append([1], [-0.5], version=0)
    traj.finish_reason = FinishReason.EOS

    def plain(x):
        if isinstance(x, dict):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        if isinstance(x, list):
            return all(plain(v) for v in x)
        return x is None or type(x) in (str, int, float)

    assert plain(traj.to_dict())


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("response_tokens", [1, "2"], r"response_tokens\[1\]: expected int"),
        ("prompt_tokens", [True], r"prompt_tokens\[0\]: expected int"),
        ("traj_id", 1.0, "traj_id: expected int"),
        ("finish_reason", "stop", "finish_reason: expected one of"),
        ("retention", -1, "retention: expected >= 0"),
        ("reward", "1", "reward: expected float"),
        ("versions", [0], "lengths"),
    ],
)
def test_from_dict_names_the_bad_field(field, value, message):
    data = make_traj().to_dict() | {field: value}
    with pytest.raises(ValueError, match=message):
        Trajectory.from_dict(data)


def test_from_dict_rejects_missing_or_unknown_keys_and_decreasing_versions():
    data = make_traj().to_dict()
    with pytest.raises(ValueError, match="missing keys \\['reward'\\]"):
        Trajectory.from_dict({k: v for k, v in data.items() if k != "reward"})
    with pytest.raises(ValueError, match="unknown keys \\['extra'\\]"):
        Trajectory.from_dict(data | {"extra": 1})
    bad = data | {"response_tokens": [1, 2], "infer_logprobs": [0.0, 0.0], "versions": [2, 1]}
    with pytest.raises(ValueError, match="never decrease"):
        Trajectory.from_dict(bad)


def test_from_dict_accepts_integer_logprobs_from_lossy_codecs():
    data = make_traj().to_dict() | {"response_tokens": [1], "infer_logprobs": [0], "versions": [0]}
    assert Trajectory.from_dict(data).infer_logprobs == [0.0]


def test_prompt_round_trip_and_is_immutable():
    prompt = Prompt("p1", [1, 2, 3])
    assert Prompt.from_dict(msgpack.unpackb(msgpack.packb(prompt.to_dict()))) == prompt
    assert prompt.tokens == (1, 2, 3)
    with pytest.raises(ValueError, match="Prompt.tokens"):
        Prompt.from_dict({"prompt_id": "p", "tokens": [1.5]})
