"""The distributed path: a 2-process CPU run (torchrun, gloo) equals a 1-process run with 2x gradient accumulation.

Both runs see the same samples in the same optimizer steps: accelerate shards each group of 2 consecutive batches
over the 2 processes, and DDP averages their gradients, which is what 2x accumulation does in one process.
"""
import os, subprocess, sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentcot.trainer import read_metrics

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--stage", "stage1", "--max_steps", "3", "--bsz", "1", "--limit", "6", "--learning_rate", "1e-3",
          "--report_to", "none", "--quiet", "--seed", "7"]


def _run(cmd, tmp_path, name):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"{name} failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


@pytest.mark.slow
def test_two_processes_match_one_process_with_accumulation(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "latentcot.train", *COMMON, "--grad_accum_steps", "2", "--output_dir", str(one)], tmp_path, "1-process run")
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
          "-m", "latentcot.train", *COMMON, "--grad_accum_steps", "1", "--output_dir", str(two)], tmp_path, "2-process run")
    # the last checkpoint holds every rank's RNG state (rank 0 renames step_*.tmp only after all ranks wrote into it)
    ckpt = two / "checkpoints" / "step_0000003"
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in ckpt.iterdir()}, sorted(ckpt.iterdir())
    assert not list((two / "checkpoints").glob("*.tmp"))
    m1, m2 = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == [1, 2, 3]
    for a, b in zip(m1, m2):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a["loss"], b["loss"])
    w1, w2 = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    assert w1.keys() == w2.keys()
    changed = 0
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    base_changed = [k for k in w1 if "lm_head" in k]
    assert base_changed, "expected lm_head weights in the checkpoint"
