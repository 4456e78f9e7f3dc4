"""`python -m latentcot.mmdit run` end to end on a few triplets: the report files, the table's conditions, the saved
generator loading back, and a clear error for a bad argument."""
import json, os, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_mmdit_run_writes_the_report(tmp_path):
    out = tmp_path / "rep"
    r = subprocess.run([sys.executable, "-m", "latentcot.mmdit", "run", "--out", str(out), "--steps", "2", "--batch_size", "2",
                        "--sample_steps", "1", "--limit_heldout", "2", "--limit_train", "2", "--quiet"],
                       capture_output=True, text=True, env=ENV, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == {"bridge", "grid.png", "images", "losses.json", "metrics.json", "table.md", "transformer"}
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["summary"]) == {"teacher", "student", "zeroed", "shuffled", "text", "copy_img0"}
    assert m["summary"]["copy_img0"]["changed"]["mean"] == 0.0
    assert all(len(v) == 4 for v in m["scores"].values())          # 2 triplets x 2 rounds
    assert len(json.loads((out / "losses.json").read_text())) == 2
    assert "| teacher |" in r.stdout
    from latentcot.mmdit import LatentToImageGenerator
    g = LatentToImageGenerator.from_pretrained(m["kit"], latent_dim=64, bridge_path=out / "bridge")
    assert g.bridge.mode == "identity"


def test_mmdit_cli_rejects_unknown_command():
    r = subprocess.run([sys.executable, "-m", "latentcot.mmdit", "bogus"], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_generate_cli_round_trip(tmp_path):
    from PIL import Image
    from latentcot.datagen import load_edit_records
    recs = load_edit_records(ROOT / "data_samples" / "edit" / "heldout.jsonl")[:3]
    one = tmp_path / "one.png"
    r = subprocess.run([sys.executable, "-m", "latentcot.cli", "generate", "--prompt", recs[0]["prompt"], "--image", recs[0]["img0"],
                        "--out", str(one), "--num_inference_steps", "2", "--max_new_tokens", "4"],
                       capture_output=True, text=True, env=ENV, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert Image.open(one).size == (64, 64) and str(one) in r.stdout
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": x["prompt"], "image": x["img0"]}) + "\n" for x in recs))
    r = subprocess.run([sys.executable, "-m", "latentcot.cli", "generate", "--prompts", str(prompts), "--out", str(tmp_path / "many"),
                        "--num_inference_steps", "2", "--max_new_tokens", "4", "--batch_size", "2"],
                       capture_output=True, text=True, env=ENV, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(l) for l in (tmp_path / "many" / "results.jsonl").read_text().splitlines()]
    assert [x["prompt"] for x in rows] == [x["prompt"] for x in recs]
    assert all(Image.open(x["out"]).size == (64, 64) and isinstance(x["text"], str) for x in rows)
    bad = tmp_path / "bad.jsonl"; bad.write_text(json.dumps({"prompt": "x", "image": "nope.png"}) + "\n")
    r = subprocess.run([sys.executable, "-m", "latentcot.cli", "generate", "--prompts", str(bad), "--out", str(tmp_path / "x")],
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode != 0 and "bad.jsonl:1: image not found" in r.stderr
    r = subprocess.run([sys.executable, "-m", "latentcot.cli", "generate", "--prompt", "x", "--out", str(one)],
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode != 0 and "--prompt needs --image" in r.stderr


def test_bench_mmdit_prints_ratios():
    r = subprocess.run([sys.executable, "-m", "latentcot.cli", "bench", "mmdit", "--n", "2", "--steps", "1,2"],
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| 1 |" in r.stdout and "| 2 |" in r.stdout and "one-at-a-time / batched" in r.stdout
    assert "NaN" not in r.stdout          # one sampling step is finite (sampling_scheduler drops shift_terminal)


def test_mmdit_run_oracle_condition(tmp_path):
    out = tmp_path / "orc"
    r = subprocess.run([sys.executable, "-m", "latentcot.mmdit", "run", "--out", str(out), "--steps", "2", "--batch_size", "2",
                        "--sample_steps", "1", "--limit_heldout", "2", "--limit_train", "2", "--quiet", "--oracle", "grid",
                        "--train_sources", "oracle", "--conditions", "oracle,zeroed,copy_img0"],
                       capture_output=True, text=True, env=ENV, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert list(m["summary"]) == ["oracle", "zeroed", "copy_img0"] and m["oracle"] == "grid"
    assert m["train_sources"] == ["oracle"] and all(len(v) == 4 for v in m["scores"].values())
    assert "| oracle |" in r.stdout
    r = subprocess.run([sys.executable, "-m", "latentcot.mmdit", "run", "--out", str(tmp_path / "bad"), "--conditions", "oracle"],
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode != 0 and "needs an oracle" in r.stderr and not (tmp_path / "bad").exists()
