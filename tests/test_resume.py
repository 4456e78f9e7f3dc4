"""Resume after a real crash: a training process killed with SIGKILL after a checkpoint, then started again with the
same command, must log the same losses at every later step as a run that was never interrupted.

The run crosses an epoch boundary (10 samples, batch 1, 2x accumulation: 5 optimizer steps per epoch), so the data
position, the shuffling RNG, the optimizer and the scheduler all have to come back from the checkpoint.
"""
import os, subprocess, sys
from pathlib import Path

import pytest

from latentcot.trainer import latest_checkpoint, read_metrics

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 8, 3
CMD = [sys.executable, "-m", "latentcot.train", "--stage", "stage1", "--max_steps", str(STEPS), "--save_every", str(EVERY),
       "--bsz", "1", "--grad_accum_steps", "2", "--limit", "10", "--learning_rate", "1e-3", "--report_to", "none",
       "--quiet", "--seed", "11"]
ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train(out: Path) -> str:
    r = subprocess.run(CMD + ["--output_dir", str(out)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"training failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r.stdout


def _losses(out: Path) -> dict:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl")}


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_losses(tmp_path, kill_after_first_checkpoint):
    ref, crash = tmp_path / "uninterrupted", tmp_path / "killed"
    assert "resuming" not in _train(ref)
    want = _losses(ref)
    assert sorted(want) == list(range(1, STEPS + 1))

    ckpt = kill_after_first_checkpoint(CMD + ["--output_dir", str(crash)], crash, cwd=ROOT, env=ENV)
    done_before = _losses(crash)
    assert ckpt.name == f"step_{EVERY:07d}" and max(done_before) < STEPS, (ckpt, sorted(done_before))

    log = _train(crash)  # the same command again: resumes from the newest complete checkpoint
    assert f"resuming from {ckpt} (step {EVERY}," in log, log[-2000:]  # it resumed rather than starting over
    got = _losses(crash)
    assert sorted(got) == list(range(1, STEPS + 1)), sorted(got)  # no step lost, none logged twice
    for s in range(1, STEPS + 1):
        assert abs(got[s] - want[s]) < 1e-6, f"step {s}: resumed {got[s]} vs uninterrupted {want[s]}"
    assert (crash / "final" / "model.safetensors").exists()
