"""Job checkpoints: visible only when complete, newest found, older pruned."""

from __future__ import annotations

from asystem import checkpoint


def test_commit_makes_the_newest_visible_and_prunes(tmp_path):
    assert checkpoint.latest(tmp_path) is None
    for step in (1, 2, 3):
        tmp = checkpoint.begin(tmp_path, step)
        checkpoint.write_state(tmp, {"step": step, "pool": [[1, 2.5, None]]})
        final = checkpoint.commit(tmp, step, keep=2)
        assert checkpoint.latest(tmp_path) == final
    names = sorted(p.name for p in checkpoint.checkpoints_dir(tmp_path).glob("step-*"))
    assert names == ["step-000002", "step-000003"]
    assert checkpoint.read_state(checkpoint.latest(tmp_path)) == {"step": 3, "pool": [[1, 2.5, None]]}


def test_a_checkpoint_killed_while_writing_is_never_latest(tmp_path):
    tmp = checkpoint.begin(tmp_path, 1)
    checkpoint.write_state(tmp, {"step": 1})
    checkpoint.commit(tmp, 1)
    half = checkpoint.begin(tmp_path, 2)  # the job dies before commit
    (half / "trainer").mkdir()
    assert checkpoint.latest(tmp_path).name == "step-000001"
    tmp3 = checkpoint.begin(tmp_path, 3)
    checkpoint.write_state(tmp3, {"step": 3})
    checkpoint.commit(tmp3, 3)
    assert not list(checkpoint.checkpoints_dir(tmp_path).glob("*.tmp-*")), "stale temp dirs are cleaned"
