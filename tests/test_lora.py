"""
LoRA (train_grpo.py --lora R, policy.py): step 0 is the base model exactly, only the adapters train, the reference is
the base with the adapters off, the merged checkpoint equals the adapter model and loads as any checkpoint, the
rollouts see the adapters, 2 FSDP ranks equal one process, and a kill + --resume reproduces the adapters bit for bit.
"""

import copy
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import common
import policy
import train_grpo
from test_train_grpo import _logp_and_grads, _prefix_rows, _run, one_thread, write_labels  # noqa: F401

LORA = dict(r=4, alpha=8.0, dropout=0.0, targets=list(policy.LORA_TARGETS), seed=0)
CPU = torch.device("cpu")
# args.json of a direct policy.save: what train_grpo records (the prompts: what the checkpoint's prompts.json holds)
RECORD = dict(model="tiny", prompts=common.PROMPTS, no_think=False)


def _lora_model(spec="tiny", scale=0.0, grad_checkpointing=False):
    """The policy as train_grpo.py --lora 4 loads it, on one CPU process; B ~ N(0, scale) instead of 0 if `scale`:
    adapters as training would leave them (at B = 0 the adapters change nothing and A gets no gradient)."""
    model, ref, tok, cfg, dtype = policy.load(spec, CPU, grad_checkpointing, dict(LORA))
    assert ref is None  # no reference copy
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in policy.adapters(model).values():
            m.lora_B.normal_(0, scale, generator=g)
    return model, tok, cfg, dtype


def _logits(model, tok, cfg):
    pixels = np.random.default_rng(3).integers(0, 255, (56, 84, 3), dtype=np.uint8)
    img = common.preprocess_image(Image.fromarray(pixels), cfg)
    ids = torch.tensor([common.encode_prompt(tok, common.load_prompts(), "score", [img[1]]) + [30, 31, 32]])
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=img[0], image_grid_thw=torch.tensor([img[1]]),
                     mm_token_type_ids=(ids == model.config.image_token_id).int()).logits


def test_step_0_is_the_base_model_exactly():
    model, tok, cfg, _ = _lora_model()
    base = common.load_model("tiny", "cpu", "float32")[0]
    assert len(policy.adapters(model)) == 14  # 7 linears x 2 decoder layers; the vision tower frozen, untouched
    assert not any(n.startswith("model.visual") for n in policy.adapters(model))
    assert torch.equal(_logits(model, tok, cfg), _logits(base, tok, cfg))  # B = 0: bit for bit


def test_only_the_adapters_get_gradients_on_both_log_prob_paths_under_checkpointing():
    """The shared-prefix path under activation checkpointing (train_grpo's default on CUDA) against the plain path:
    the same adapter gradients (within 1e-5 of their norm, as the full model's in test_train_grpo), and nothing else
    has one."""
    model, tok, cfg, _ = _lora_model(scale=0.05, grad_checkpointing=True)
    rows, images, w = _prefix_rows(tok, cfg)
    model.eval()  # checkpointing off: the plain path as the oracle
    plain = _logp_and_grads(model, policy.completion_logprobs, rows, images, w)
    model.train()
    shared = _logp_and_grads(model, policy.shared_prefix_logprobs, rows, images, w)
    names = {f"{n}.lora_{x}" for n in policy.adapters(model) for x in "AB"}
    assert plain[2].keys() == shared[2].keys() == names == {n for n, p in model.named_parameters() if p.requires_grad}
    torch.testing.assert_close(shared[0], plain[0], atol=1e-5, rtol=1e-6)
    for n, g in plain[2].items():
        assert g.norm() > 0 and (shared[2][n] - g).norm() <= 1e-5 * g.norm(), n


def test_reference_is_the_base_with_the_adapters_off():
    """Against the base loaded apart, frozen as full fine-tuning's reference is (a copy whose weights require grad gives
    the shared-prefix path's log-probs that differ by 3e-6 under no_grad: another kernel choice, not another model)."""
    model, tok, cfg, _ = _lora_model(scale=0.05)
    base = common.load_model("tiny", "cpu", "float32")[0].requires_grad_(False)
    rows, images, _ = _prefix_rows(tok, cfg)
    paths = (policy.completion_logprobs, policy.shared_prefix_logprobs)
    with torch.no_grad():
        want = [path(base, rows, images, 0.7)[0] for path in paths]
        on = policy.completion_logprobs(model, rows, images, 0.7)[0]
        with policy.reference(model, None) as pi_ref:
            assert pi_ref is model
            for path, w in zip(paths, want):  # the same ops as the base's: bit for bit
                assert torch.equal(path(pi_ref, rows, images, 0.7)[0], w), path.__name__
        assert torch.equal(policy.completion_logprobs(model, rows, images, 0.7)[0], on)  # back on after
    want = want[0]
    assert (on - want).abs().max() > 1e-3  # the adapters do change the policy


def test_merged_checkpoint_equals_the_adapter_model_and_loads_as_any_checkpoint(tmp_path):
    from safetensors.torch import load_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    model, tok, cfg, _ = _lora_model(scale=0.05)
    opt = torch.optim.AdamW(policy.trainable(model))
    policy.save(str(tmp_path / "run"), 1, model, opt, tok, cfg, "float32", 2, dict(step=1, world=1), RECORD)
    d = tmp_path / "run" / "step_1"
    want = _logits(model, tok, cfg)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(d)
    ours, tok2, cfg2 = common.load_model(str(d), "cpu", "float32")
    assert not any("lora" in k for k in hf.state_dict())  # a plain Qwen2.5-VL directory
    # fp32: W + s B A rounds otherwise than x W^T + s (x A^T) B^T. Within 1e-5 of the logits' scale (they reach ~10
    # here): measured 5.9e-5 (6e-6 of it). Not 1e-5 absolute: that is below this model's fp32 rounding at these logits
    # (any adapter, even at B ~ N(0, 0.002), gives 4e-5; the fp32 logits are 4e-5 from the float64 ones themselves).
    for m in (hf, ours):
        assert (_logits(m, tok2, cfg2) - want).abs().max() <= 1e-5 * want.abs().max()
    # in float64 the merge is exact: it is the same function
    base64 = common.load_model("tiny", "cpu", "float64")[0]
    base64.load_state_dict(policy.gather(model.double(), torch.float64)[0])
    assert (_logits(base64, tok, cfg) - _logits(model, tok, cfg)).abs().max() < 1e-12
    model.float()
    # the adapters alone, fp32, and what they are
    saved = load_file(d / "adapter.safetensors")
    assert len(saved) == 28 and all(torch.equal(saved[f"{n}.lora_{x}"], getattr(m, f"lora_{x}"))
                                    for n, m in policy.adapters(model).items() for x in "AB")
    config = json.loads((d / "adapter_config.json").read_text())
    assert (config["r"], config["alpha"], config["scale"], config["base_model"]) == (4, 8.0, 2.0, "tiny")
    assert config["modules"] == list(policy.adapters(model))
    # the resume state is the adapters and their AdamW state only: the frozen base is --model, read again
    from torch.distributed.checkpoint import FileSystemReader
    keys = FileSystemReader(str(d / "resume")).read_metadata().state_dict_metadata
    assert {k for k in keys if k.startswith("model.")} == {f"model.{n}" for n in saved}


def test_merged_checkpoint_keeps_the_base_dtype_and_leaves_frozen_weights_bit_for_bit(tmp_path):
    """From a bf16 checkpoint (the released model's dtype): the base trains frozen in fp32 on CPU (bf16 values), the
    save is bf16, every weight without an adapter is the checkpoint's own, and every merged one is bf16(W + s B A)."""
    base = common.load_model("tiny", "cpu", "bfloat16")
    common.save_checkpoint(*base, str(tmp_path / "bf16"))
    model, tok, cfg, dtype = _lora_model(str(tmp_path / "bf16"), scale=0.05)
    assert dtype == "bfloat16" and next(model.parameters()).dtype == torch.float32
    policy.save(str(tmp_path / "run"), 1, model, torch.optim.AdamW(policy.trainable(model)), tok, cfg, dtype, 2,
                dict(step=1, world=1), RECORD)
    saved = common.load_model(str(tmp_path / "run" / "step_1"), "cpu", "auto")[0].state_dict()
    init, wrapped = base[0].state_dict(), policy.adapters(model)
    for k, v in saved.items():
        assert v.dtype == torch.bfloat16, k
        m = wrapped.get(k.removesuffix(".weight"))
        want = init[k] if m is None else (init[k].float() + m.scale * m.lora_B @ m.lora_A).to(torch.bfloat16)
        assert torch.equal(v, want), k
    assert sum(not torch.equal(saved[k], init[k]) for k in saved) == 14  # the merge changed every wrapped weight


def test_rollouts_see_the_adapters(tmp_path):
    """policy.generate on the adapter model samples what the merged model samples (same seeds), with the sampler's
    hand-written decode step and with its forward path alike, and not what the base samples."""
    model, tok, cfg, _ = _lora_model(scale=0.3)
    policy.save(str(tmp_path), 1, model, torch.optim.AdamW(policy.trainable(model)), tok, cfg, "float32", 2, {}, RECORD)
    merged = common.load_model(str(tmp_path / "step_1"), "cpu", "float32")[0]
    base = common.load_model("tiny", "cpu", "float32")[0]
    rows, images, _ = _prefix_rows(tok, cfg)
    requests = [(rows[0][0], ["sq"]), (rows[3][0], ["wide"])]
    kw = dict(n=4, max_new_tokens=8, temperature=1.0, seed=[5, 6])
    got = policy.generate(model, tok, requests, images, **kw)["tokens"]  # the decode step calls q_proj(h) etc.
    assert got == common.sample(merged, tok, requests, images, **kw)["tokens"]
    assert got == policy.generate(model, tok, requests, images, shared_prefix=False, **kw)["tokens"]  # the forward
    assert got != common.sample(base, tok, requests, images, **kw)["tokens"]
    assert model.training  # generate hands it back in training mode


def test_trainable_is_fp32_adapters_over_a_bf16_base_and_refuses_bf16_masters():
    model = common.load_model("tiny", "cpu", "bfloat16")[0]
    with pytest.raises(ValueError, match=r"AdamW over torch\.bfloat16 master weights: they must be fp32"):
        policy.trainable(model)  # full fine-tuning in bf16
    policy.add_adapters(model, **LORA)
    params = policy.trainable(model)  # the frozen bf16 base is not refused: AdamW never sees it
    assert len(params) == 28 and {p.dtype for p in params} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    with pytest.raises(SystemExit):  # --dtype names the master weights, with --lora the adapters: still fp32 only
        train_grpo.parse_args(["--labels", "x.jsonl", "--out", "o", "--lora", "8", "--dtype", "bfloat16"])


def plain_bf16_and_fsdp2_cast(spec, source, lora):
    """(one GPU's LoRA policy as policy.load builds it: the base in bf16, fp32 adapters, filled from `source`; the
    oracle of FSDP2's bf16 compute: a copy with every parameter cast to bf16, the buffers (the rotary inv_freq) kept
    fp32, as FSDP2 leaves them)."""
    plain = policy.build(spec, torch.bfloat16)[0]
    policy.add_adapters(plain, **lora)
    policy.fill(plain, source, CPU)
    cast = copy.deepcopy(plain)
    with torch.no_grad():
        for p in cast.parameters():
            p.data = p.data.to(torch.bfloat16)
    return plain, cast


def test_one_process_trains_a_plain_bf16_base_with_fp32_adapters():
    """One CUDA process with LoRA: no process group (init_single_process), so no FSDP2 to cast the adapters; the base
    in bf16 as policy.load leaves it there, the fp32 adapters cast in their forward. Oracles: FSDP2's bf16 compute,
    every parameter cast to bf16 (a copy with bf16 adapters), bit for bit on the plain path, its gradients then cast to
    fp32 as FSDP2's reduction does (on the shared-prefix path a linear runs twice and the copy would sum its two
    gradients in bf16, here in fp32); and the same weights in fp32, within bf16's rounding (here on CPU)."""
    import torch.distributed as dist

    policy.init_single_process(torch.device("cuda"), lora=True)
    assert not dist.is_initialized()
    model, tok, cfg, _ = _lora_model(scale=0.05)  # fp32 throughout
    plain, cast = plain_bf16_and_fsdp2_cast("tiny", model, LORA)
    assert {p.dtype for p in plain.parameters() if p.requires_grad} == {torch.float32}
    rows, images, w = _prefix_rows(tok, cfg)
    got = _logp_and_grads(plain, policy.completion_logprobs, rows, images, w)
    fsdp = _logp_and_grads(cast, policy.completion_logprobs, rows, images, w)
    assert torch.equal(got[0], fsdp[0])
    for n, g in got[2].items():
        assert g.dtype == torch.float32 and torch.equal(g, fsdp[2][n].float()), n
    got = _logp_and_grads(plain, policy.shared_prefix_logprobs, rows, images, w)
    fp32 = _logp_and_grads(model, policy.shared_prefix_logprobs, rows, images, w)
    assert got[2].keys() == fp32[2].keys() == {n for n, p in plain.named_parameters() if p.requires_grad}
    with torch.no_grad(), policy.reference(model, None):
        off = policy.shared_prefix_logprobs(model, rows, images, 0.7)[0]
    mask = fp32[1].bool()
    # measured: bf16 against fp32 0.09 on average (0.27 at most), the adapters' own effect 1.01 (3.0)
    assert (got[0].float() - fp32[0])[mask].abs().mean() < 0.25 * (off - fp32[0])[mask].abs().mean()
    for n, g in fp32[2].items():
        assert (got[2][n] - g).norm() <= 0.3 * g.norm(), n  # measured: 0.17 at most


@pytest.mark.parametrize("flags,message", [
    (["--lora-alpha", "16"], "--lora-alpha needs --lora R"),  # would silently train every weight
    (["--lora-targets", "q_proj"], "--lora-targets needs --lora R"),
    (["--lora", "-1"], "--lora must be at least 0"),
    (["--lora", "8", "--lora-alpha", "0"], "--lora-alpha must be positive"),
    (["--lora", "8", "--lora-dropout", "1"], r"--lora-dropout must be in \[0, 1\)"),
    (["--lora", "8", "--lora-targets", "q_proj,,v_proj"], "--lora-targets: an empty name"),
])
def test_bad_lora_flags_are_refused(tmp_path, flags, message, capsys):
    with pytest.raises(SystemExit):
        train_grpo.parse_args(["--labels", str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "run")] + flags)
    assert re.search(message, capsys.readouterr().err)


def test_defaults_and_unknown_targets():
    args = train_grpo.parse_args(["--labels", "x.jsonl", "--out", "o", "--lora", "8"])
    assert (args.lora_alpha, args.lora_dropout, args.lora_targets) == (16.0, 0.0, ",".join(policy.LORA_TARGETS))
    model = common.load_model("tiny", "meta", "float32")[0]
    assert len(policy.lora_modules(model, ["visual.qkv", "visual.merger.mlp.0", "mlp.down_proj"])) == 2 + 1 + 2
    with pytest.raises(ValueError, match="'qkv' names no linear of the language model"):
        policy.lora_modules(model, ["q_proj", "qkv"])  # the vision tower's needs its prefix



def test_lm_head_target_merges_as_the_others_and_a_tied_head_is_refused():
    """--lora-targets ...,lm_head (what the toy needs, README: LoRA): the output projection gets an adapter too, and
    the merged checkpoint is the adapter model's function (exact in float64, the merge's fp32 W being exact there); a
    head tied to the token embedding is refused, its merge would change the embedding too."""
    model, tok, cfg = common.load_model("tiny", "cpu", "float32")
    base = copy.deepcopy(model).double()
    policy.add_adapters(model, **{**LORA, "targets": list(policy.LORA_TARGETS) + ["lm_head"]})
    assert list(policy.adapters(model))[-1] == "lm_head" and len(policy.adapters(model)) == 15
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in policy.adapters(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
    merged = policy.gather(model.double(), torch.float64)[0]
    assert not torch.equal(merged["lm_head.weight"], base.lm_head.weight)
    base.load_state_dict(merged)
    assert (_logits(base, tok, cfg) - _logits(model, tok, cfg)).abs().max() < 1e-12
    tied = common.load_model("tiny", "meta", "float32")[0]
    tied.config.tie_word_embeddings = True
    with pytest.raises(ValueError, match="lm_head is tied to the token embedding"):
        policy.lora_modules(tied, ["q_proj", "lm_head"])

# -----------------------------------------------------------------------------
# train_grpo.py --lora end to end: 2 FSDP ranks equal one process; kill + --resume is bit for bit

ARGS = ["--lora", "4", "--lr", "1e-2", "--max-steps", "2", "--save-every", "1"]


def _adapters(run, step):
    from safetensors.torch import load_file

    return load_file(run / f"step_{step}" / "adapter.safetensors")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """One process (this one), 2 pairs per step, 2 steps, the tests' vowel reward (every rollout counts)."""
    d = tmp_path_factory.mktemp("lora")
    write_labels(d)
    _run(d, d / "run", ["--batch-pairs", "2"] + ARGS, inline=True)
    return d / "run"


def test_fsdp_two_ranks_match_one_process(lora_run, tmp_path):
    """2 gloo ranks x 1 pair, FSDP2 (frozen base and adapters sharded in one unit per layer) with activation
    checkpointing and the shared-prefix path, against one plain process x 2 pairs: the adapters after 2 steps."""
    write_labels(tmp_path)
    _run(tmp_path, tmp_path / "run", ["--batch-pairs", "1", "--grad-checkpointing", "--keep", "1"] + ARGS, nproc=2)
    assert sorted(os.listdir(tmp_path / "run")) == ["final", "metrics.jsonl", "step_2"]  # --keep 1, as full FT
    assert os.readlink(tmp_path / "run" / "final") == "step_2"
    # resume/ is the adapters, their AdamW moments and the RNG, each rank writing its half: under one fp32 copy of the
    # base (934,784 bytes). Measured 198,519 + 259,407 bytes: 108,528 of tensors (12 x 8,192 adapter weights, the RNG
    # states), the rest DCP's header of each of the 112 small tensors
    shards = [(tmp_path / "run" / "step_2" / "resume" / f"__{r}_0.distcp").stat().st_size for r in range(2)]
    n_base = sum(p.numel() for p in common.load_model("tiny", "meta", "float32")[0].parameters())
    assert sum(shards) < 4 * n_base and min(shards) > 12 * 8192 / 2, (shards, n_base)
    one, two = _adapters(lora_run, 2), _adapters(tmp_path / "run", 2)
    moved = max(v.abs().max().item() for k, v in one.items() if k.endswith("lora_B"))
    assert moved > 5e-3  # B started at 0 and moved by ~lr a step
    # fp32 on both; the only difference is the order of the gradient sums (FSDP's reduce-scatter). AdamW divides each
    # gradient element by its own magnitude, so an element whose gradient is near 0 can move by more than its share on
    # a rounding difference: measured 1.0e-6 on one of 8,192 adapter weights (of |B| ~ 0.015), every other under 6e-7
    diff = torch.cat([(two[k] - one[k]).abs().flatten() for k in one])
    assert one.keys() == two.keys() and diff.max() < 1e-5, diff.max()
    m1, m2 = ([json.loads(line) for line in open(r / "metrics.jsonl")] for r in (lora_run, tmp_path / "run"))
    # at one update per batch the loss is beta * KL - mean(A), and mean(A) = 0 by Eq. 4: the KL and the gradient norm
    # are what the loss carries. At step 1 the policy is the base and the reference is the base: KL 0 exactly
    assert m1[0]["kl"] == m2[0]["kl"] == 0.0 and m1[1]["kl"] > 0.01
    for a, b in zip(m1, m2, strict=True):
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-9)
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-5, abs=1e-9)  # measured 7e-7
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)  # measured 2e-7


def _resume_tensors(step_dir):
    """The tensors of a checkpoint's resume/ state: the adapters, AdamW's state, the torch RNG (Python's and NumPy's
    RNG states are pickled apart: nothing in training draws from them, and they start random in every process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(str(step_dir / "resume")).read_metadata().state_dict_metadata
    state = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in meta.items()
             if isinstance(v, TensorStorageMetadata)}
    with policy._dcp_quietly():
        dcp.load(state, checkpoint_id=str(step_dir / "resume"))
    return state


def test_kill_and_resume_reproduce_the_adapters_bit_for_bit(lora_run, tmp_path):
    """What a SIGKILL while step 2 saves leaves (step_1, both metrics lines, a half-written .step_2.partial), then
    --resume, in this process: the adapters, AdamW's state and the merged weights of the uninterrupted run, bit for
    bit. (A real kill's files are test_train_grpo's resume tests'; nothing in them depends on LoRA.)"""
    out = tmp_path / "run"
    shutil.copytree(lora_run / "step_1", out / "step_1")
    partial = shutil.ignore_patterns("manifest.json", "*.distcp")
    shutil.copytree(lora_run / "step_2", out / ".step_2.partial", ignore=partial)
    shutil.copy(lora_run / "metrics.jsonl", out)
    _run(lora_run.parent, out, ["--batch-pairs", "2"] + ARGS + ["--resume"], inline=True)
    assert sorted(os.listdir(out)) == ["final", "metrics.jsonl", "step_1", "step_2"]
    for f in ("adapter.safetensors", "model.safetensors"):
        assert (out / "step_2" / f).read_bytes() == (lora_run / "step_2" / f).read_bytes(), f
    got, want = _resume_tensors(out / "step_2"), _resume_tensors(lora_run / "step_2")
    assert got.keys() == want.keys() and len(want) == 1 + 28 * 4  # the torch RNG; per adapter: it, step, exp_avg(_sq)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2]
