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


# ---- the latent stages through LatentCoTModel: DDP and FSDP2 (accelerate config) against 1 process x 2 accumulation
LATENT_COMMON = ["--max_steps", "3", "--bsz", "1", "--limit", "6", "--learning_rate", "1e-3", "--report_to", "none",
                 "--quiet", "--seed", "7", "--latent_budget_alpha", "0.5"]
STAGE_FLAGS = {"stage2": ["--stage", "stage2"],
               "stage3_C": ["--stage", "stage3", "--latent_mode_stage", "C", "--latent_stop_threshold_start", "0.9",
                            "--latent_stop_threshold_steps", "2"]}
FSDP_CONFIG = ROOT / "configs" / "accelerate" / "fsdp_cpu_2proc.yaml"


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher") / "teacher"
    _run([sys.executable, "-m", "latentcot.precompute_teacher_latents", "--output_dir", str(d), "--limit", "6",
          "--batch_size", "2", "--quiet", "--latent_budget_alpha", "0.5"], d.parent, "precompute")
    return d


def _launch(kind, flags, out, port):
    "One training run: 1 process with 2x accumulation, 2 processes under DDP (torchrun) or FSDP2 (accelerate config)."
    if kind == "one": return [sys.executable, "-m", "latentcot.train", *flags, "--grad_accum_steps", "2", "--output_dir", str(out)]
    if kind == "ddp": head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    else: head = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG), "--main_process_port", str(port)]
    return [*head, "-m", "latentcot.train", *flags, "--grad_accum_steps", "1", "--output_dir", str(out)]


def _same_run(a, b, what, atol=1e-5):
    "Same losses at every step and the same final weights (and stop head) within `atol`."
    ma, mb = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    assert [r["step"] for r in ma] == [r["step"] for r in mb], what
    for ra, rb in zip(ma, mb):
        for k in ("loss", "ce", "alignment", "stop", "cost"):
            if k in ra: assert abs(ra[k] - rb[k]) < atol, (what, ra["step"], k, ra[k], rb[k])
    for f in ("model.safetensors", "latent_stop_head.safetensors"):
        if not (a / "final" / f).exists(): continue
        wa, wb = load_file(a / "final" / f), load_file(b / "final" / f)
        assert wa.keys() == wb.keys(), what
        for k in wa: torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=1e-4, msg=lambda m: f"{what} {k}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["stage2", "stage3_C"])
def test_latent_stages_ddp_and_fsdp_match_one_process(stage, teacher_dir, tmp_path):
    flags = [*STAGE_FLAGS[stage], *LATENT_COMMON, "--teacher_latent_dir", str(teacher_dir)]
    runs = {k: tmp_path / k for k in ("one", "ddp", "fsdp")}
    for i, (k, out) in enumerate(runs.items()): _run(_launch(k, flags, out, 29540 + i), tmp_path, f"{stage} {k}")
    m1 = read_metrics(runs["one"] / "metrics.jsonl")
    assert all(r["alignment"] > 0 for r in m1[1:]) and (stage != "stage3_C" or all("stop" in r for r in m1))
    if stage == "stage3_C": assert (runs["one"] / "final" / "latent_stop_head.safetensors").exists()
    _same_run(runs["one"], runs["ddp"], f"{stage}: DDP vs 1 process")
    _same_run(runs["one"], runs["fsdp"], f"{stage}: FSDP vs 1 process")


@pytest.mark.slow
def test_fsdp_run_stopped_midway_resumes_to_the_same_losses(teacher_dir, tmp_path):
    flags = [*STAGE_FLAGS["stage3_C"], *LATENT_COMMON, "--teacher_latent_dir", str(teacher_dir)]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _run(_launch("fsdp", flags, whole, 29550), tmp_path, "FSDP whole run")
    i = flags.index("--max_steps")
    _run(_launch("fsdp", flags[:i] + ["--max_steps", "2"] + flags[i + 2:], cut, 29551), tmp_path, "FSDP first 2 steps")
    res = _run(_launch("fsdp", flags, cut, 29552), tmp_path, "FSDP resumed")
    assert "resuming from" in res.stdout + res.stderr
    _same_run(whole, cut, "FSDP resumed vs whole")


@pytest.mark.slow
def test_fsdp_run_killed_midway_resumes_to_the_same_losses(teacher_dir, tmp_path, kill_after_first_checkpoint):
    "SIGKILL of the whole FSDP launch (launcher and both ranks) right after its first checkpoint; the rerun resumes."
    flags = [*STAGE_FLAGS["stage3_C"], *LATENT_COMMON, "--teacher_latent_dir", str(teacher_dir), "--save_every", "1"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    _run(_launch("fsdp", flags, whole, 29560), tmp_path, "FSDP whole run")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    ckpt = kill_after_first_checkpoint(_launch("fsdp", flags, killed, 29561), killed, cwd=ROOT, env=env)
    assert ckpt is not None and not (killed / "final").exists()
    res = _run(_launch("fsdp", flags, killed, 29562), tmp_path, "FSDP resumed after the kill")
    assert "resuming from" in res.stdout + res.stderr
    _same_run(whole, killed, "FSDP killed and resumed vs whole")
