"""Seed 004 end to end through the command line: `latentcot run unified` on a few samples (report files, decision and
image tables, the weight study), then `latentcot unified` on the model it trained, and `--stage unified` of
`python -m latentcot.train` resuming."""
import json, os, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
SMALL = ["--head_width", "32", "--fm_batch_mul", "1", "--num_timesteps", "1"]


def _run(args, cwd, timeout=900):
    r = subprocess.run([sys.executable, "-m", "latentcot.cli", *args], capture_output=True, text=True, env=ENV, timeout=timeout, cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_run_unified_then_generate(tmp_path):
    out = tmp_path / "rep"
    r = _run(["run", "unified", "--out", str(out), "--steps", "2", "--batch_size", "2", "--limit_train", "2", "--limit_edits", "2",
              "--limit_qa", "2", "--weight_study", "--study_steps", "1", "--quiet", *SMALL], tmp_path)
    assert {"grid.png", "metrics.json", "rows.jsonl", "table.md", "train", "weight_1", "weight_2"} <= {p.name for p in out.iterdir()}
    m = json.loads((out / "metrics.json").read_text())
    assert m["decision"]["edit_prompts"] == 2 and m["decision"]["qa_prompts"] == 2
    from latentcot.unified import weighted_optimum
    w = m["weight_study"]
    assert set(w["measured"]) == {"1", "2"} and abs(w["optimum"]["2"] - weighted_optimum(w["p_train"], 2.0)) < 1e-9
    assert "| f1 |" in r.stdout and "blank canvas" in r.stdout
    gen = tmp_path / "gen"
    r = _run(["unified", "--model", str(out / "train" / "final"), "--image", str(ROOT / "data_samples/edit/images/heldout/0000_0.png"),
              "--prompt", "Make the red circle blue.", "--out", str(gen), "--force_image_generation", "--max_length", "200",
              "--num_timesteps", "1", "--max_patches", "3"], tmp_path)
    seq = json.loads((gen / "sequence.json").read_text())
    assert seq["segments"][0] == {"kind": "image", "file": "segment_00.png"} and seq["patches"][0] <= 3


def test_train_stage_unified_resumes(tmp_path):
    base = [sys.executable, "-m", "latentcot.train", "--stage", "unified", "--output_dir", str(tmp_path / "t"), "--limit", "2",
            "--bsz", "2", "--grad_accum_steps", "1", "--lr", "1e-3", "--report_to", "none", "--quiet"]
    for steps in ("1", "2"):
        r = subprocess.run(base + ["--max_steps", steps], capture_output=True, text=True, env=ENV, timeout=900, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout
    steps = [json.loads(l)["step"] for l in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and (tmp_path / "t" / "final" / "unified.json").is_file()
    # flags given win; the settings no flag names take the unified stage's defaults, not the latent stages' (lr 1e-5)
    cfg = json.loads((tmp_path / "t" / "latentcot_config.json").read_text())
    assert (cfg["bsz"], cfg["grad_accum_steps"], cfg["learning_rate"], cfg["warmup_steps"]) == (2, 1, 1e-3, 10)
