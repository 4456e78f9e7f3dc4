"""The real-LLaDA path (`--llada`) against LLaDA's own remote code.

There is no model hub here, so these tests need a local copy of the two code files of LLaDA's hub repository
(`configuration_llada.py`, `modeling_llada.py`; e.g. `huggingface-cli download GSAI-ML/LLaDA-8B-Base --include "*.py"
--local-dir D`): set LATENTCOT_LLADA_CODE=D. They build tiny random checkpoints with that code (its own classes,
`save_pretrained`), load them through `load_llada`, and check `LLaDABackbone` against LLaDA's own forward, against a
transformers Llama holding the same weights (the prefix path), and the JVP against finite differences. Without the
variable they are skipped: the project does not ship LLaDA's code."""
import os, shutil, subprocess, sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import json

import latentcot.meanflow as mf
import latentcot.meanflow_backbones as mfb

LLADA_CODE = os.environ.get("LATENTCOT_LLADA_CODE")
pytestmark = pytest.mark.skipif(not LLADA_CODE, reason="set LATENTCOT_LLADA_CODE to a directory holding LLaDA's "
                                "configuration_llada.py and modeling_llada.py (there is no hub here)")

# LLaDA-8B's architecture (llama blocks, RMSNorm, SwiGLU, RoPE theta 5e5, untied head) at a tiny size, and variants
# that take the adapter's other branches
BASE = dict(activation_type="silu", block_type="llama", d_model=64, n_heads=4, n_layers=3, mlp_hidden_size=96, rope=True,
            rope_theta=500000.0, layer_norm_type="rms", rms_norm_eps=1e-5, attention_dropout=0.0, residual_dropout=0.0,
            embedding_dropout=0.0, include_bias=False, include_qkv_bias=False, weight_tying=False, max_sequence_length=256,
            init_device="cpu", input_emb_norm=False, scale_logits=False, flash_attention=False, block_group_size=1)
VARIANTS = {"llada8b_like": {}, "gqa_tied_groups": dict(n_kv_heads=2, weight_tying=True, block_group_size=3),
            "embnorm_scaled": dict(input_emb_norm=True, scale_logits=True)}


def build_checkpoint(out: Path, **over) -> Path:
    "A random tiny LLaDA saved with its own remote code (`save_pretrained`), with the tiny teacher's tokenizer."
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    tok = mf.char_tokenizer()
    src = out.with_name(out.name + "-code"); src.mkdir(parents=True)
    for f in ("configuration_llada.py", "modeling_llada.py"):
        if not (Path(LLADA_CODE) / f).is_file(): pytest.fail(f"LATENTCOT_LLADA_CODE={LLADA_CODE}: {f} is missing there")
        shutil.copy(Path(LLADA_CODE) / f, src / f)
    cfg = {**BASE, **over, "model_type": "llada", "vocab_size": len(tok), "embedding_size": len(tok),
           "mask_token_id": tok.mask_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
           "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM"}}
    (src / "config.json").write_text(json.dumps(cfg))
    config = AutoConfig.from_pretrained(src, trust_remote_code=True, local_files_only=True)
    cls = get_class_from_dynamic_module(config.auto_map["AutoModel"], src, local_files_only=True)
    torch.manual_seed(0)
    model = cls(config)
    for name, p in model.named_parameters():  # LLaDA-like scales: unit norms, small projections
        if p.dim() > 1: torch.nn.init.normal_(p, std=0.02 if "wte" not in name else 1.0)
    model.save_pretrained(out); tok.save_pretrained(out)
    for f in ("configuration_llada.py", "modeling_llada.py"): shutil.copy(src / f, out / f)
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("llada")
    return {k: build_checkpoint(root / k, **v) for k, v in VARIANTS.items()}


def masked_rows(tok, mask_id, n=4, seed=0):
    "Half-masked rows of the synthetic held-out set."
    x0, plen = mf.load_text_sets(tok, 64)["synthetic_heldout"]
    g = torch.Generator().manual_seed(seed)
    xt, masked = mf.mask_tokens(x0[:n], torch.full((n,), 0.5), mf.prompt_mask_of(plen[:n], x0.shape[1]), mask_id, g)
    return xt, masked


def llama_twin(bb):
    "A transformers Llama holding the weights of the LLaDA adapter `bb` (LLaDA's llama blocks are Llama's blocks)."
    from transformers import LlamaConfig, LlamaForCausalLM
    c, tr = bb.model.config, bb.model.model.transformer
    lc = LlamaConfig(vocab_size=bb.vocab_size, hidden_size=c.d_model, intermediate_size=bb.blocks[0].ff_proj.out_features,
                     num_hidden_layers=bb.num_layers, num_attention_heads=c.n_heads, num_key_value_heads=bb.num_kv_heads,
                     rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_sequence_length, tie_word_embeddings=False,
                     rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta})
    m = LlamaForCausalLM(lc).to(bb.embedding_weight.dtype)
    sd = {"model.embed_tokens.weight": tr.wte.weight, "model.norm.weight": tr.ln_f.weight,
          "lm_head.weight": tr.wte.weight if c.weight_tying else tr.ff_out.weight}
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ff_norm", "self_attn.q_proj": "q_proj",
             "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj", "self_attn.o_proj": "attn_out",
             "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj", "mlp.down_proj": "ff_out"}
    for i, b in enumerate(bb.blocks): sd.update({f"model.layers.{i}.{k}.weight": getattr(b, v).weight for k, v in names.items()})
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return mf.LlamaBackbone(m.eval(), bb.mask_id)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapter_matches_llada_forward(checkpoints, variant, dtype):
    "No prefix: the adapter's logits are LLaDA's own; a closed gate changes nothing, an open one does."
    bb, tok = mf.load_llada(str(checkpoints[variant]), trust_remote_code=True, local_files_only=True, dtype=dtype)
    assert bb.embedding_weight.dtype == dtype and bb.num_kv_heads == (2 if variant == "gqa_tied_groups" else 4)
    xt, _ = masked_rows(tok, bb.mask_id)
    err, scale = bb.own_forward_error(xt)
    assert err <= (1e-5 if dtype == torch.float32 else 1e-2) * scale, (err, scale)
    with torch.no_grad():
        e = bb.embed(xt)
        plain = bb.logits(e)
        prefix = torch.randn(len(xt), bb.num_layers, 2, bb.num_kv_heads, 5, bb.head_dim, dtype=dtype)
        assert torch.equal(bb.logits(e, prefix, torch.zeros(bb.num_layers, dtype=dtype)), plain)
        assert not torch.allclose(bb.logits(e, prefix, torch.full((bb.num_layers,), 0.5, dtype=dtype)), plain)


@pytest.mark.parametrize("variant", ["llada8b_like", "gqa_tied_groups"])
def test_prefix_path_matches_the_llama_backbone(checkpoints, variant):
    "With a gated prefix, LLaDABackbone and LlamaBackbone on the same weights give the same logits: one student code for both."
    bb, tok = mf.load_llada(str(checkpoints[variant]), trust_remote_code=True, local_files_only=True, dtype=torch.float32)
    twin = llama_twin(bb)
    xt, _ = masked_rows(tok, bb.mask_id)
    student = mf.MeanFlowStudent(bb, prompt_length=5, seed=0)
    with torch.no_grad():
        student.prompt.gate.copy_(torch.rand(bb.num_layers))
        prefix, gate = student.prompt(torch.full((len(xt),), 0.2), torch.full((len(xt),), 0.9))
        e = bb.embed(xt)
        torch.testing.assert_close(twin.logits(e), bb.logits(e), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(twin.logits(e, prefix, gate), bb.logits(e, prefix, gate), rtol=1e-5, atol=1e-5)


def test_jvp_matches_finite_differences(checkpoints):
    """du/dt by forward-mode AD through LLaDA's blocks equals central differences. LLaDA's RMSNorm and RoPE compute in
    float32 even in a float64 model, so the differences carry float32 rounding: h = 1e-2 and 1e-3, within 5e-4 relative."""
    bb, tok = mf.load_llada(str(checkpoints["llada8b_like"]), trust_remote_code=True, local_files_only=True, dtype=torch.float64)
    s = mf.MeanFlowStudent(bb, prompt_length=4, seed=0).double()
    with torch.no_grad(): s.prompt.gate.fill_(0.7)
    xt, masked = masked_rows(tok, bb.mask_id, n=3)
    e, r, t = bb.embed(xt), torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64), torch.tensor([0.6, 0.7, 0.9], dtype=torch.float64)
    tan = torch.randn(e.shape, dtype=e.dtype, generator=torch.Generator().manual_seed(1)) * masked[..., None]
    d = mf.jvp_dudt(s, e, r, t, tan)
    def fd_error(h):
        with torch.no_grad(): return float(((s(e + h * tan, r, t + h) - s(e - h * tan, r, t - h)) / (2 * h) - d).abs().max())
    coarse, fine, scale = fd_error(1e-2), fd_error(1e-3), float(d.abs().max())
    assert scale > 0.1 and max(coarse, fine) <= 5e-4 * scale, (coarse, fine, scale)


def test_a_drifted_adapter_is_refused_at_load(checkpoints, monkeypatch):
    "If the adapter stops matching the hub code (here: causal attention), load_llada stops before any training."
    monkeypatch.setattr(mfb, "gated_prefix_attention", lambda q, k, v, *a, **kw: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    with pytest.raises(RuntimeError, match="differ from LLaDA's own forward"):
        mf.load_llada(str(checkpoints["llada8b_like"]), trust_remote_code=True, local_files_only=True)


def test_a_checkpoint_missing_a_weight_is_refused(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file
    bad = tmp_path / "bad"; shutil.copytree(checkpoints["llada8b_like"], bad)
    sd = load_file(bad / "model.safetensors"); del sd["model.transformer.blocks.0.ff_out.weight"]
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"weights do not match its config.*missing_keys.*blocks\.0\.ff_out\.weight"):
        mf.load_llada(str(bad), trust_remote_code=True, local_files_only=True)


@pytest.mark.parametrize("target", [[], ["--target", "sampler", "--sampler-rows", "8", "--sampler-steps", "2",
                                        "--noise-dim", "2", "--noise-fit", "posterior"]], ids=["jvp", "sampler-posterior"])
def test_cli_trains_resumes_and_saves_on_llada(checkpoints, tmp_path, target):
    """`python -m latentcot.meanflow --llada DIR --trust-remote-code` (bf16 base): trains, resumes, and the student loads
    back; `latentcot bench meanflow --llada DIR --student OUT` benchmarks it on that checkpoint."""
    out = tmp_path / "run"
    run = lambda steps: subprocess.run([sys.executable, "-m", "latentcot.meanflow", "--llada", str(checkpoints["gqa_tied_groups"]),
                                        "--trust-remote-code", "--local-files-only", "--steps", str(steps), "--batch", "4",
                                        "--save-every", "2", "--out", str(out), *target], capture_output=True, text=True,
                                       timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    r = run(2); assert r.returncode == 0, r.stderr[-3000:]
    r = run(4); assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout + r.stderr
    assert [m["step"] for m in mf.read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    bb, _ = mf.load_llada(str(checkpoints["gqa_tied_groups"]), trust_remote_code=True, local_files_only=True)
    s = mf.load_student(bb, out)
    assert json.loads((out / "meanflow.json").read_text())["teacher"]["llada"] == str(checkpoints["gqa_tied_groups"])
    assert s.prompt.gate.abs().sum() > 0  # trained: the gates left zero
    assert bb.banned_ids == (bb.mask_id,)  # its sampler (the teacher samples of --target sampler) bans only the mask
    if target:
        from safetensors.torch import load_file
        x0 = load_file(out / "teacher_samples.rank0.safetensors")["x0"]
        assert x0.shape == (8, 65) and not (x0 == bb.mask_id).any() and s.prompt.posterior is not None
    # the benchmark runs on the same checkpoint and student (--quick: 8 rows, the teacher at 1 and 4 steps)
    bench = tmp_path / "bench"
    r = subprocess.run(["latentcot", "bench", "meanflow", "--llada", str(checkpoints["gqa_tied_groups"]), "--trust-remote-code",
                        "--local-files-only", "--device", "cpu", "--student", str(out), "--quick", "--steps", "1,4",
                        "--student-steps", "1", "--out", str(bench)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((bench / "metrics.json").read_text())
    assert m["recipe"] == {"llada": str(checkpoints["gqa_tied_groups"]), "canvas": 64} and m["device"] == "cpu"
    assert sorted(m["settings"]) == ["english/free", "english/prompted", "synthetic/free", "synthetic/prompted"]
    runs = m["settings"]["synthetic/prompted"]["runs"]
    assert [r["steps"] for r in runs["teacher-lc"]] == [1, 4] and 0 <= runs["student"][0]["validity"] <= 1
    assert ("student-z" in runs) == bool(target)  # a noise student also runs at its temperatures given z
