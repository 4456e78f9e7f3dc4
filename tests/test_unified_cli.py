"""Seed 004 end to end through the command line: `latentcot run unified` on a few samples (report files, decision and
image tables, the weight study), then `latentcot unified` on the model it trained, and `--stage unified` of
`python -m latentcot.train` resuming."""
import json, os, subprocess, sys
import torch
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
    # held-out edits from another file (--heldout_edits): here edits 3-5 of data_samples', image paths made absolute
    src = [json.loads(l) for l in (ROOT / "data_samples/edit/heldout.jsonl").read_text().splitlines()[3:6]]
    for rec in src:
        rec.update({k: str(ROOT / "data_samples/edit" / rec[k]) for k in ("img0", "img1", "img2")})
    (tmp_path / "h.jsonl").write_text("".join(json.dumps(rec) + "\n" for rec in src))
    r = _run(["run", "unified", "--out", str(out), "--steps", "2", "--batch_size", "2", "--limit_train", "2", "--limit_edits", "2",
              "--limit_qa", "2", "--weight_study", "--study_steps", "1", "--quiet", "--heldout_edits", str(tmp_path / "h.jsonl"),
              *SMALL], tmp_path)
    assert {"grid.png", "metrics.json", "rows.jsonl", "table.md", "train", "weight_1", "weight_2"} <= {p.name for p in out.iterdir()}
    m = json.loads((out / "metrics.json").read_text())
    assert m["decision"]["edit_prompts"] == 2 and m["decision"]["qa_prompts"] == 2
    from latentcot.unified import weighted_optimum
    w = m["weight_study"]
    assert set(w["measured"]) == {"1", "2"} and abs(w["optimum"]["2"] - weighted_optimum(w["p_train"], 2.0)) < 1e-9
    assert "| f1 |" in r.stdout and "blank canvas" in r.stdout
    given = m["images"]["both, true text before, own patches (diagnostic)"]  # img1 and img2 of the 2 held-out edits
    assert given["items"] == 4 and "true text before, own patches" in r.stdout
    assert m["step1_object"]["items"] == 2 and "the prompt's edit" in (out / "table.md").read_text()
    rows = [json.loads(l) for l in (out / "rows.jsonl").read_text().splitlines()]
    assert [r["sample_id"] for r in rows if r["kind"] == "edit"] == [rec["sample_id"] for rec in src[:2]]
    tf = m["location_teacher_forced"]  # the cell read off img0, teacher-forced
    assert tf["cell"]["items"] == 2 and 0 <= tf["row"]["mean"] <= 1 and tf["ce"] > 0
    assert "Teacher-forced (the true text before each digit)" in (out / "table.md").read_text()
    tp = m["text_parts"]  # where the free-running text is lost: counts over the 2 held-out edits
    assert tp["reflection1_exact"]["items"] == 2 and tp["step1_cell_move"]["items"] + tp["step1_cell_other"]["items"] == 2
    assert "word for word the true one" in (out / "table.md").read_text()
    assert all(isinstance(r["texts"], list) for r in rows) and all("named_object" in r for r in rows if r["kind"] == "edit")
    # --evaluate: the same report for the saved model, no training; same model, seed and held-out edits: same rows
    ev = tmp_path / "ev"
    r = _run(["run", "unified", "--evaluate", str(out / "train" / "final"), "--out", str(ev), "--limit_edits", "2", "--limit_qa",
              "2", "--quiet", "--heldout_edits", str(tmp_path / "h.jsonl"), "--compare_to", str(out)], tmp_path)
    assert [json.loads(l) for l in (ev / "rows.jsonl").read_text().splitlines()] == rows and not (ev / "train").exists()
    mev = json.loads((ev / "metrics.json").read_text())
    assert mev["num_timesteps"] == 1 and mev["location_teacher_forced"] == tf  # the model's own Euler steps (SMALL's)
    assert mev["paired"][f"free-running minus {out}'s"]["all"]["mean"] == 0 and "evaluated only" in r.stdout
    r = subprocess.run([sys.executable, "-m", "latentcot.cli", "run", "unified", "--evaluate", str(out / "train" / "final"),
                        "--out", str(tmp_path / "ev2"), "--steps", "5"], capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert r.returncode != 0 and "drop --steps" in r.stderr and not (tmp_path / "ev2").exists()
    gen = tmp_path / "gen"
    r = _run(["unified", "--model", str(out / "train" / "final"), "--image", str(ROOT / "data_samples/edit/images/heldout/0000_0.png"),
              "--prompt", "Make the red circle blue.", "--out", str(gen), "--force_image_generation", "--max_length", "200",
              "--num_timesteps", "1", "--max_patches", "3"], tmp_path)
    seq = json.loads((gen / "sequence.json").read_text())
    assert seq["segments"][0] == {"kind": "image", "file": "segment_00.png"} and seq["patches"][0] <= 3


def test_train_stage_unified_resumes(tmp_path):
    base = [sys.executable, "-m", "latentcot.train", "--stage", "unified", "--output_dir", str(tmp_path / "t"), "--limit", "2",
            "--bsz", "2", "--grad_accum_steps", "1", "--lr", "1e-3", "--report_to", "none", "--quiet",
            "--tgt_aux_weight", "1", "--tgt_aux_edit_weight", "5", "--tgt_cond", "--head_width", "32", "--fm_batch_mul", "1"]
    for steps in ("1", "2"):
        r = subprocess.run(base + ["--max_steps", steps], capture_output=True, text=True, env=ENV, timeout=900, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout
    steps = [json.loads(l)["step"] for l in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and (tmp_path / "t" / "final" / "unified.json").is_file()
    # flags given win; the settings no flag names take the unified stage's defaults, not the latent stages' (lr 1e-5)
    cfg = json.loads((tmp_path / "t" / "latentcot_config.json").read_text())
    assert (cfg["bsz"], cfg["grad_accum_steps"], cfg["learning_rate"], cfg["warmup_steps"]) == (2, 1, 1e-3, 10)
    # the unified model's flags reach the saved model
    u = json.loads((tmp_path / "t" / "final" / "unified.json").read_text())["config"]
    assert (u["tgt_aux_weight"], u["tgt_aux_edit_weight"], u["tgt_cond"], u["head_width"], u["fm_batch_mul"]) == (1.0, 5.0, True, 32, 1)
    # trained further from that model (a curriculum): a training flag replaces its own, the architecture stays
    more = [sys.executable, "-m", "latentcot.train", "--stage", "unified", "--model_name_or_path", str(tmp_path / "t" / "final"),
            "--limit", "2", "--bsz", "2", "--max_steps", "1", "--report_to", "none", "--quiet", "--self_feed", "1.0"]
    r = subprocess.run(more + ["--output_dir", str(tmp_path / "t2")], capture_output=True, text=True, env=ENV, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    u2 = json.loads((tmp_path / "t2" / "final" / "unified.json").read_text())["config"]
    assert u2 == u | {"self_feed": 1.0}
    r = subprocess.run(more + ["--output_dir", str(tmp_path / "t3"), "--head_width", "64"], capture_output=True, text=True, env=ENV,
                       timeout=900, cwd=tmp_path)
    assert r.returncode != 0 and "--head_width 64 but the model has 32" in r.stderr and not (tmp_path / "t3" / "final").exists()
    # a training flag typed at its default value sets the model's back: --self_feed 0 on the model saved with 1.0
    back = [a if a != str(tmp_path / "t" / "final") else str(tmp_path / "t2" / "final") for a in more[:-1]] + ["0"]
    r = subprocess.run(back + ["--output_dir", str(tmp_path / "t4")], capture_output=True, text=True, env=ENV, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "t4" / "final" / "unified.json").read_text())["config"] == u
    # the curriculum: draw experts added to the trained model (copied from its language model), the text frozen
    r = subprocess.run(more[:-2] + ["--output_dir", str(tmp_path / "t5"), "--draw_experts", "--freeze_text", "--warmup_steps", "0"], capture_output=True,
                       text=True, env=ENV, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "t5" / "final" / "unified.json").read_text())["config"] == u | {"draw_experts": True, "freeze_text": True}
    from safetensors.torch import load_file
    def weights(run, name):
        return load_file(next((tmp_path / run / "final" / "vlm").glob("*.safetensors"))) if name == "vlm" else \
            load_file(tmp_path / run / "final" / "unified.safetensors")
    v0, v5 = weights("t", "vlm"), weights("t5", "vlm")
    assert v0.keys() == v5.keys() and all(torch.equal(v0[k], v5[k]) for k in v0)  # the language model: frozen
    o0, o5 = weights("t", "own"), weights("t5", "own")
    assert all(torch.equal(o0[k], o5[k]) for k in o0 if k.startswith(("patch_in.", "row_emb.", "col_emb.")))
    assert not all(torch.equal(o0[k], o5[k]) for k in o0 if k.startswith("head."))  # the head trained
    assert any(k.startswith("draw_experts.layers-0-mlp.") for k in o5)
    r = subprocess.run(more[:-2] + ["--output_dir", str(tmp_path / "t6"), "--model_name_or_path", str(tmp_path / "t5" / "final"),
                        "--draw_experts", "false"], capture_output=True, text=True, env=ENV, timeout=900, cwd=tmp_path)
    assert r.returncode != 0 and "--draw_experts False but the model has True" in r.stderr


# every flag of UnifiedFlags set away from its default
ALL_UNIFIED = ["--head_width", "64", "--head_depth", "2", "--special_token_weight", "1.5", "--fm_batch_mul", "2", "--flow_weight", "0.5",
               "--input_noise", "0.1", "--self_feed", "0.25", "--ref_cond", "--img0_aux_weight", "0.5", "--img0_aux_blind",
               "--tgt_aux_weight", "1", "--tgt_aux_edit_weight", "5", "--blind_draw", "--tgt_cond", "--location_weight", "3",
               "--draw_experts", "--freeze_text", "--num_timesteps", "7"]


def test_train_cli_unified_flags_are_run_unifieds(tmp_path, capsys):
    """`python -m latentcot.train --stage unified` parses the model flags of `latentcot run unified` (one definition,
    `UnifiedFlags`): the same flags give the same UnifiedConfig; a wrong value is a usage error naming the flag; another
    stage refuses them with UnifiedConfigError."""
    import dataclasses, pytest
    from latentcot.config import parse_cli
    from latentcot.train import TrainArgs, build_parser, run
    from latentcot.unified import UNIFIED_FLAGS, UnifiedConfig, UnifiedConfigError, UnifiedFlags, run_unified_parser

    train = lambda argv: parse_cli(build_parser(), ["--stage", "unified", "--output_dir", str(tmp_path)] + argv, (TrainArgs, UnifiedFlags))[1]
    run_u = lambda argv: parse_cli(run_unified_parser(), argv)[0]
    # every flag, given to both commands: equal configs, every field the flags name changed
    assert train(ALL_UNIFIED).unified_config() == run_u(ALL_UNIFIED).unified_config()
    assert set(train(ALL_UNIFIED).changed()) == set(UNIFIED_FLAGS)
    # the session-11 form: equal but for num_timesteps, which run unified defaults to 10 (its evaluation's Euler steps)
    s11 = ["--tgt_aux_weight", "1", "--tgt_aux_edit_weight", "5", "--tgt_cond"]
    assert train(s11).unified_config() == dataclasses.replace(run_u(s11).unified_config(), num_timesteps=20)
    assert train(s11).unified_config() == UnifiedConfig(tgt_aux_weight=1.0, tgt_aux_edit_weight=5.0, tgt_cond=True)
    assert train([]).unified_config() == UnifiedConfig()  # no flag: the model's defaults, as before
    # same option strings and defaults (one definition)
    def opts(p):
        return {a.dest: (sorted(a.option_strings), a.default) for a in p._actions if a.dest in UNIFIED_FLAGS}
    t, r = opts(build_parser()), opts(run_unified_parser())
    assert set(t) == set(r) == set(UNIFIED_FLAGS)
    assert {k: v for k, v in t.items() if k != "num_timesteps"} == {k: v for k, v in r.items() if k != "num_timesteps"}
    assert t["num_timesteps"][1] == UnifiedConfig().num_timesteps and r["num_timesteps"][1] == 10
    # wrong values: usage errors (exit 2) naming the flag, in both commands
    for bad, named in ((["--tgt_cond"], "--tgt_aux_weight"), (["--location_weight", "-1"], "--location_weight"),
                       (["--self_feed", "2"], "--self_feed"), (["--location_weight", "abc"], "--location_weight")):
        for parse in (train, run_u):
            with pytest.raises(SystemExit) as e:
                parse(bad)
            assert e.value.code == 2 and named in capsys.readouterr().err, bad
    # the error class itself, before anything loads: --tgt_cond without --tgt_aux_weight, and on another stage
    with pytest.raises(UnifiedConfigError, match="needs tgt_aux_weight > 0"):
        run(build_parser().parse_args(["--stage", "unified", "--output_dir", str(tmp_path / "u"), "--tgt_cond"]))
    with pytest.raises(UnifiedConfigError, match="--tgt_aux_weight, --tgt_aux_edit_weight, --tgt_cond: flags of the unified"):
        run(build_parser().parse_args(["--stage", "stage1", "--output_dir", str(tmp_path / "s"), *s11]))
    assert not (tmp_path / "u").exists() and not (tmp_path / "s").exists()
