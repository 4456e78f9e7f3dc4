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
    assert {p.name for p in out.iterdir()} == {"bridge", "grid.png", "losses.json", "metrics.json", "table.md", "transformer"}
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
