"""A trial's own checkpoint store (Train's local mode inside Tune): bounded, crash-safe, resumable."""

from __future__ import annotations

from pathlib import Path

from protscale.train.checkpoint import KEEP, TrialStore


def _write(tmp: Path, step: int) -> str:
    d = tmp / f"local-{step}"
    (d / "ckpt").mkdir(parents=True)
    (d / "ckpt" / "state.bin").write_bytes(bytes([step]) * 1000)
    (d / "trial_state.json").write_text(f'{{"step": {step}}}')
    return str(d)


def test_store_keeps_the_latest_and_resumes_from_the_newest_complete(tmp_path):
    root = tmp_path / "runs" / "trial-abc"
    store = TrialStore(str(root))
    assert store.latest() is None                         # a fresh trial starts from scratch
    for step in (10, 20, 30, 40):
        store.persist(_write(tmp_path, step), step)
        kept = sorted(p.name for p in root.glob("checkpoint_*"))
        assert len(kept) == min(KEEP, step // 10), kept   # bounded however long the trial runs
    with store.latest().as_directory() as d:
        assert (Path(d) / "trial_state.json").read_text() == '{"step": 40}'
        assert (Path(d) / "ckpt" / "state.bin").read_bytes() == bytes([40]) * 1000

    # A crash while step 50 was being copied: no marker, so it is not resumed from, and the next
    # checkpoint clears it away.
    (root / "checkpoint_000000050" / "ckpt").mkdir(parents=True)
    assert "checkpoint_000000040" in TrialStore(str(root)).latest().path
    store.persist(_write(tmp_path, 60), 60)
    assert sorted(p.name for p in root.glob("checkpoint_*")) == ["checkpoint_000000040", "checkpoint_000000060"]


def test_a_marker_without_the_trial_state_is_not_resumed_from(tmp_path):
    """A checkpoint folder holding only its marker (a full disk let the 0-byte marker through) is skipped:
    the trial resumes from the last checkpoint it can read."""
    root = tmp_path / "runs" / "trial-abc"
    store = TrialStore(str(root))
    store.persist(_write(tmp_path, 8), 8)
    (root / "checkpoint_000000016").mkdir()
    (root / "checkpoint_000000016" / TrialStore.MARKER).write_bytes(b"")
    assert "checkpoint_000000008" in store.latest().path


def test_a_copy_that_comes_up_short_is_an_error_and_leaves_no_marker(tmp_path, monkeypatch):
    import pyarrow.fs as pafs
    import pytest

    root = tmp_path / "runs" / "trial-abc"
    store = TrialStore(str(root))
    real = pafs.copy_files

    def lossy(src, dst, **kw):                        # a destination that silently drops one file
        real(src, dst, **kw)
        (Path(dst) / "trial_state.json").unlink()

    monkeypatch.setattr(pafs, "copy_files", lossy)
    with pytest.raises(OSError, match="1 of 2 checkpoint file"):
        store.persist(_write(tmp_path, 8), 8)
    assert not (root / "checkpoint_000000008").exists() and store.latest() is None   # nothing half-written left
