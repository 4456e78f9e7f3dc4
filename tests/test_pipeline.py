"""CLI round trip of the main job (`latentcot run`) on a few samples: every stage runs, the report is complete and
its numbers are consistent with the per-stage metrics logs."""
import json, subprocess, sys
from pathlib import Path

import pytest

from latentcot.trainer import read_metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_main_job_small(tmp_path):
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "latentcot.cli", "run", "--output_dir", str(out), "--steps", "2", "1", "2", "2",
                          "--bsz", "4", "--limit", "8", "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-5000:]
    assert "held-out answer accuracy" in res.stdout and "majority" in res.stdout
    assert "95% bootstrap intervals" in res.stdout and "goals" in res.stdout and "diagnosis" in res.stdout
    rep = out / "report"
    for f in ("losses.png", "latent_cosine_stage3_A.png", "latent_cosine_stage2.png", "stop_probs_stage3_C.png", "metrics.json"):
        assert (rep / f).stat().st_size > 0, f
    m = json.loads((rep / "metrics.json").read_text())
    assert set(m["accuracy"]) == {"stage3_A", "stage3_C"}
    for r in m["accuracy"].values():
        assert {"acc_student", "acc_teacher", "acc_none", "acc_zeroed", "acc_shuffled"} <= set(r)
        assert r["n_heldout"] == 8 and all(0 <= v <= 1 for k, v in r.items() if k.startswith("acc_"))
        assert r["used_len_mean"] <= r["budget_mean"]
        # per-sample hits behind every accuracy, an interval around it, free generation on the same samples
        for c, h in r["hits"].items():
            assert len(h) == 8 and sum(h) / 8 == pytest.approx(r[f"acc_{c}"])
            lo, hi = r["ci"][c]
            assert lo <= r[f"acc_{c}"] <= hi
        assert len(r["free"]["hits"]) == 8 and 0 <= r["free"]["acc_free"] <= 1
        assert r["verdict"].startswith("student latents ") and "95% CI" in r["verdict"]
        geo = r["geometry"]
        assert -1 <= geo["pairwise_cos"] <= 1 and len(geo["cos_to_teacher_per_slot"]) == len(geo["n_per_slot"])
    assert [g["goal"].split()[0] for g in m["goals"]] == ["held-out", "teacher", "student", "mode", "latentcot"]
    assert not m["goals"][0]["met"]                              # 8 held-out samples are not 200: the goal says so
    assert {"teacher_latents", "student_latents", "question_state_per_kind", "vision_tower_thought_image"} <= set(m["diagnosis"]["probe"])
    assert set(m["diagnosis"]["stage2_thought_images"]) == {"visible", "blank", "visible_minus_blank"}
    # stage logs: stage 1 has only CE, stage 3 in mode A has alignment and cosine curves, mode C adds stop and cost
    s1, s3a, s3c = (read_metrics(out / s / "metrics.jsonl") for s in ("stage1", "stage3_A", "stage3_C"))
    assert [r["step"] for r in s1] == [1, 2] and "alignment" not in s1[-1]
    assert "alignment" in s3a[-1] and isinstance(s3a[-1]["cos_per_latent"], list) and "stop" not in s3a[-1]
    assert {"stop", "cost", "used_len", "stop_prob_per_step"} <= set(s3c[-1])
    assert m["final_losses"]["stage3_C"]["loss"] == pytest.approx(s3c[-1]["loss"])
    # teacher latents: one file per sample, with a manifest
    assert len(list((out / "teacher_train").glob("latent_last_layer_jsonl_*.pt"))) == 8
    assert (out / "teacher_train" / "manifest.json").exists()
