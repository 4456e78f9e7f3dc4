"""LLaDA-MeanFlow drivers (seed 003): Lightning's Trainer (fast_dev_run) and the accelerate entry point share
`meanflow_step`; `python -m latentcot.meanflow` trains and saves a soft prompt."""
import os, subprocess, sys
from pathlib import Path

import pytest
import torch

import latentcot.meanflow as mf

QUICK = mf.TeacherRecipe(hidden=32, layers=2, heads=2, intermediate=64, steps=5, batch=8)


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    torch.set_num_threads(1)  # tiny ops: one thread avoids oversubscription when tests run in parallel
    cache = tmp_path_factory.mktemp("cache")
    teacher, tok, info = mf.get_teacher(QUICK, cache_dir=cache, log=None)
    return teacher, tok, mf.load_text_sets(tok, QUICK.canvas), cache


@pytest.fixture
def count_steps(monkeypatch):
    calls = []
    real = mf.meanflow_step
    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(mf, "meanflow_step", counted)
    return calls


def test_lightning_fast_dev_run(kit, tmp_path, count_steps):
    import lightning.pytorch as pl
    teacher, tok, sets, _ = kit
    student = mf.MeanFlowStudent(teacher, prompt_length=4)
    cfg = mf.MeanFlowConfig(batch=4, lr=1e-2)
    module = mf.meanflow_lightning_module(student, cfg)
    assert isinstance(module, pl.LightningModule)
    loader = torch.utils.data.DataLoader(mf.distill_batches(sets, cfg, 2), batch_size=4)
    prompt0 = {k: v.clone() for k, v in student.prompt.state_dict().items()}
    base0 = {k: v.clone() for k, v in student.backbone.state_dict().items()}
    trainer = pl.Trainer(fast_dev_run=True, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, loader)
    assert trainer.state.finished and trainer.global_step == 1
    assert len(count_steps) == 1  # the Lightning step is meanflow_step
    assert any(not torch.equal(prompt0[k], v) for k, v in student.prompt.state_dict().items())
    assert all(torch.equal(base0[k], v) for k, v in student.backbone.state_dict().items())  # base frozen
    assert not student.backbone.training  # the base stays in eval mode under Lightning's .train()


def test_accelerate_loop_uses_the_same_step(kit, count_steps):
    teacher, tok, sets, _ = kit
    student = mf.MeanFlowStudent(teacher, prompt_length=4)
    hist = mf.train_meanflow(student, sets, mf.MeanFlowConfig(steps=3, batch=4), log=None)
    assert len(hist) == 3 and len(count_steps) == 3
    assert student.prompt.gate.abs().sum() > 0


def test_cli_help():
    r = subprocess.run([sys.executable, "-m", "latentcot.meanflow", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--tangent-sign" in r.stdout and "--trust-remote-code" in r.stdout


def test_cli_train_and_save(kit, tmp_path):
    teacher, tok, sets, cache = kit
    tdir = next(Path(cache).glob("meanflow-teacher-*"))
    env = {**os.environ, "LATENTCOT_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "latentcot.meanflow", "--teacher", str(tdir), "--out", str(tmp_path / "s"),
                        "--steps", "2", "--batch", "4", "--prompt-length", "3"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    s = mf.load_student(teacher, tmp_path / "s")
    assert s.prompt.shape == (teacher.num_layers, 2, teacher.num_kv_heads, 3, teacher.head_dim)


def test_cli_sampler_target(kit, tmp_path):
    "--target sampler draws the teacher's samples first (the labels), then distils: the whole module must be defined by then."
    teacher, tok, sets, cache = kit
    tdir = next(Path(cache).glob("meanflow-teacher-*"))
    env = {**os.environ, "LATENTCOT_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "latentcot.meanflow", "--teacher", str(tdir), "--out", str(tmp_path / "s"), "--steps", "2",
                        "--batch", "4", "--prompt-length", "3", "--target", "sampler", "--sampler-rows", "4", "--sampler-steps", "2"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    meta = mf.json.loads((tmp_path / "s" / "meanflow.json").read_text())
    assert (meta["config"]["target"], meta["config"]["sampler_rows"], meta["config"]["sampler_steps"]) == ("sampler", 4, 2)
    r = subprocess.run([sys.executable, "-m", "latentcot.meanflow", "--teacher", str(tdir), "--out", str(tmp_path / "m"),
                        "--target", "sampler", "--loss", "mse"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and "use loss kl or ce" in r.stderr


def test_cli_llada_needs_the_flag(tmp_path):
    r = subprocess.run([sys.executable, "-m", "latentcot.meanflow", "--out", str(tmp_path), "--llada", "GSAI-ML/LLaDA-8B-Base"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "pass trust_remote_code=True" in r.stderr
