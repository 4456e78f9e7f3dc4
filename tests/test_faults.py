"""Fault injection on the real commands (issue 23): a process killed at a named moment (`$LATENTCOT_FAULT`, see
`latentcot.config.fault_point`), a torn metrics line, a flipped byte, a NaN teacher file or model, a tampered RNG state.
Each test asserts the recovery, or an error that names the file and what is wrong; never a time. Tiny runs: a few
optimizer steps of the tiny kit on CPU, about 10 s per command.
"""
import json, os, shutil, signal, subprocess, sys
from pathlib import Path

import pytest
import torch

from latentcot.trainer import latest_checkpoint, read_metrics

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop("LATENTCOT_FAULT", None)
TRAIN = [sys.executable, "-m", "latentcot.train", "--stage", "stage1", "--bsz", "1", "--grad_accum_steps", "1", "--limit", "6",
         "--learning_rate", "1e-3", "--report_to", "none", "--quiet", "--seed", "11"]
PRE = [sys.executable, "-m", "latentcot.precompute_teacher_latents", "--limit", "3", "--latent_budget_alpha", "0.5", "--quiet"]


def _run(cmd, fault=None, ok=True):
    env = {**ENV, **({"LATENTCOT_FAULT": fault} if fault else {})}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if ok is True: assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    if ok is False: assert r.returncode not in (0, -signal.SIGKILL), f"{cmd} should have failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def _steps(out): return [r["step"] for r in read_metrics(out / "metrics.jsonl")]


@pytest.mark.parametrize("fault,step", [("ckpt_rotate", 3), ("ckpt_replace", 1)])
def test_kill_during_checkpoint_rotation_resumes(tmp_path, fault, step):
    "ckpt_rotate: killed deleting step 1 while saving step 3; ckpt_replace: killed before step 1's staging dir is renamed."
    out = tmp_path / "run"
    cmd = TRAIN + ["--max_steps", "4", "--save_every", "1", "--output_dir", str(out)]
    r = _run(cmd, fault=fault, ok=None)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])
    assert not (out / "final").exists()
    r = _run(cmd)                         # the same command again
    assert f"resuming from {out / 'checkpoints' / f'step_{step:07d}'} (step {step}," in r.stdout, r.stdout[-2000:]
    if fault == "ckpt_replace": assert f"completed step_{step:07d}" in r.stdout, r.stdout[-2000:]
    assert "deleted step_0000001.trash" in r.stdout or fault == "ckpt_replace", r.stdout[-2000:]
    assert _steps(out) == [1, 2, 3, 4]
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step_0000003", "step_0000004"], names   # no trash, no staging dir, no empty step_* left
    assert (out / "final" / "model.safetensors").exists()


def test_old_half_deleted_checkpoint_falls_back(tmp_path):
    "A checkpoint half deleted by the old rotation (trainer_state.json still there) is skipped, then cleaned up."
    out = tmp_path / "run"
    _run(TRAIN + ["--max_steps", "2", "--save_every", "1", "--output_dir", str(out)])
    ck = out / "checkpoints" / "step_0000002"
    st = json.loads((ck / "trainer_state.json").read_text()); st.pop("files"); (ck / "trainer_state.json").write_text(json.dumps(st))
    (ck / "scheduler_manual.pt").unlink()
    r = _run(TRAIN + ["--max_steps", "3", "--save_every", "1", "--output_dir", str(out)])
    assert "deleted step_0000002" in r.stdout and "step_0000001 (step 1," in r.stdout, r.stdout[-2000:]
    assert _steps(out) == [1, 2, 3]


def test_torn_metrics_line(tmp_path):
    out = tmp_path / "run"
    _run(TRAIN + ["--max_steps", "2", "--output_dir", str(out)])
    with open(out / "metrics.jsonl", "a") as f: f.write('{"step": 3, "loss": 0.5, "ce"')   # disk full mid-append
    r = _run(TRAIN + ["--max_steps", "3", "--output_dir", str(out)])
    assert "metrics.jsonl:3: dropping a torn last line" in r.stderr, r.stderr[-2000:]
    assert _steps(out) == [1, 2, 3]
    with open(out / "metrics.jsonl", "a") as f: f.write('{"step": 4, "lo')
    _run(TRAIN + ["--max_steps", "1", "--no_resume", "--output_dir", str(out)])
    assert _steps(out) == [1]


def test_resume_with_changed_settings_is_refused(tmp_path):
    out = tmp_path / "run"
    _run(TRAIN + ["--max_steps", "2", "--output_dir", str(out)])
    before = (out / "final" / "latentcot_config.json").read_text()
    r = _run([a if a != "1e-3" else "1e-2" for a in TRAIN] + ["--max_steps", "3", "--output_dir", str(out)], ok=False)
    assert "SettingsChanged" in r.stderr and "config.learning_rate: 0.001 there, 0.01 now" in r.stderr, r.stderr[-2000:]
    r = _run([a if a != "6" else "5" for a in TRAIN] + ["--max_steps", "3", "--output_dir", str(out)], ok=False)
    assert "n_samples: 6 there, 5 now" in r.stderr and "run.limit: 6 there, 5 now" in r.stderr, r.stderr[-2000:]
    assert (out / "final" / "latentcot_config.json").read_text() == before and _steps(out) == [1, 2]
    _run(TRAIN + ["--max_steps", "3", "--output_dir", str(out)])   # --max_steps may grow
    assert _steps(out) == [1, 2, 3]


def test_bad_counts_are_refused(tmp_path):
    for flags, msg in ((["--max_steps", "-5"], "argument --max_steps/--max-steps: must be >= 1, got -5"),
                       (["--max_steps", "2", "--limit", "0"], "argument --limit: must be >= 1, got 0")):
        r = _run(TRAIN + flags + ["--output_dir", str(tmp_path / "x")], ok=False)
        assert msg in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "x" / "final").exists()


def test_disk_full_during_checkpoint_names_the_directory(tmp_path):
    out = tmp_path / "run"
    r = _run(TRAIN + ["--max_steps", "2", "--output_dir", str(out)], fault="ckpt_write:raise", ok=False)
    assert "CheckpointError" in r.stderr and "step_0000002.tmp: writing the checkpoint of step 2 failed (disk full?)" in r.stderr, r.stderr[-2000:]
    assert not (out / "final").exists() and not (out / "checkpoints" / "step_0000002.tmp").exists()


def test_tampered_rng_state(tmp_path):
    out = tmp_path / "run"
    _run(TRAIN + ["--max_steps", "2", "--output_dir", str(out)])
    rng = out / "checkpoints" / "step_0000002" / "random_states_0.pkl"
    marker = tmp_path / "pwned"
    class Evil:
        def __reduce__(self): return (os.system, (f"touch {marker}",))
    torch.save({"random_state": Evil()}, rng)                    # malicious pickle (and another size)
    r = _run(TRAIN + ["--max_steps", "3", "--output_dir", str(out)], ok=False)
    assert "random_states_0.pkl" in r.stderr and "no intact checkpoint" in r.stderr, r.stderr[-2000:]
    r = _run(TRAIN + ["--max_steps", "3", "--output_dir", str(out), "--allow_rng_loss"])
    assert "WITHOUT restoring the RNG state" in r.stderr and "step_0000002 (step 2," in r.stdout, r.stderr[-2000:]
    assert not marker.exists() and _steps(out) == [1, 2, 3]
    good = out / "checkpoints" / "step_0000003" / "random_states_0.pkl"
    data = bytearray(good.read_bytes()); data[len(data) // 2] ^= 0xFF; good.write_bytes(bytes(data))   # same size, flipped byte
    r = _run(TRAIN + ["--max_steps", "4", "--output_dir", str(out)], ok=False)
    assert "random_states_0.pkl: content differs from when it was written" in r.stderr, r.stderr[-2000:]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher") / "t"
    r = _run(PRE + ["--output_dir", str(d)])
    assert "wrote 3 file(s)" in r.stdout
    return d


def _copy(teacher, tmp_path):
    d = tmp_path / "teacher"; shutil.copytree(teacher, d); return d


STAGE2 = [{"stage1": "stage2", "6": "3"}.get(a, a) for a in TRAIN]


def _stage2(d, out, ok):
    return _run(STAGE2 + ["--max_steps", "3", "--latent_budget_alpha", "0.5", "--teacher_latent_dir", str(d), "--output_dir", str(out)], ok=ok)


def test_flipped_and_truncated_teacher_files(teacher, tmp_path):
    from latentcot.teacher_latents import latent_file_name
    d = _copy(teacher, tmp_path)
    f1, f2 = d / latent_file_name(1), d / latent_file_name(2)
    rec = torch.load(f1, weights_only=True)
    rec["latents"] = (rec["latents"].view(torch.int16) ^ 0x4000).view(torch.bfloat16)   # high byte flipped: still a valid file
    torch.save(rec, f1)
    f2.write_bytes(f2.read_bytes()[:300])
    r = _stage2(d, tmp_path / "s2", ok=False)       # refused before the first step, naming both files
    assert "2 of 3 teacher-latent file(s) are missing or damaged" in r.stderr and str(f1) in r.stderr and str(f2) in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "s2" / "metrics.jsonl").exists() or _steps(tmp_path / "s2") == []
    r = _run(PRE + ["--output_dir", str(d)])         # precompute's resume re-verifies and recomputes exactly those
    assert "wrote 2 file(s) (2 of them damaged before), 1 already done" in r.stdout, r.stdout
    _stage2(d, tmp_path / "s2b", ok=True)


def test_nan_teacher_file_and_manifest_edit(teacher, tmp_path):
    from latentcot.teacher_latents import atomic_torch_save, latent_file_name, MANIFEST_NAME
    d = _copy(teacher, tmp_path)
    f0 = d / latent_file_name(0)
    rec = torch.load(f0, weights_only=True)
    atomic_torch_save({**rec, "latents": rec["latents"] * float("nan")}, f0, checksum=True)   # NaN with a valid checksum
    r = _stage2(d, tmp_path / "s2", ok=False)
    assert f"{f0}: latents hold" in r.stderr and "non-finite" in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "s2" / "final").exists()
    d2 = _copy(teacher, tmp_path / "b")
    man = json.loads((d2 / MANIFEST_NAME).read_text()); man["hidden_size"] = 128; (d2 / MANIFEST_NAME).write_text(json.dumps(man))
    r = _stage2(d2, tmp_path / "s2c", ok=False)
    assert f"{d2 / MANIFEST_NAME}: edited after precompute wrote it" in r.stderr, r.stderr[-3000:]


def test_teacher_of_another_width(teacher, tmp_path):
    from latentcot.teacher_latents import MANIFEST_NAME, manifest_id
    d = _copy(teacher, tmp_path)   # as if a 128-wide teacher wrote it: a consistent manifest of another width
    man = json.loads((d / MANIFEST_NAME).read_text()); man["hidden_size"] = 128; man["checksum"] = manifest_id(man)
    (d / MANIFEST_NAME).write_text(json.dumps(man))
    r = _stage2(d, tmp_path / "s2", ok=False)
    assert f"{d / MANIFEST_NAME}: teacher latents do not match this run: hidden_size: stored 128, expected 64" in r.stderr, r.stderr[-3000:]


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory):
    from safetensors.torch import load_file, save_file
    from latentcot.tiny import tiny_kit_path
    d = tmp_path_factory.mktemp("nanmodel") / "m"
    shutil.copytree(tiny_kit_path(), d)
    for f in d.glob("*.safetensors"):
        sd = load_file(f)
        k = next(k for k in sorted(sd) if "embed_tokens" in k)
        sd[k] = torch.full_like(sd[k], float("nan"))
        save_file(sd, f, metadata={"format": "pt"})
    return d


def test_nan_model_stops_training_and_precompute(nan_model, tmp_path):
    out = tmp_path / "run"
    r = _run(TRAIN + ["--max_steps", "2", "--model_name_or_path", str(nan_model), "--output_dir", str(out)], ok=False)
    assert "NonFiniteLoss: step 1 (epoch 0, micro-batch 0, process 0): loss nan on sample(s) ['visual-train-" in r.stderr, r.stderr[-3000:]
    assert "terms {'ce': nan}" in r.stderr, r.stderr[-3000:]
    assert not (out / "final").exists() and latest_checkpoint(out) is None
    r = _run(PRE + ["--model_name_or_path", str(nan_model), "--output_dir", str(tmp_path / "t")], ok=False)
    assert "non-finite value(s) (NaN/Inf): not written" in r.stderr, r.stderr[-3000:]
    assert not list((tmp_path / "t").glob("*.pt"))
