"""LLaDA-MeanFlow drivers (seed 003): Lightning's Trainer (fast_dev_run) and the accelerate entry point share
`meanflow_step`; `python -m latentcot.meanflow` trains and saves a soft prompt."""
import json, math, os, subprocess, sys
from pathlib import Path

import pytest
import torch

import latentcot.meanflow as mf
import latentcot.meanflow_train as mft

QUICK = mf.TeacherRecipe(hidden=32, layers=2, heads=2, intermediate=64, steps=5, batch=8)


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    torch.set_num_threads(1)  # tiny ops: one thread avoids oversubscription when tests run in parallel
    cache = tmp_path_factory.mktemp("cache")
    teacher, tok, info = mf.get_teacher(QUICK, cache_dir=cache, log=None)
    return teacher, tok, mf.load_text_sets(tok, QUICK.canvas), cache


def _cli(cache, **env):
    "The cached quick teacher's directory and the environment for `python -m latentcot.meanflow` runs on it."
    return next(Path(cache).glob("meanflow-teacher-*")), {**os.environ, "LATENTCOT_CACHE": str(cache), "OMP_NUM_THREADS": "1", **env}


@pytest.fixture
def count_steps(monkeypatch):
    calls = []
    real = mft.meanflow_step
    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(mft, "meanflow_step", counted)  # where both drivers look it up
    return calls


@pytest.mark.parametrize("fit", [None, "imle", "posterior"])
def test_lightning_fast_dev_run(kit, tmp_path, count_steps, fit):
    "One Lightning step is one meanflow_step; a noise student (IMLE, or a posterior, on 4 teacher samples) trains through it unchanged."
    import lightning.pytorch as pl
    teacher, tok, sets, _ = kit
    # ratio_r_neq_t=1: every row has r < t, so every row trains at a picked or posterior z (rows with r = t get z = 0)
    noise = {"target": "sampler", "noise_dim": 3, "noise_candidates": 2, "noise_fit": fit, "sampler_rows": 4, "sampler_steps": 2,
             "ratio_r_neq_t": 1.0} if fit else {}
    cfg = mf.MeanFlowConfig(batch=4, lr=1e-2, prompt_length=4, **noise)
    student = mf.make_student(teacher, cfg, sets)
    assert (student.prompt.posterior is not None) == (fit == "posterior")
    if fit:
        with torch.no_grad(): student.prompt.gate.fill_(0.5)  # an open gate, so the first step's gradient reaches the noise projection
    module = mf.meanflow_lightning_module(student, cfg)
    assert isinstance(module, pl.LightningModule)
    loader = torch.utils.data.DataLoader(mf.distill_batches(sets, cfg, 2, backbone=teacher), batch_size=4)
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
    if fit: assert not torch.equal(prompt0["noise.weight"], student.prompt.noise.weight)  # trained through the chosen z
    if fit == "posterior":  # the encoder's last layer (zero at init) trained through the reparameterised z
        assert student.prompt.posterior.net[3].weight.abs().sum() > 0


def test_accelerate_loop_uses_the_same_step(kit, count_steps):
    teacher, tok, sets, _ = kit
    student = mf.MeanFlowStudent(teacher, prompt_length=4)
    hist = mf.train_meanflow(student, sets, mf.MeanFlowConfig(steps=3, batch=4), log=None)
    assert len(hist) == 3 and len(count_steps) == 3
    assert student.prompt.gate.abs().sum() > 0


def _stopped_and_resumed(train, teacher, sets, cfg, out, stop):
    """`train` (a driver with `out_dir`) stopped after step `stop` and run again on a fresh student: the losses of the
    resumed segment and the student it ends with."""
    first = train(mf.make_student(teacher, cfg, sets), out, stop)
    assert len(first) == stop
    resumed = mf.make_student(teacher, cfg, sets)  # its soft prompt comes from the checkpoint
    return train(resumed, out, None), resumed


@pytest.mark.parametrize("target", ["jvp", "sampler"])
def test_lightning_and_accelerate_train_alike(kit, tmp_path, target):
    """The Lightning driver and the accelerate loop give the same losses for the same seed over 20 steps (the same
    rows, times and masks, warm-up, clipping and optimiser), and end with the same soft prompt. Each, stopped at step
    10 and resumed from its checkpoint (Lightning: `ModelCheckpoint` and `fit(ckpt_path=...)`; accelerate:
    `save_state` with the scheduler and prompt registered for checkpointing), logs the same losses at steps 11-20 as
    its uninterrupted run."""
    import shutil
    teacher, tok, sets, _ = kit
    extra = {"target": "sampler", "sampler_rows": 8, "sampler_steps": 2} if target == "sampler" else {}
    cfg = mf.MeanFlowConfig(steps=20, batch=4, prompt_length=3, **extra)
    a, b = mf.make_student(teacher, cfg, sets), mf.make_student(teacher, cfg, sets)
    ha = mf.train_meanflow(a, sets, cfg, log=None)
    hb = mf.train_meanflow_lightning(b, sets, cfg)
    assert len(ha) == len(hb) == 20
    for s, (x, y) in enumerate(zip(ha, hb), 1):  # relative: the jvp target's losses are ~1e-5
        assert abs(x["loss"] - y["loss"]) <= 1e-6 * abs(x["loss"]), f"step {s}: accelerate {x['loss']} vs Lightning {y['loss']}"
    assert len({round(h["loss"], 9) for h in ha}) > 1  # the losses move: the comparison is not between constants
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(a.prompt.parameters(), b.prompt.parameters()))
    assert a.prompt.gate.abs().sum() > 0

    def accelerate_run(student, out, stop):
        hist = mf.train_meanflow(student, sets, cfg, log=None, out_dir=out, save_every=10)
        if stop:  # stopped after step 10's checkpoint: its step-20 checkpoint never written
            shutil.rmtree(out / "checkpoints" / "step_0000020")
            return hist[:stop]
        return hist

    def lightning_run(student, out, stop):
        return mf.train_meanflow_lightning(student, sets, cfg, out_dir=out, save_every=10,
                                           **({"max_steps": stop} if stop else {}))

    for name, train, whole in (("accelerate", accelerate_run, ha), ("Lightning", lightning_run, hb)):
        rest, resumed = _stopped_and_resumed(train, teacher, sets, cfg, tmp_path / name, 10)
        assert [h["loss"] for h in rest] == [h["loss"] for h in whole[10:]], name  # bit for bit
        whole_prompt = (a if whole is ha else b).prompt.state_dict()
        assert all(torch.equal(whole_prompt[k], v) for k, v in resumed.prompt.state_dict().items()), name
    ck = tmp_path / "accelerate" / "checkpoints" / "step_0000020"
    assert {"custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl"} <= {p.name for p in ck.iterdir()}
    assert not (ck / "scheduler_manual.pt").exists()
    saved = torch.load(tmp_path / "Lightning" / "lightning" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 20 and all(k.startswith("student.prompt.") for k in saved["state_dict"])


def test_lightning_resume_refuses_another_student_or_settings(kit, tmp_path):
    "A Lightning run directory resumes only the same run: other settings, or a prompt of another shape, are refused."
    teacher, tok, sets, _ = kit
    cfg = mf.MeanFlowConfig(steps=2, batch=4, prompt_length=3)
    mf.train_meanflow_lightning(mf.make_student(teacher, cfg, sets), sets, cfg, out_dir=tmp_path)
    with pytest.raises(ValueError, match="config.lr: 0.003 there, 0.1 now"):
        mf.train_meanflow_lightning(mf.make_student(teacher, cfg, sets), sets, mf.MeanFlowConfig(steps=2, batch=4, prompt_length=3, lr=0.1),
                                    out_dir=tmp_path)
    with pytest.raises(ValueError, match="mixed_precision: 'no' there, 'bf16-mixed' now"):
        mf.train_meanflow_lightning(mf.make_student(teacher, cfg, sets), sets, cfg, out_dir=tmp_path, precision="bf16-mixed")
    other = mf.MeanFlowStudent(teacher, prompt_length=3, noise_dim=2)
    with pytest.raises(ValueError, match="not this student's: missing \\['student.prompt.noise"):
        mf.train_meanflow_lightning(other, sets, mf.MeanFlowConfig(steps=3, batch=4, prompt_length=3), out_dir=tmp_path)


def test_cli_help():
    r = subprocess.run([sys.executable, "-m", "latentcot.meanflow", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--tangent-sign" in r.stdout and "--trust-remote-code" in r.stdout
    assert "keep only their first token (free lines)" in " ".join(r.stdout.split())  # every setting says what it does


def test_cli_mixed_precision(kit, tmp_path):
    "`accelerate launch --mixed_precision bf16` reaches the loop: the run records it and the saved prompt stays fp32."
    from safetensors.torch import load_file
    teacher, tok, sets, cache = kit
    tdir, env = _cli(cache)
    out = tmp_path / "s"
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
                        "--mixed_precision", "bf16", "--dynamo_backend", "no", "-m", "latentcot.meanflow", "--teacher", str(tdir),
                        "--out", str(out), "--steps", "2", "--batch", "4", "--prompt-length", "3"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "meanflow_run.json").read_text())["mixed_precision"] == "bf16"
    assert {v.dtype for v in load_file(out / "soft_prompt.safetensors").values()} == {torch.float32}
    assert all(math.isfinite(m["loss"]) for m in mf.read_metrics(out / "metrics.jsonl"))


def test_cli_train_and_save(kit, tmp_path):
    teacher, tok, sets, cache = kit
    tdir, env = _cli(cache)
    r = subprocess.run([sys.executable, "-m", "latentcot.meanflow", "--teacher", str(tdir), "--out", str(tmp_path / "s"),
                        "--steps", "2", "--batch", "4", "--prompt-length", "3"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    s = mf.load_student(teacher, tmp_path / "s")
    assert s.prompt.shape == (teacher.num_layers, 2, teacher.num_kv_heads, 3, teacher.head_dim)


def test_cli_sampler_target(kit, tmp_path):
    "--target sampler draws the teacher's samples first (the labels), then distils: the whole module must be defined by then."
    teacher, tok, sets, cache = kit
    tdir, env = _cli(cache)
    r = subprocess.run([sys.executable, "-m", "latentcot.meanflow", "--teacher", str(tdir), "--out", str(tmp_path / "s"), "--steps", "2",
                        "--batch", "4", "--prompt-length", "3", "--target", "sampler", "--sampler-rows", "4", "--sampler-steps", "2"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((tmp_path / "s" / "meanflow.json").read_text())
    assert (meta["config"]["target"], meta["config"]["sampler_rows"], meta["config"]["sampler_steps"]) == ("sampler", 4, 2)
    r = subprocess.run([sys.executable, "-m", "latentcot.meanflow", "--teacher", str(tdir), "--out", str(tmp_path / "m"),
                        "--target", "sampler", "--loss", "mse"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and "use loss kl or ce" in r.stderr


def test_cli_posterior_noise(kit, tmp_path):
    "--noise-fit posterior trains a noise student with its encoder; it is saved and loaded with it, and logs its KL."
    teacher, tok, sets, cache = kit
    tdir, env = _cli(cache)
    r = subprocess.run([sys.executable, "-m", "latentcot.meanflow", "--teacher", str(tdir), "--out", str(tmp_path / "s"), "--steps", "2",
                        "--batch", "4", "--prompt-length", "3", "--target", "sampler", "--sampler-rows", "4", "--sampler-steps", "2",
                        "--noise-dim", "3", "--noise-fit", "posterior", "--noise-beta", "0.5"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    s = mf.load_student(teacher, tmp_path / "s")
    assert s.noise_dim == 3 and s.prompt.posterior.length == QUICK.canvas + 1
    meta = json.loads((tmp_path / "s" / "meanflow.json").read_text())
    assert (meta["config"]["noise_fit"], meta["config"]["noise_beta"], meta["posterior_len"]) == ("posterior", 0.5, QUICK.canvas + 1)
    from latentcot.trainer import read_metrics
    assert all(rec["kl"] >= 0 for rec in read_metrics(tmp_path / "s" / "metrics.jsonl"))
    r = subprocess.run([sys.executable, "-m", "latentcot.meanflow", "--teacher", str(tdir), "--out", str(tmp_path / "m"),
                        "--target", "sampler", "--noise-fit", "posterior"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and "noise_fit='posterior' needs noise_dim > 0" in r.stderr


def test_cli_llada_needs_the_flag(tmp_path):
    r = subprocess.run([sys.executable, "-m", "latentcot.meanflow", "--out", str(tmp_path), "--llada", "GSAI-ML/LLaDA-8B-Base"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "pass trust_remote_code=True" in r.stderr


def _losses(out: Path) -> dict:
    from latentcot.trainer import read_metrics
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl")}


RESUME_ARGS = ["--steps", "40", "--save-every", "5", "--batch", "4", "--prompt-length", "3", "--target", "sampler",
               "--sampler-rows", "8", "--sampler-steps", "2"]


@pytest.mark.slow
def test_cli_killed_run_resumes_to_the_same_losses(kit, tmp_path, kill_after_first_checkpoint):
    "SIGKILL after the first checkpoint, then the same command: it reloads the teacher samples and logs the same losses."
    teacher, tok, sets, cache = kit
    tdir, env = _cli(cache, PYTHONUNBUFFERED="1")
    cmd = lambda out: [sys.executable, "-m", "latentcot.meanflow", "--teacher", str(tdir), "--out", str(out), *RESUME_ARGS]
    ref, crash = tmp_path / "uninterrupted", tmp_path / "killed"
    r = subprocess.run(cmd(ref), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    want = _losses(ref)
    assert sorted(want) == list(range(1, 41))

    ckpt = kill_after_first_checkpoint(cmd(crash), crash, env=env)
    pool = crash / "teacher_samples.rank0.safetensors"
    assert max(_losses(crash)) < 40, "the killed run had already finished"
    drawn = pool.stat().st_mtime_ns

    r = subprocess.run(cmd(crash), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {ckpt}" in r.stdout and f"loaded 8 rows from {pool}" in r.stdout, r.stdout[-2000:]
    assert pool.stat().st_mtime_ns == drawn  # the teacher's samples were not drawn again
    got = _losses(crash)
    assert sorted(got) == list(range(1, 41))  # no step lost, none logged twice
    from latentcot.trainer import read_metrics
    secs = [r["seconds"] for r in read_metrics(crash / "metrics.jsonl")]
    assert all(0 < a <= b for a, b in zip(secs, secs[1:]))  # the clock goes on across the kill: it sums both segments
    assert json.loads((crash / "meanflow.json").read_text())["train_seconds"] == secs[-1]
    for s in range(1, 41):
        assert abs(got[s] - want[s]) < 1e-6, f"step {s}: resumed {got[s]} vs uninterrupted {want[s]}"
    a, b = mf.load_student(teacher, ref), mf.load_student(teacher, crash)
    assert all(torch.equal(x, y) for x, y in zip(a.prompt.state_dict().values(), b.prompt.state_dict().values()))

    r = subprocess.run(cmd(crash)[:-2] + ["--sampler-steps", "3"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode != 0 and "config.sampler_steps: 2 there, 3 now" in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("fit,port", [("imle", 29533), ("posterior", 29534)])
def test_two_processes_train_and_resume(kit, tmp_path, fit, port):
    """2 CPU processes (torchrun, gloo) with a noise student: each rank draws its own teacher samples and noise (IMLE
    candidates, or reparameterised draws from the posterior), the prompts (noise projection and posterior encoder included)
    stay equal, and a resume is exact. The killed-run test above covers noise_dim=0."""
    import shutil
    teacher, tok, sets, cache = kit
    tdir, env = _cli(cache, ACCELERATE_USE_CPU="1")
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), "-m", "latentcot.meanflow",
           "--teacher", str(tdir), "--out", str(out), "--steps", "6", "--save-every", "3", "--batch", "4", "--prompt-length", "3",
           "--target", "sampler", "--sampler-rows", "8", "--sampler-steps", "2", "--noise-dim", "2", "--noise-candidates", "3", "--noise-fit", fit]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]  # includes the check that both ranks hold the same prompt
    pools = [out / f"teacher_samples.rank{k}.safetensors" for k in (0, 1)]
    from safetensors.torch import load_file
    x0, x1 = (load_file(p)["x0"] for p in pools)
    assert x0.shape == x1.shape == (8, 65) and not torch.equal(x0, x1)  # each rank drew its own rows
    ckpt = out / "checkpoints" / "step_0000006"
    # every rank's RNG; the scheduler and the prompt (registered for checkpointing)
    assert {"random_states_0.pkl", "random_states_1.pkl", "custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl"} <= {p.name for p in ckpt.iterdir()}
    assert json.loads((out / "meanflow_run.json").read_text())["num_processes"] == 2
    want = _losses(out)
    final = load_file(out / "soft_prompt.safetensors")

    shutil.rmtree(ckpt)  # as if killed between steps 3 and 6
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "resuming from" in r.stdout and "(step 3)" in r.stdout, r.stdout[-2000:]
    got = _losses(out)
    assert sorted(got) == list(range(1, 7))
    for s in range(1, 7):
        assert abs(got[s] - want[s]) < 1e-6, f"step {s}: resumed {got[s]} vs uninterrupted {want[s]}"
    again = load_file(out / "soft_prompt.safetensors")
    post = QUICK.canvas + 1 if fit == "posterior" else 0
    init = mf.MeanFlowStudent(teacher, prompt_length=3, seed=0, noise_dim=2, posterior_len=post).prompt.state_dict()  # the CLI's seeded init
    trained = [k for k in init if k.startswith(("noise.", "posterior.")) and not torch.equal(final[k], init[k])]
    assert "noise.weight" in trained  # the noise projection trained (chosen or drawn z, all-reduced gradients)
    if fit == "posterior": assert any(k.startswith("posterior.") for k in trained), trained  # so did the encoder
    assert final.keys() == init.keys() and all(torch.equal(final[k], again[k]) for k in final)
    s = mf.load_student(teacher, out)
    assert s.noise_dim == 2 and torch.equal(s.prompt.noise.weight, final["noise.weight"])
    assert (s.prompt.posterior is not None) == (fit == "posterior")
