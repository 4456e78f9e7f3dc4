"""The seeds' example training commands, run as the seeds write them (issue 25).

Only the paths, the module name (`src.main` / `SFT.main` -> `latentcot.train`, `SFT.precompute_teacher_latents` ->
`latentcot.precompute_teacher_latents`), the launcher's process count (8 GPUs -> 2 CPU processes), a step cap
(`--max_steps 2`) and a sample cap (`--limit`) differ from the text of seed 000 ("训练脚本示例") and seed 001.
"""
import importlib.util, os, shlex, subprocess, sys
from pathlib import Path

import pytest

from latentcot.trainer import read_metrics
from latentcot.tiny import tiny_kit_path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data_samples"
CAP = ["--max_steps", "2", "--limit", "8", "--quiet"]

SEED000 = {  # seed 000, lines 653-702, verbatim
    "sft_stage1": """torchrun --nproc-per-node=8 --master-port=29501 -m src.main --stage sft_stage1 --epochs 4 --bsz 1
        --grad_accum_steps 16 --data_path ./data --load_model_path ./models/Qwen2.5-VL-7B
        --save_model_path ./checkpoints/stage1_warmup --deepspeed ./deepspeed/ds_zero2_gpu.json
        --wandb_name stage1_warmup --shuffle_train --max_img_tokens 1280""",
    "sft_stage2": """torchrun --nproc-per-node=8 -m src.main --stage sft_stage2 --epochs 6 --bsz 1 --grad_accum_steps 32
        --data_path ./data --teacher_latent_dir ./teacher_latents --load_model_path ./checkpoints/stage1_warmup
        --save_model_path ./checkpoints/stage2_teacher_latent --loss_type ce alignment --alignment_weight 1.0
        --latent_size 10 --mask_question_image --observation_tokens_cannot_see_question_image""",
    "sft_stage3": """torchrun --nproc-per-node=8 -m src.main --stage sft_stage3 --epochs 10 --bsz 1 --grad_accum_steps 32
        --data_path ./data --teacher_latent_dir ./teacher_latents --load_model_path ./checkpoints/stage2_teacher_latent
        --save_model_path ./checkpoints/stage3_student_latent --loss_type ce alignment --alignment_weight 1.0
        --latent_size 10 --mask_question_image --observation_tokens_cannot_see_question_image"""}

SEED001 = [  # seed 001, lines 62-106, verbatim
    """python -m SFT.main --stage stage1 --model_name_or_path /netcache/huggingface/Qwen2.5-VL-7B-Instruct
        --train_jsonl /path/to/train.jsonl --output_dir /path/to/out_stage1 --latent_size 32
        --epochs 1 --bsz 1 --grad_accum_steps 8""",
    """python -m SFT.precompute_teacher_latents --model_name_or_path /path/to/out_stage1 --train_jsonl /path/to/train.jsonl
        --output_dir /path/to/teacher_latents --k_max 32""",
    """python -m SFT.main --stage stage2 --model_name_or_path /path/to/out_stage1 --train_jsonl /path/to/train.jsonl
        --teacher_latent_dir /path/to/teacher_latents --output_dir /path/to/out_stage2 --latent_size 32 --align_weight 1.0
        --epochs 1 --bsz 1 --grad_accum_steps 8""",
    """python -m SFT.main --stage stage3 --model_name_or_path /path/to/out_stage2 --train_jsonl /path/to/train.jsonl
        --teacher_latent_dir /path/to/teacher_latents --output_dir /path/to/out_stage3 --latent_size 32 --align_weight 1.0
        --epochs 1 --bsz 1 --grad_accum_steps 8"""]


def adapt(cmd: str, paths: dict, port: int = 29581) -> list[str]:
    "The seed's command with our module names, 2 CPU processes, local paths, and the caps."
    argv = shlex.split(cmd)
    if argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                *(a for a in argv[1:] if not a.startswith(("--nproc-per-node", "--master-port")))]
        argv.insert(4, f"--master-port={port}")
    elif argv[0] == "python": argv[0] = sys.executable
    mod = {"src.main": "latentcot.train", "SFT.main": "latentcot.train",
           "SFT.precompute_teacher_latents": "latentcot.precompute_teacher_latents"}
    argv = [mod.get(a, paths.get(a, a)) for a in argv]
    return argv + (["--limit", "8", "--quiet"] if "latentcot.precompute_teacher_latents" in argv else CAP)


def run(argv, ok=True):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    res = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    if ok: assert res.returncode == 0, f"{' '.join(argv)}\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


@pytest.mark.slow
def test_seed000_scripts(tmp_path):
    paths = {"./data": str(DATA / "chat"), "./models/Qwen2.5-VL-7B": str(tiny_kit_path()),
             "./teacher_latents": str(tmp_path / "teacher_latents"), "./deepspeed/ds_zero2_gpu.json": str(tmp_path / "ds.json")}
    for k in ("stage1_warmup", "stage2_teacher_latent", "stage3_student_latent"):
        paths[f"./checkpoints/{k}"] = str(tmp_path / "checkpoints" / k)
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 1}')
    s1 = adapt(SEED000["sft_stage1"], paths)
    if importlib.util.find_spec("deepspeed") is None:      # stops at once with the accelerate command to use instead
        res = run(s1, ok=False)
        assert res.returncode != 0 and "accelerate launch --config_file configs/accelerate/deepspeed_zero2_8gpu.yaml " \
            "-m latentcot.train --stage sft_stage1" in res.stderr, res.stderr[-2000:]
        line = next(l for l in res.stderr.splitlines() if l.strip().startswith("accelerate launch"))
        assert "--deepspeed" not in line and "--wandb_name stage1_warmup" in line, line
        s1 = [a for i, a in enumerate(s1) if a != "--deepspeed" and (i == 0 or s1[i - 1] != "--deepspeed")]
    res = run(s1)
    assert "names the TensorBoard run" in res.stdout and "stage1_warmup" in res.stdout
    final1 = Path(paths["./checkpoints/stage1_warmup"]) / "final"
    assert (final1 / "model.safetensors").exists()
    assert (Path(paths["./checkpoints/stage1_warmup"]) / "tb" / "stage1_warmup").is_dir()
    # seed 000 gives no precompute command; the teacher of stage 1 with the stages' own flags
    run([sys.executable, "-m", "latentcot.precompute_teacher_latents", "--model_name_or_path", str(final1),
         "--data_path", str(DATA / "chat"), "--output_dir", paths["./teacher_latents"], "--latent_size", "10",
         "--mask_question_image", "--observation_tokens_cannot_see_question_image", "--limit", "8", "--quiet"])
    for stage, port in (("sft_stage2", 29582), ("sft_stage3", 29583)):
        run(adapt(SEED000[stage], paths, port))
    for d in ("stage2_teacher_latent", "stage3_student_latent"):
        m = read_metrics(Path(paths[f"./checkpoints/{d}"]) / "metrics.jsonl")
        assert [r["step"] for r in m] == [1, 2] and all(r["alignment"] >= 0 for r in m), m
        assert (Path(paths[f"./checkpoints/{d}"]) / "final" / "model.safetensors").exists()
    assert read_metrics(Path(paths["./checkpoints/stage2_teacher_latent"]) / "metrics.jsonl")[0]["align_at_observations"] == 1


@pytest.mark.slow
def test_seed001_commands(tmp_path):
    paths = {"/netcache/huggingface/Qwen2.5-VL-7B-Instruct": str(tiny_kit_path()),
             "/path/to/train.jsonl": str(DATA / "visual" / "train.jsonl")}
    for k in ("out_stage1", "out_stage2", "out_stage3", "teacher_latents"):
        paths[f"/path/to/{k}"] = str(tmp_path / k)
    outs = [run(adapt(cmd, paths)) for cmd in SEED001]     # a stage's output folder is the next one's model
    assert "latent_size_mode becomes 'fixed'" in outs[2].stderr
    for k in ("out_stage2", "out_stage3"):
        m = read_metrics(tmp_path / k / "metrics.jsonl")
        assert [r["step"] for r in m] == [1, 2] and all("alignment" in r for r in m)
        assert m[0]["budget"] == 32.0                                       # --latent_size 32: 32 latents per image
