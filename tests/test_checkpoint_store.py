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
