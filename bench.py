"""
What EvoQuality costs, ours against the way it is usually run (transformers' `generate`; one full forward per
completion in training). Both sides of every comparison use the same model, seed, inputs and number of generated
tokens (stopping is off on both: `min_new_tokens` for generate, no stop ids for our sampler), in one run, at the
paper's proportions scaled down: a prompt of ~1,000 image tokens per image and reasoning a fraction of it.

    python bench.py                                # CPU: every stage on the `small` shape (minutes on 2 cores)
    python bench.py --shape tiny --quick           # seconds: what tests/test_bench.py runs
    python bench.py --stage vote --shape small     # one stage: vote | grpo | eval | distort | decode | memory
    python bench.py --stage decode                 # the sampler's shared prompt cache vs its old path (CPU: minutes)
    # one GPU, Qwen2.5-VL-7B's shape with random bf16 weights (no download); the paper's per-GPU GRPO batch
    python bench.py --shape 7b --stage decode vote
    python bench.py --shape 7b --stage grpo --pairs 4 --k 32 --completion 256 --grad-checkpointing
    # CPU, minutes: peak memory per rank of each phase of a GRPO step, the paper's setting on 8 ranks (train_grpo.py's
    # defaults: 4 pairs, K=32, 1,024 new tokens, micro-batches of 8; activation checkpointing as on CUDA)
    python bench.py --stage memory --shape 7b --world 8 --pairs 4 --k 32 --completion 1024
    python bench.py --stage memory --shape 3b --world 1 --budget 64 --micro-batch 2     # any shape, world, setting

Stages, each printed as a table, then ONE JSON line with every number:
  vote     pairs/s: vote.py's vote_batch (K/2 samples per order from one prefill, --batch-pairs pairs per call)
           vs model.generate(num_return_sequences=K/2) per pair order; and vote.py --no-think (exact one-token
           vote probabilities from one forward per order) vs the same baseline and vs generate of K one-token answers
  grpo     seconds and peak memory per GRPO step (reference log-probs, policy forward+backward, optimizer step; no
           sampling), train_grpo's shared-prefix path vs its plain path, at prompt = 1x and 4x the completion. Each
           side runs in its own processes: one timed, one measured. Memory on CPU: peak RSS over the step above the RSS before it (the kernel's
           high-water mark, reset just before; large blocks mmap'ed so freed memory leaves RSS), and the bytes autograd
           saved for backward (activations, parameters excluded); on CUDA torch.cuda.max_memory_allocated
  eval     images/s: evaluate.py's score_batch vs generate(num_return_sequences=--samples) per image
  distort  seconds per distortion type (mean and worst over the 5 levels) on a 1024x768 image
  decode   common.sample's shared-prefix path (each prompt's KV cache once, shared by its rows) vs its old path
           (shared_prefix=False: the prompt's KV copied to each row), in one run at K votes per pair (--votes, K/2 rows
           per order), --pairs pairs in one call, two images of the grpo side (448 px on `small`) and a prompt >= 8x
           the generated tokens: KV-cache bytes (sample's kv_bytes), peak memory of one sampler call (measured as
           grpo's is, each side in its own process), decode ms per token, and vote.py pairs/s with reasoning (its
           vote_batch through either path), each against its target (PASS / MISS). On CUDA also decode tokens/s
           against the floor a step's bytes set: the text weights + one prompt copy per request + the rows' tokens
  memory   (only when named) peak bytes per rank of each phase of a training step (start-up, rollouts, reference
           log-probs, policy forward + backward, optimizer step, save) against --budget, for --shape on --world ranks:
           train_grpo's and common's code under FakeTensorMode with torch's memory trackers on a fake process
           group, at the real width and token counts with 1-3 decoder layers and vision blocks, extrapolated per layer
           and block (the fit's prediction of the 3-layer measurement is printed; the rollouts' weight gather is
           measured at full depth); shards and the start-up and save transfers are arithmetic. Which is which is
           printed beside the table

Shapes: tiny (common's built-in model); small (random weights, a width where a CPU is arithmetic-bound);
7b and 3b (Qwen2.5-VL-7B-Instruct's and -3B-Instruct's config.json values, random bf16 weights, CUDA only but for
--stage memory). All use common's tiny tokenizer (a model vocabulary at least its size), but for the memory plan of 7b
and 3b, which uses Qwen2.5-VL's own when ../shared/models has it (the prompts training sees).
"""

import argparse
import contextlib
import copy
import functools
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch._subclasses.fake_tensor as fake_tensor
from PIL import Image
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.tensor import DTensor
from torch.utils._mode_utils import no_dispatch

import common
import distort
import evaluate
import policy
import train_grpo
import vote

# name: (text: hidden, layers, heads, kv heads, ffn, vocab or None = the tokenizer's; vision: depth, hidden, heads,
# ffn, full-attention blocks; init std), image side for vote/eval, image side for grpo
SHAPES = {
    "small": (dict(hidden=512, layers=6, heads=8, kv_heads=2, ffn=1536, vocab=None, vision_depth=4, vision_hidden=256,
                   vision_heads=4, vision_ffn=768, fullatt=[3], std=0.02), 224, 448),
    "7b": (dict(hidden=3584, layers=28, heads=28, kv_heads=4, ffn=18944, vocab=152064, vision_depth=32,
                vision_hidden=1280, vision_heads=16, vision_ffn=3420, fullatt=[7, 15, 23, 31], std=0.02), 868, 868),
    # Qwen2.5-VL-3B-Instruct's config.json (the same vision tower; the text model's embedding is its lm_head)
    "3b": (dict(hidden=2048, layers=36, heads=16, kv_heads=2, ffn=11008, vocab=151936, vision_depth=32,
                vision_hidden=1280, vision_heads=16, vision_ffn=3420, fullatt=[7, 15, 23, 31], std=0.02, tied=True),
           868, 868),
}
PEAK_GBPS = {"H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H200": 4800, "A100-SXM4-80GB": 2039, "A100-SXM4-40GB": 1555}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", nargs="+", default=None, choices=("vote", "grpo", "eval", "distort", "decode", "memory"),
                   help="default: all of them but memory")
    p.add_argument("--shape", default="small", choices=("tiny", "small", "7b", "3b"))
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every code path")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: with 2 on a 2-core machine that runs anything else, elementwise ops "
                        "slow down ~6x from oversubscription and the ratios stop being repeatable)")
    # voting / evaluation
    p.add_argument("--pairs", type=int, default=None, help="pairs voted (vote), or per GRPO step per rank (grpo: 1; "
                   "memory: train_grpo.py's 4, the paper's), or in one sampler call (decode: default 4, 8 = 256 rows "
                   "on 7b)")
    p.add_argument("--votes", type=int, default=32, help="votes per pair, K/2 per order (paper: 32)")
    p.add_argument("--batch-pairs", type=int, default=4, help="vote.py's pairs per sampler call")
    p.add_argument("--reasoning", type=int, default=None, help="generated tokens per vote / evaluation sample")
    p.add_argument("--images", type=int, default=None, help="images scored (eval)")
    p.add_argument("--samples", type=int, default=8, help="samples per image (eval; evaluate.py's default)")
    # grpo
    p.add_argument("--k", type=int, default=None, help="rollouts per image (grpo: 8; memory: the paper's 32)")
    p.add_argument("--completion", type=int, default=None,
                   help="completion tokens (grpo: prompt / mult; memory: train_grpo.py's --max-new-tokens, 1024)")
    p.add_argument("--mult", type=float, nargs="+", default=[1, 4], help="prompt length / completion length")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="completions per forward, both paths (grpo: K; memory: train_grpo.py's --micro-batch, 8)")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="activation checkpointing (grpo: off; memory: on, as train_grpo.py on CUDA)")
    p.add_argument("--steps", type=int, default=2, help="timed GRPO steps per side (after one warm-up step)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one GRPO side, run by the parent
    # memory plan
    p.add_argument("--world", type=int, default=8, help="ranks the model is sharded over (memory; paper: 8)")
    p.add_argument("--image-size", default="1024x768", help="WxH of every image (memory; KonIQ's 1024x768)")
    p.add_argument("--budget", type=float, default=64,
                   help="GiB per rank a phase may peak at (memory; issue 13's 64 for 80 GB cards, 32 for 40 GB)")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# models: a Qwen2.5-VL config of any width around common's tiny tokenizer


def build_model(shape, device):
    """(model, tokenizer, image_cfg, vote/eval image side, grpo image side) with weights from a fixed seed."""
    if shape == "tiny":
        model, tok, cfg = common.load_model("tiny", device, "float32")
        cfg.update(max_pixels=448 * 448)
        return model, tok, cfg, 224, 448
    from transformers import Qwen2_5_VLForConditionalGeneration

    _, vote_side, grpo_side = SHAPES[shape]
    if shape in ("7b", "3b") and torch.device(device).type != "cuda":
        raise SystemExit(f"--shape {shape} runs on a GPU only (random bf16 weights; --stage memory plans it on a CPU)")
    tok = common.tiny_tokenizer()
    config = model_config(shape, tok)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = Qwen2_5_VLForConditionalGeneration(config)
        finally:
            torch.set_default_dtype(default)
    cfg = dict(common.IMAGE_CFG)
    cfg.update(max_pixels=max(vote_side, grpo_side) ** 2 + 1)
    return model.eval(), tok, cfg, vote_side, grpo_side


def model_config(shape, tok, layers=None, vision_depth=None):
    """The Qwen2.5-VL config of a shape around `tok`'s special tokens, optionally cut to fewer decoder layers and
    vision blocks (all windowed then)."""
    from transformers import Qwen2_5_VLConfig

    s = SHAPES[shape][0]
    ids = {t: tok.convert_tokens_to_ids(t) for t in common.SPECIAL_TOKENS}
    hd = s["hidden"] // s["heads"]
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=s["vocab"] or len(tok), hidden_size=s["hidden"], intermediate_size=s["ffn"],
                         num_hidden_layers=layers or s["layers"], num_attention_heads=s["heads"],
                         num_key_value_heads=s["kv_heads"], max_position_embeddings=128000, rms_norm_eps=1e-6,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                              mrope_section=[hd // 8, 3 * hd // 16, 3 * hd // 16]),
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], initializer_range=s["std"]),
        vision_config=dict(depth=vision_depth or s["vision_depth"], hidden_size=s["vision_hidden"],
                           intermediate_size=s["vision_ffn"], num_heads=s["vision_heads"], out_hidden_size=s["hidden"],
                           window_size=112, fullatt_block_indexes=[] if vision_depth else s["fullatt"],
                           initializer_range=s["std"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=s.get("tied", False), initializer_range=s["std"])
    config._attn_implementation = "sdpa"
    return config


def random_images(n, side, cfg, seed=0):
    """n noise images side x side: {key: (pixel_values, grid)} and the PIL images."""
    rng = np.random.default_rng(seed)
    pil = [Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(n)]
    return pil, [common.preprocess_image(im, cfg) for im in pil]


# -----------------------------------------------------------------------------
# timing and memory


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


@contextlib.contextmanager
def no_stop():
    """Our sampler without stop tokens (bench only): every row generates exactly max_new_tokens, as generate
    does with min_new_tokens = max_new_tokens."""
    real = common.stop_ids
    common.stop_ids = lambda tokenizer: []
    try:
        yield
    finally:
        common.stop_ids = real


def count_tokens():
    """Wrap common.sample to record how many tokens each call generated: both sides must generate the same."""
    seen, real = [], common.sample

    def wrapped(*a, **kw):
        out = real(*a, **kw)
        seen.append(out["num_tokens"])
        return out
    return seen, real, wrapped


def generate(model, ids, pix, grids, n, new_tokens, device):
    """The baseline: transformers' generate, n samples of exactly new_tokens from one prompt."""
    t = torch.tensor([ids], device=device)
    out = model.generate(input_ids=t, attention_mask=torch.ones_like(t), pixel_values=torch.cat(pix).to(device),
                         image_grid_thw=torch.tensor(grids, device=device),
                         mm_token_type_ids=(t == model.config.image_token_id).int(), do_sample=True,
                         num_return_sequences=n, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         temperature=1.0, top_p=1.0, top_k=0)
    return n * (out.shape[1] - len(ids))


# -----------------------------------------------------------------------------
# stage: voting


def bench_vote(model, tok, cfg, side, a, device):
    with tempfile.TemporaryDirectory(prefix="bench_vote_") as root:  # the pairs' image files, as vote.py reads them
        return _bench_vote(model, tok, cfg, side, a, device, root)


def vote_pool(pil, root):
    """The images as vote.py reads them (files under root, manifest rows) and the pairs (2i, 2i + 1)."""
    pool = []
    for i, im in enumerate(pil):
        im.save(os.path.join(root, f"img{i}.png"))
        pool.append(dict(image=f"img{i}.png", line=i + 1))
    return pool, [(2 * i, 2 * i + 1) for i in range(len(pil) // 2)]


def run_votes(model, tok, cfg, root, pool, pairs, which, K, new_tokens, batch_pairs, label_ids=None):
    """vote.py's vote_batch over the pairs `which`, batch_pairs pairs per sampler call; label_ids: --no-think."""
    ns = argparse.Namespace(manifest=os.path.join(root, "manifest.jsonl"), k=K, seed=0, no_think=label_ids is not None,
                            max_new_tokens=new_tokens, temperature=1.0, top_p=1.0, top_k=0, save_text=False)
    for s in range(0, len(which), batch_pairs):
        vote.vote_batch(model, tok, common.load_prompts(), cfg, root, pool, pairs, which[s:s + batch_pairs], ns,
                        label_ids)


def _bench_vote(model, tok, cfg, side, a, device, root):
    n, K, C = a.pairs or (1 if a.quick else 4), a.votes, a.reasoning
    pil, pre = random_images(2 * n, side, cfg)
    pool, pairs = vote_pool(pil, root)
    prompts = common.load_prompts()
    label_ids = vote.label_tokens(tok, prompts["compare_labels"])

    def ours(no_think, new_tokens, which):
        run_votes(model, tok, cfg, root, pool, pairs, which, K, new_tokens, a.batch_pairs,
                  label_ids if no_think else None)

    def baseline(think, new_tokens, which):
        made = 0
        for i in which:
            for shown, m in zip((pairs[i], pairs[i][::-1]), vote.order_counts(K, 0, i)):
                ids = common.encode_prompt(tok, prompts, "compare", [pre[j][1] for j in shown], think=think)
                made += generate(model, ids, [pre[j][0] for j in shown], [pre[j][1] for j in shown], m, new_tokens, device)
        return made

    seen, real, wrapped = count_tokens()
    common.sample = wrapped
    try:
        with no_stop(), torch.no_grad():
            ours(False, 2, [0]), baseline(True, 2, [0])  # warm-up
            seen.clear()
            t_ours, _ = timed(lambda: ours(False, C, list(range(n))), device)
            t_exact, _ = timed(lambda: ours(True, C, list(range(n))), device)
            t_base, made = timed(lambda: baseline(True, C, range(n)), device)
            t_base1, made1 = timed(lambda: baseline(False, 1, range(n)), device)
    finally:
        common.sample = real
    assert sum(seen) == made == n * K * C, (seen, made)  # the same tokens generated on both sides
    assert made1 == n * K
    prompt = len(common.encode_prompt(tok, prompts, "compare", [pre[0][1], pre[1][1]]))
    r = dict(pairs=n, votes=K, reasoning_tokens=C, prompt_tokens=prompt,
             baseline_pairs_s=n / t_base, ours_pairs_s=n / t_ours, speedup=t_base / t_ours,
             no_think_pairs_s=n / t_exact, no_think_speedup_vs_reasoning_baseline=t_base / t_exact,
             one_token_baseline_pairs_s=n / t_base1, no_think_speedup_vs_one_token_baseline=t_base1 / t_exact)
    rows = [("generate, K/2 per order, reasoning", r["baseline_pairs_s"], 1.0),
            ("vote.py (one prefill per order, batched)", r["ours_pairs_s"], r["speedup"]),
            ("generate, K one-token answers (no-think)", r["one_token_baseline_pairs_s"], t_base / t_base1),
            ("vote.py --no-think (exact, one forward)", r["no_think_pairs_s"], r["no_think_speedup_vs_reasoning_baseline"])]
    print(f"\nvote: {n} pairs x K={K}, prompt {prompt} tokens (2 images of {side}x{side}), {C} reasoning tokens per "
          f"vote (stopping off on both sides)")
    print(f"  {'':44s} {'pairs/s':>9s} {'x reasoning baseline':>21s}")
    for name, v, x in rows:
        print(f"  {name:44s} {v:9.3f} {x:20.1f}x")
    print(f"  --no-think vs generate of K one-token answers: {r['no_think_speedup_vs_one_token_baseline']:.1f}x")
    return r


# -----------------------------------------------------------------------------
# stage: a GRPO step, shared-prefix vs plain (each side in its own process)


def grpo_child(spec):
    """One side of the GRPO comparison, in a fresh process; prints one JSON line."""
    device = spec["device"]
    torch.manual_seed(0)
    model, tok, cfg, _, side = build_model(spec["shape"], device)
    cuda = torch.device(device).type == "cuda"
    if spec["grad_checkpointing"]:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    # 7b: one copy of the weights serves as the reference too (same arithmetic); AdamW's states would not fit
    ref = model if spec["shape"] == "7b" else copy.deepcopy(model).requires_grad_(False)
    opt = (torch.optim.SGD if spec["shape"] == "7b" else torch.optim.AdamW)(model.parameters(), lr=1e-6)
    _, pre = random_images(2 * spec["pairs"], side, cfg)
    images = dict(enumerate(pre))
    prompt = {i: common.encode_prompt(tok, common.load_prompts(), "score", [images[i][1]]) for i in images}
    C = spec["completion"] or max(1, round(len(prompt[0]) / spec["mult"]))
    g = torch.Generator().manual_seed(0)
    rows = [(prompt[i], i, torch.randint(0, 256, (C,), generator=g).tolist()) for i in images for _ in range(spec["k"])]
    adv = torch.randn(len(rows), generator=g).to(device)
    fn = train_grpo.shared_prefix_logprobs if spec["path"] == "shared" else train_grpo.completion_logprobs
    micro = spec["micro_batch"] or spec["k"]
    chunks = [list(range(s, min(s + micro, len(rows)))) for s in range(0, len(rows), micro)]
    saved = []

    def step():
        with torch.no_grad():
            ref_lp = [fn(ref, [rows[i] for i in c], images, 1.0)[0] for c in chunks]
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        for c, rl in zip(chunks, ref_lp):
            store = {}

            def pack(t):  # bytes autograd keeps for backward, each storage once, parameters excluded
                ptr = t.untyped_storage().data_ptr()
                if ptr not in params:
                    store[ptr] = t.untyped_storage().nbytes()
                return t
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                lp, mask = fn(model, [rows[i] for i in c], images, 1.0)
            saved.append(sum(store.values()))
            loss, _, _ = train_grpo.grpo_loss(lp, lp.detach(), rl, adv[c], mask, 0.2, 0.05)
            (loss / len(rows)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: allocates the optimizer's state and the allocator's pools
    saved.clear()
    base = reset_peak(cuda)
    seconds = []
    for _ in range(spec["steps"]):
        seconds.append(timed(step, device)[0])
    peak = peak_memory(cuda) - base
    print(json.dumps(dict(path=spec["path"], mult=spec["mult"], prompt=len(prompt[0]), completion=C,
                          rows=len(rows), seconds=float(np.median(seconds)), peak_mib=peak / 2 ** 20,
                          saved_mib=max(saved) / 2 ** 20)))


def rss(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak(cuda):
    """Start a peak-memory measurement; returns the bytes held now. On CPU the kernel's peak-RSS high-water mark,
    reset to the current RSS (run the process with MALLOC_MMAP_THRESHOLD_ low, so that freed memory leaves RSS)."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss("VmRSS")


def peak_memory(cuda):
    return torch.cuda.max_memory_allocated() if cuda else rss("VmHWM")


# the environment of a child that measures peak memory: big blocks mmap'ed, so freed memory leaves RSS and the
# high-water mark is the peak (the page faults would slow a timing)
MEMORY_ENV = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")


def run_child(spec, threads, env):
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec), "--threads", str(threads)],
                       env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"bench child {spec} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def bench_grpo(a, device):
    out = {}
    pairs, k = a.pairs or 1, a.k or 8
    print(f"\ngrpo step ({a.shape}): {pairs} pair(s) = {2 * pairs} images x K={k} completions, micro-batches of "
          f"{a.micro_batch or k}, {a.steps} timed step(s) per side, each side in its own process"
          + (", activation checkpointing" if a.grad_checkpointing else ""))
    print(f"  {'prompt/completion':>17s} {'path':>7s} {'prompt':>6s} {'compl':>6s} {'s/step':>8s} {'peak MiB':>9s} "
          f"{'saved MiB':>9s} {'speedup':>8s} {'less peak':>9s} {'less saved':>10s}")
    for mult in a.mult:
        sides = {}
        for path in ("plain", "shared"):
            spec = dict(shape=a.shape, device=str(device), path=path, mult=mult, k=k, pairs=pairs,
                        completion=a.completion, micro_batch=a.micro_batch, steps=a.steps,
                        grad_checkpointing=a.grad_checkpointing)
            # seconds under the default allocator; memory in a second run under MEMORY_ENV
            timing, memory = (run_child(spec, a.threads, env) for env in (os.environ, MEMORY_ENV))
            sides[path] = dict(memory, seconds=timing["seconds"])
        pl, sh = sides["plain"], sides["shared"]
        r = dict(plain=pl, shared=sh, speedup=pl["seconds"] / sh["seconds"], peak_ratio=pl["peak_mib"] / max(sh["peak_mib"], 1e-9),
                 saved_ratio=pl["saved_mib"] / sh["saved_mib"])
        out[f"x{mult:g}"] = r
        for s in (pl, sh):
            last = s is sh
            print(f"  {f'{mult:g}x':>17s} {s['path']:>7s} {s['prompt']:6d} {s['completion']:6d} {s['seconds']:8.3f} "
                  f"{s['peak_mib']:9.1f} {s['saved_mib']:9.1f}" + (f" {r['speedup']:7.2f}x {r['peak_ratio']:8.2f}x "
                                                                   f"{r['saved_ratio']:9.2f}x" if last else ""))
    return out


# -----------------------------------------------------------------------------
# stage: evaluation, distortions, decode


def bench_eval(model, tok, cfg, side, a, device):
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as root:  # the images, as evaluate.py reads them
        return _bench_eval(model, tok, cfg, side, a, device, root)


def _bench_eval(model, tok, cfg, side, a, device, root):
    n, S, C = a.images or (2 if a.quick else 4), a.samples, a.reasoning
    pil, pre = random_images(n, side, cfg, seed=1)
    rows = []
    for i, im in enumerate(pil):
        im.save(os.path.join(root, f"img{i}.png"))
        rows.append(dict(image=f"img{i}.png", path=os.path.join(root, f"img{i}.png")))
    prompts = common.load_prompts()
    ns = argparse.Namespace(no_think=False, samples=S, max_new_tokens=C, temperature=1.0, top_p=1.0, top_k=0, seed=0,
                            save_text=False)

    def baseline():
        return sum(generate(model, common.encode_prompt(tok, prompts, "score", [p[1]]), [p[0]], [p[1]], S, C, device)
                   for p in pre)
    seen, real, wrapped = count_tokens()
    evaluate.sample = wrapped  # evaluate.py imported sample by name
    try:
        with no_stop(), torch.no_grad():
            evaluate.score_batch(model, tok, cfg, prompts, rows[:1], argparse.Namespace(**{**vars(ns), "max_new_tokens": 2}))
            seen.clear()
            t_ours, _ = timed(lambda: evaluate.score_batch(model, tok, cfg, prompts, rows, ns), device)
            t_base, made = timed(baseline, device)
    finally:
        evaluate.sample = real
    assert sum(seen) == made == n * S * C, (seen, made)
    r = dict(images=n, samples=S, tokens=C, baseline_images_s=n / t_base, ours_images_s=n / t_ours, speedup=t_base / t_ours)
    print(f"\neval: {n} images of {side}x{side} x {S} samples of {C} tokens, one sampler call")
    print(f"  generate per image {r['baseline_images_s']:.3f} images/s, evaluate.py {r['ours_images_s']:.3f} images/s "
          f"({r['speedup']:.1f}x)")
    return r


def bench_distort(a):
    h, w = (96, 128) if a.quick else (768, 1024)
    image = distort.make_test_image(h, w)
    out = {}
    print(f"\ndistort: seconds per type, {w}x{h}, one process")
    print(f"  {'type':28s} {'mean s':>8s} {'worst s':>8s}")
    for name in distort.DISTORTIONS:
        s = []
        for level in range(1, 6):
            t0 = time.perf_counter()
            distort.distort(image, name, level, distort.type_rng(0, "bench", name))
            s.append(time.perf_counter() - t0)
        out[name] = dict(mean=float(np.mean(s)), worst=max(s))
        print(f"  {name:28s} {np.mean(s):8.3f} {max(s):8.3f}")
    total = sum(v["mean"] for v in out.values())
    print(f"  {'all 35 types, one level each':28s} {total:8.3f}")
    return dict(size=[w, h], per_type=out, total_mean_s=total)


def decode_requests(tok, pre, K):
    """vote.py's sampler call for the pairs (2i, 2i + 1) of the preprocessed images `pre`: each order one request,
    K/2 rows each."""
    requests, counts = [], []
    for i in range(len(pre) // 2):
        for shown, n in zip(((2 * i, 2 * i + 1), (2 * i + 1, 2 * i)), vote.order_counts(K, 0, i)):
            requests.append((common.encode_prompt(tok, common.load_prompts(), "compare", [pre[j][1] for j in shown]),
                             list(shown)))
            counts.append(n)
    return requests, counts


def decode_child(spec):
    """One side's peak memory over one sampler call, above what the model and inputs hold before it, in a fresh
    process (MEMORY_ENV); prints one JSON line."""
    device = spec["device"]
    cuda = torch.device(device).type == "cuda"
    model, tok, cfg, _, _ = build_model(spec["shape"], device)
    _, pre = random_images(2 * spec["pairs"], spec["side"], cfg, seed=2)
    requests, counts = decode_requests(tok, pre, spec["votes"])
    images = dict(enumerate(pre))

    def call(new_tokens):
        return common.sample(model, tok, requests, images, n=counts, max_new_tokens=new_tokens,
                             shared_prefix=spec["shared"])
    with no_stop(), torch.no_grad():
        out = fits(lambda: call(2))  # warm-up
        if out is not None:
            base = reset_peak(cuda)
            out = fits(lambda: call(spec["tokens"]))
    print(json.dumps(dict(peak_mib=None, kv_bytes=None) if out is None else
                     dict(peak_mib=(peak_memory(cuda) - base) / 2 ** 20, kv_bytes=out["kv_bytes"])))


def fits(fn):
    """fn(), or None where it runs out of GPU memory (the old path's copies at the 7b shape may not fit)."""
    try:
        return fn()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def bench_decode(model, tok, cfg, side, a, device):
    with tempfile.TemporaryDirectory(prefix="bench_decode_") as root:  # the pairs' image files, as vote.py reads them
        return _bench_decode(model, tok, cfg, side, a, device, root)


def _bench_decode(model, tok, cfg, side, a, device, root):
    cuda = torch.device(device).type == "cuda"
    P, K = a.pairs or (1 if a.quick else 8 if a.shape == "7b" else 4), a.votes
    pil, pre = random_images(2 * P, side, cfg, seed=2)
    pool, pairs = vote_pool(pil, root)
    requests, counts = decode_requests(tok, pre, K)
    images, R, L = dict(enumerate(pre)), sum(counts), max(len(ids) for ids, _ in requests)
    C = 2 ** int(math.log2(L / 8))  # generated tokens: the largest power of two with prompt >= 8x it
    real = common.sample

    def call(shared, new_tokens):
        return common.sample(model, tok, requests, images, n=counts, max_new_tokens=new_tokens, shared_prefix=shared)

    def votes(shared):
        common.sample = functools.partial(real, shared_prefix=shared)  # vote.py calls common.sample
        try:
            run_votes(model, tok, cfg, root, pool, pairs, list(range(P)), K, C, a.batch_pairs)
        finally:
            common.sample = real

    def clocked(fn):
        """(wall, CPU) seconds of fn(). With one thread on a CPU that other work shares, the process's CPU time
        leaves out the time other jobs held the core; on CUDA only the wall clock means anything."""
        c0 = time.process_time()
        w, _ = timed(fn, device)
        return w, None if cuda else time.process_time() - c0

    sides = {}
    for shared in (False, True):  # peak memory: each side in its own process, as grpo's
        spec = dict(stage="decode", shape=a.shape, device=str(device), shared=shared, pairs=P, votes=K, side=side,
                    tokens=C)
        sides[shared] = run_child(spec, a.threads, MEMORY_ENV)
    reps = 1 if a.quick else 2
    with no_stop(), torch.no_grad():
        for shared in (False, True):
            fits(lambda: call(shared, 2))  # warm-up
        for _ in range(reps):  # best of reps, the sides alternating: other work on the machine moves both alike
            for shared in (False, True):
                t = fits(lambda: [clocked(lambda: call(shared, 1)), clocked(lambda: call(shared, C)),
                                  clocked(lambda: votes(shared))])
                for clock, i in (("wall", 0), ("cpu", 1)):
                    if t is not None and t[0][i] is not None:
                        s, (t1, tC, tv) = sides[shared], (x[i] for x in t)
                        s[f"decode_ms_per_token_{clock}"] = min(s.get(f"decode_ms_per_token_{clock}", math.inf),
                                                                (tC - t1) / (C - 1) * 1e3)
                        s[f"vote_pairs_s_{clock}"] = max(s.get(f"vote_pairs_s_{clock}", 0.0), P / tv)
    old, new = sides[False], sides[True]

    def ratio(x, y):
        return x / y if x and y else None
    clock = "wall" if cuda else "cpu"  # what the targets are judged on
    r = dict(pairs=P, votes=K, requests=len(requests), rows=R, prompt_tokens=L, tokens=C, old=old, new=new, clock=clock,
             kv_ratio=ratio(old["kv_bytes"], new["kv_bytes"]), peak_ratio=ratio(old["peak_mib"], new["peak_mib"]))
    for c in ("wall", "cpu"):
        r[f"decode_speedup_{c}"] = ratio(old.get(f"decode_ms_per_token_{c}"), new.get(f"decode_ms_per_token_{c}"))
        r[f"vote_speedup_{c}"] = ratio(new.get(f"vote_pairs_s_{c}"), old.get(f"vote_pairs_s_{c}"))
    targets = {"kv_ratio": 5.0, f"decode_speedup_{clock}": 1.5, f"vote_speedup_{clock}": 1.3}  # issue #12
    r["pass"] = {k: r[k] is not None and r[k] >= v for k, v in targets.items()}
    print(f"\ndecode: {P} pair(s) x K={K} = {len(requests)} requests, {R} rows; prompt {L} tokens (2 images of "
          f"{side}x{side}), {C} generated tokens (prompt {L / C:.1f}x), stopping off; best of {reps}, sides "
          f"alternating")
    print(f"  {'':30s} {'old (copies)':>13s} {'shared prefix':>14s} {'gain':>8s}  target")
    rows = [("KV-cache MiB", "kv_bytes", 2 ** -20, "kv_ratio"), ("peak MiB, one call", "peak_mib", 1, "peak_ratio")]
    for c in ("wall",) if cuda else ("cpu", "wall"):
        rows += [(f"decode ms / token ({c})", f"decode_ms_per_token_{c}", 1, f"decode_speedup_{c}"),
                 (f"vote pairs/s, reasoning ({c})", f"vote_pairs_s_{c}", 1, f"vote_speedup_{c}")]
    for name, key, scale, rk in rows:
        cells = [f"{v * scale:13.4g}" if v is not None else f"{'OOM':>13s}" for v in (old.get(key), new.get(key))]
        x = f"{r[rk]:7.2f}x" if r[rk] is not None else f"{'':8s}"
        goal = f">= {targets[rk]}x {'PASS' if r['pass'][rk] else 'MISS'}" if rk in targets else ""
        print(f"  {name:30s} {cells[0]} {cells[1]:>14s} {x}  {goal}")
    if not cuda:
        print("  cpu: this process's CPU time (one thread: the wall time of an idle machine), what the targets are "
              "judged on, as other jobs share this machine")
        return r
    # the bytes a step must read at least: the text weights (the embedding only its rows), one prompt copy per
    # request, the rows' own tokens so far
    tc = model.config.text_config
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                  if "visual" not in n and "embed_tokens" not in n)
    per_token = 2 * tc.num_hidden_layers * tc.num_key_value_heads * (tc.hidden_size // tc.num_attention_heads) * \
        next(model.parameters()).element_size()
    step_bytes = weights + len(requests) * L * per_token + R * C / 2 * per_token
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_GBPS.items() if k in name), None)
    tok_s = {k: R * 1e3 / s["decode_ms_per_token_wall"] if "decode_ms_per_token_wall" in s else None
             for k, s in sides.items()}
    r.update(device=name, step_bytes=step_bytes, old_decode_tok_s=tok_s[False], new_decode_tok_s=tok_s[True],
             floor_tok_s=R * peak * 1e9 / step_bytes if peak else None)
    print(f"  {name}: decode {tok_s[True]:.0f} tok/s shared prefix, "
          + (f"{tok_s[False]:.0f}" if tok_s[False] else "OOM") + f" old; a step reads >= {step_bytes / 1e9:.2f} GB"
          + (f", so at {peak} GB/s the floor is {r['floor_tok_s']:.0f} tok/s: "
             f"{tok_s[True] / r['floor_tok_s']:.0%} of it" if peak else ""))
    return r


# -----------------------------------------------------------------------------
# stage: the memory plan. What each phase of a GRPO step holds per rank, for any shape, world size and setting,
# found without the GPUs: policy's, train_grpo's and common's own code runs under FakeTensorMode (tensors with shapes
# and no data, so no memory and little time) with torch's memory trackers (MemTracker, FSDPMemTracker), this process
# being rank 0 of a fake process group of --world ranks, at the real width, image size and token counts but with 1-3
# decoder layers and vision blocks; each phase's peaks are fitted per layer and per block and extrapolated to the full
# depth. Shards of parameters, gradients and AdamW's state are arithmetic (and the trackers must agree with it).

MEMORY_DEPTHS = [(1, 1), (2, 1), (1, 2), (3, 3)]  # (decoder layers, vision blocks): fit on the first 3, check the last
SHAPE_MODE_REAL = 1 << 28  # elements: the largest integer/bool tensor kept real (a micro-batch's 4-D attention mask)
GIB = 2 ** 30


class ShapeMode(FakeTensorMode):
    """
    FakeTensorMode in which the small integer and boolean tensors built from Python data stay real: token ids,
    masks, positions, image grids. The real code's data-dependent steps (rope positions, the vision tower's windows,
    .tolist(), a mask's .all()) then run as they do on a GPU, while every tensor made from the weights or the pixels
    stays fake. (FakeTensorMode itself keeps only one-element tensors real.)
    """

    def dispatch(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (isinstance(func, torch._ops.OpOverload) and any(x.name == "device" for x in func._schema.arguments)
                and torch.Tag.nondeterministic_seeded not in func.tags
                and not any(isinstance(x, torch.Tensor) for x in torch.utils._pytree.tree_leaves((args, kwargs)))
                and torch.device(kwargs.get("device") or "cpu").type == "cpu"):
            with no_dispatch():  # a constructor (zeros, full, arange, ...): its size and dtype on meta first
                meta = func(*args, **{**kwargs, "device": "meta"})
                real = (func(*args, **kwargs) if isinstance(meta, torch.Tensor) and not meta.dtype.is_floating_point
                        and meta.numel() <= SHAPE_MODE_REAL else None)
            if real is not None:
                return self.fake_tensor_converter.from_real_tensor(self, real, make_constant=True)
        return super().dispatch(func, types, args, kwargs)


@contextlib.contextmanager
def shape_mode():
    """ShapeMode, its real tensors allowed up to SHAPE_MODE_REAL elements, and transformers' input checks that read
    tensor values (image tokens vs image features) off: the fake image features have no values to compare."""
    limit, check = fake_tensor.CONSTANT_NUMEL_LIMIT, os.environ.get("TRANSFORMERS_DISABLE_TORCH_CHECK")
    fake_tensor.CONSTANT_NUMEL_LIMIT, os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = SHAPE_MODE_REAL, "1"
    try:
        with ShapeMode(allow_non_fake_inputs=True):
            yield
    finally:
        fake_tensor.CONSTANT_NUMEL_LIMIT = limit
        if check is None:
            del os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"]
        else:
            os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = check


@contextlib.contextmanager
def fake_ranks(world):
    """This process as rank 0 of `world` ranks whose collectives move nothing (torch's fake process group)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def memory_model(config, reference, checkpointing):
    """
    A model of `config` in fake tensors as policy.load makes it on CUDA: policy.shard's FSDP2 units, weights gathered
    in bf16 and gradients reduced in fp32; the policy's master weights fp32, the reference's bf16 and frozen.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if reference else torch.float32)
    try:
        model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    if checkpointing:
        policy.enable_checkpointing(model)
    policy.shard(model, torch.device("cuda"), reference=reference)  # the device only picks the precision
    if not reference:  # as policy.fill does for a model that will be sampled: FSDP picks its root on a first forward
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 1, dtype=torch.long))
        model.reshard()
    return model.train(not reference)


def tracked_peak(model, optimizer, fn, then=None, inputs=(), fsdp=False):
    """
    {kind: bytes} on this rank at the peak of then(fn()), "Total" their sum: the policy `model`'s shards, gradients
    and AdamW state, `inputs` (tensors made before) and everything they allocate. By torch's MemTracker, or by its
    FSDPMemTracker (`fsdp`) where the run is the frozen reference's, whose parameters MemTracker cannot hook: that one
    swaps FSDP's hooks for its own, which changes how a grouped unit (a tied embedding and lm_head) runs, so it only
    watches a model that does not run, and last. A backward goes in `then`: the trackers follow the modules' nesting,
    and a backward inside the module call below would break it.
    """
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed.fsdp import FSDPModule

    if fsdp:
        tracker = FSDPMemTracker(model, optimizer)
        tracker.track_inputs(inputs)
    else:
        tracker = MemTracker()
        tracker.track_external(model, optimizer, *torch.utils._pytree.tree_leaves(inputs))
    outer = torch.nn.Module()  # the tracker takes a second call of the root for a new step: nest fn in a module call
    outer.forward = fn
    with tracker:
        out = outer()
        if then is not None:
            then(out)
    cpu = torch.device("cpu")
    peak = {getattr(k, "value", k): v for k, v in tracker.get_tracker_snapshot("peak")[cpu].items()}
    # and the peak inside each kind of unit, forward and backward: one part of a phase can peak below another with
    # 1-3 layers and above it with 28 (the gradients FSDP holds for every layer until the prompt's backward), so each
    # is fitted on its own
    layers, blocks = set(model.model.language_model.layers), set(model.model.visual.blocks)
    for module, stats in tracker.memory_tracking.items():
        kind = "decoder layers" if module in layers else "vision blocks" if module in blocks else "other units"
        for state, snaps in stats.snapshots.items() if isinstance(module, FSDPModule) else ():
            if state.value.startswith("Peak"):
                key = f"in the {kind}, {state.value.replace('-', ' ').split()[1].lower()}"
                peak[key] = max([peak.get(key, 0)] + [s[cpu]["Total"] for s in snaps if cpu in s])
    return peak


class PrefillDone(Exception):
    pass


@contextlib.contextmanager
def split_at_prefill():
    """
    common.sample in two parts: the first call of common.prefill keeps its outputs and ends the sample (PrefillDone);
    the later ones return those outputs, so the decode runs with the prefill's results held but without its passing
    memory. Yields the kept outputs.
    """
    real, kept = common.prefill, []

    def prefill(*args, **kw):
        if kept:
            return kept[0]
        kept.append(real(*args, **kw))
        raise PrefillDone
    common.prefill = prefill
    try:
        yield kept
    finally:
        common.prefill = real


def rollout_peak(model, optimizer, tok, plan, part, layout=None, inputs=()):
    """
    Peak {kind: bytes} of one part of the rollouts, run by policy.generate. The parts, each linear in the depth
    (their maximum is not: with 1-3 layers a unit's gather or the prefill of the images is above the decode, with 28
    the KV cache is far above them): "gather", generate's gather of every unit, common.sample doing nothing; "sample",
    common.sample alone, the gathered weights held (under split_at_prefill: its prefill, then its decode with
    `layout`).
    """
    real, peak = common.sample, {}
    shards = list(model.parameters())  # once gathered, the model's parameters are the gathered weights

    def sample(gathered_model, *args, **kw):
        def run():
            with contextlib.suppress(PrefillDone), forced_tokens(tok, 3):
                real(gathered_model, *args, **kw)
        if part == "sample":
            peak.update(tracked_peak(model, optimizer, run, inputs=(shards, *inputs)))
    common.sample = sample

    def gather():
        policy.generate(model, tok, plan["requests"], plan["images"], n=plan["k"], max_new_tokens=plan["completion"],
                        **({} if layout is None else dict(shared_prefix=layout)))
    try:
        if part == "gather":
            return tracked_peak(model, optimizer, gather, fsdp=True)  # the gather runs no module
        gather()
        return peak
    finally:
        common.sample = real


@contextlib.contextmanager
def forced_tokens(tokenizer, steps):
    """
    common.next_token still runs (its softmax over the vocabulary is part of the peak), but every row gets a fixed
    token (fake logits have no values to sample from), and the stop token at call `steps`. The KV cache is
    preallocated for every new token, so the first decode steps hold what the last one does, but for the attention
    over the rows' own tokens, which grows with the step (stated beside the table).
    """
    real, stop, filler, calls = common.next_token, tokenizer.convert_tokens_to_ids("<|im_end|>"), \
        tokenizer.convert_tokens_to_ids("a"), [0]

    def fixed(logits, *args, **kw):
        real(logits, *args, **kw)
        calls[0] += 1
        return torch.full(logits.shape[:1], stop if calls[0] == steps else filler, dtype=torch.long)
    common.next_token = fixed
    try:
        yield
    finally:
        common.next_token = real


def measure_depth(shape, tok, layers, blocks, plan):
    """(peak {kind: bytes} of each measured phase, parameter shapes), with `layers` decoder layers and `blocks`
    vision blocks."""
    with shape_mode():
        model = memory_model(model_config(shape, tok, layers, blocks), False, plan["checkpointing"])
        ref = memory_model(model_config(shape, tok, layers, blocks), True, False)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)  # what it picks on CUDA
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()  # from the second step on, AdamW's two moments exist in every phase
        optimizer.zero_grad(set_to_none=True)
        # and the reference's root unit is gathered: FSDP keeps a root's weights after its forward for the backward,
        # which the reference never runs, so its first forward leaves them (patch embedding, final norm) for good
        ref.unshard()
        shapes = [tuple(p.shape) for p in model.parameters()]
        # the reference is not the trackers' model: its shards (arithmetic) and its gathered root (its live tensors)
        held = held_bytes([], [], shapes, plan["world"]) + sum(p.untyped_storage().nbytes() for p in ref.parameters()
                                                               if not isinstance(p, DTensor))
        peaks, images, rows = {}, plan["images"], plan["chunk"]
        with split_at_prefill() as kept:
            peaks[("rollouts", "prefill")] = rollout_peak(model, optimizer, tok, plan, "sample")
            logits, cache, mask, positions = kept[0]
            for layout in plan["layouts"]:
                peaks[("rollouts", layout)] = rollout_peak(model, optimizer, tok, plan, "sample", layout, inputs=(
                    logits, mask, positions, [(layer.keys, layer.values) for layer in cache.layers]))
            del logits, cache, mask, positions, kept[:]
        logprobs = train_grpo.shared_prefix_logprobs
        for p in model.parameters():  # from the second micro-batch on, the gradients exist
            p.grad = torch.zeros_like(p)

        def forward():  # train_grpo's micro-batch (one update per batch: pi_old = the policy)
            logp, mask = logprobs(model, rows, images, 1.0)
            return train_grpo.grpo_loss(logp, logp.detach(), torch.zeros_like(logp), torch.randn(len(rows)), mask,
                                        0.2, 0.05)[0]
        peaks["policy forward + backward"] = tracked_peak(model, optimizer, forward, lambda loss: loss.backward())
        optimizer.zero_grad(set_to_none=True)  # the reference runs before the policy's backward, with no gradients
        peaks["reference log-probs"] = tracked_peak(model, optimizer, fsdp=True,
                                                    fn=lambda: torch.no_grad()(logprobs)(ref, rows, images, 1.0))
        for p in peaks.values():
            p.update({k: v + held for k, v in p.items() if k == "Total" or k.startswith("in the")}, Reference=held)
        return peaks, shapes


def full_depth(shape, tok, plan):
    """
    (peak bytes of the rollouts' gather above the policy's shards, parameter shapes, parameters of a decoder layer)
    at the full depth: the gather is a few operations, so it is measured there rather than fitted (its peak is one
    unit's gather buffer on top of the units gathered before it: with few layers the largest unit's, at full depth
    the last one's).
    """
    with shape_mode():
        model = memory_model(model_config(shape, tok), False, plan["checkpointing"])
        peak = rollout_peak(model, torch.optim.AdamW(model.parameters()), tok, plan, "gather")
        return (peak["Total"] - peak["Sharded Param"], [tuple(p.shape) for p in model.parameters()],
                sum(p.numel() for p in model.model.language_model.layers[0].parameters()))


def shard_numel(shapes, world):
    """Elements of rank 0's FSDP2 shards: each parameter split on dim 0 into `world` chunks, rank 0's the largest
    (every rank's storage is padded to it)."""
    return sum(math.ceil(s[0] / world) * math.prod(s[1:]) for s in shapes)


def optimizer_peak(shapes, world):
    """Peak bytes of the optimizer step on one rank, clip_grad_norm_ then AdamW's foreach step (what it picks on CUDA)
    then zero_grad, over the rank's fp32 shards: torch's own code on plain tensors of the shards' shapes (FSDP2's
    DTensors wrap them without copies; on DTensors the tracker would also count the global-shape tensors DTensor
    makes to propagate shapes)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    with shape_mode():
        params = [torch.nn.Parameter(torch.empty(math.ceil(s[0] / world), *s[1:])) for s in shapes]
        optimizer = torch.optim.AdamW(params, lr=1e-6, foreach=True)
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        for p in params:
            p.grad = torch.zeros_like(p)
        tracker = MemTracker()
        tracker.track_external(*params, *[p.grad for p in params], optimizer)
        with tracker:
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def process_rss():
    """Peak RSS of a fresh process that imports the stages (torch, transformers): a rank's host memory before any
    weight, measured."""
    code = "import resource, train_grpo; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    out = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.abspath(__file__)),
                         capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) * 1024


def memory_tokenizer(shape):
    """(tokenizer, name): Qwen2.5-VL's own for the real shapes when its files are here (../shared/models), whose
    prompts are those training sees; else common's tiny tokenizer (a longer prompt: its text takes more tokens)."""
    real = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "models", "qwen2.5-vl-7b-instruct")
    if shape in ("7b", "3b") and os.path.isdir(real):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(real), "Qwen2.5-VL's tokenizer"
    return common.tiny_tokenizer(), "the tiny tokenizer"


def memory_plan(a):
    """The inputs of one rank's GRPO step, built as train_grpo.py builds them: images, rollout requests, and the
    heaviest log-prob micro-batch (most prompts, then most completions), every completion --completion tokens."""
    d = train_grpo.parse_args(["--labels", "-", "--out", "-"])  # train_grpo.py's defaults
    pairs, k, new = a.pairs or d.batch_pairs, a.k or d.k, a.completion or d.max_new_tokens
    micro = a.micro_batch or d.micro_batch
    w, h = (int(x) for x in a.image_size.lower().split("x"))
    tok, tok_name = memory_tokenizer(a.shape)
    rng = np.random.default_rng(0)
    images = {i: common.preprocess_image(Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)),
                                         common.IMAGE_CFG) for i in range(2 * pairs)}
    prompts = common.load_prompts()
    requests = [(common.encode_prompt(tok, prompts, "score", [images[i][1]]), [i]) for i in images]
    filler = tok.convert_tokens_to_ids("a")
    rows = [(ids, i, [filler] * new) for ids, (i,) in requests for _ in range(k)]
    chunks = np.array_split(np.arange(len(rows)), math.ceil(len(rows) / micro))
    chunk = max(chunks, key=lambda c: (len({rows[j][1] for j in c}), len(c)))
    layouts = [True, False] if "shared_prefix" in inspect.signature(common.sample).parameters else [None]
    return dict(world=a.world, pairs=pairs, k=k, completion=new, micro_batch=micro, images=images, requests=requests,
                chunk=[rows[j] for j in chunk], layouts=layouts, tokenizer=tok, tokenizer_name=tok_name, size=(w, h),
                checkpointing=a.grad_checkpointing is not False, prompt=len(requests[0][0]),
                visual=math.prod(images[0][1]) // common.IMAGE_CFG["merge_size"] ** 2)


def held_bytes(trainable, frozen, reference, world, grads=False):
    """
    Bytes of rank 0's shards that a step keeps, from parameter shapes: trainable weights as fp32 master weights with
    AdamW's two fp32 moments and fp32 step count (and fp32 gradients while they exist), frozen weights in bf16, and a
    separate reference's bf16 weights (none where the reference is the policy itself, e.g. with adapters switched off).
    """
    return (shard_numel(trainable, world) * (4 + 8 + (4 if grads else 0)) + 4 * len(trainable)
            + 2 * shard_numel(frozen, world) + 2 * shard_numel(reference, world))


def bench_memory(a):
    if a.shape not in SHAPES:
        raise SystemExit(f"--stage memory plans one of the shapes {', '.join(SHAPES)}, not {a.shape}")
    plan, s, world, t0 = memory_plan(a), SHAPES[a.shape][0], a.world, time.time()
    tok, B, K, T = plan["tokenizer"], 2 * plan["pairs"], plan["k"], plan["completion"]
    R, P, budget = B * K, plan["prompt"], a.budget * GIB
    print(f"\nmemory plan per rank ({a.shape}, {world} ranks): {plan['pairs']} pairs = {B} images of "
          f"{plan['size'][0]}x{plan['size'][1]} ({plan['visual']} visual tokens, prompts of {P} tokens with "
          f"{plan['tokenizer_name']}) x K={K} = {R} rollouts of {T} new tokens; log-probs in micro-batches of "
          f"{plan['micro_batch']} completions (shared-prefix path); activation checkpointing "
          f"{'on' if plan['checkpointing'] else 'off'}")
    measured, shapes = {}, {}
    with fake_ranks(world):
        for depth in MEMORY_DEPTHS:
            measured[depth], shapes[depth] = measure_depth(a.shape, tok, *depth, plan)
            print(f"  measured with {depth[0]} decoder layer(s), {depth[1]} vision block(s) ({time.time() - t0:.0f} s)",
                  flush=True)
        gather, full, layer = full_depth(a.shape, tok, plan)
    opt_peak = optimizer_peak(full, world)
    held = {d: (held_bytes(sh, [], sh, world), held_bytes(sh, [], sh, world, grads=True)) for d, sh in shapes.items()}
    held["full"] = (held_bytes(full, [], full, world), held_bytes(full, [], full, world, grads=True))
    agrees = all(m[key]["Sharded Param"] == 4 * shard_numel(shapes[d], world) and m[key]["OptState"] == 8 * shard_numel(
        shapes[d], world) + 4 * len(shapes[d]) for d, m in measured.items() for key in ["reference log-probs"])
    total, largest, n = sum(math.prod(x) for x in full), max(math.prod(x) for x in full), shard_numel(full, world)
    kv_token = 2 * s["layers"] * s["kv_heads"] * (s["hidden"] // s["heads"]) * 2  # bytes per token (bf16 keys, values)
    kv = {True: (B * P + R * T) * kv_token,  # issue 12: one prompt copy per request, each row's room for T tokens
          False: (B * P + 2 * R * P + R * T) * kv_token}  # today, while the cache is built: the prefill's, the
    kv[None] = kv[False]  # gathered copies per row, and the rows' buffers with room for T tokens
    layouts = {True: "one prompt copy (issue 12)", False: "prompt copied per row",
               None: "prompt copied per row (today)"}
    rss = process_rss()
    full_rest, check, last = {}, [], MEMORY_DEPTHS[-1]
    for key in measured[last]:
        grads = key == "policy forward + backward"

        def fit(part, layers, blocks):  # the part's peak, less the shards, linear in the layers and the blocks
            rest = {d: measured[d][key][part] - held[d][grads] for d in MEMORY_DEPTHS}
            return (rest[(1, 1)] + (rest[(2, 1)] - rest[(1, 1)]) * (layers - 1)
                    + (rest[(1, 2)] - rest[(1, 1)]) * (blocks - 1))
        # the whole phase's peak and that inside each kind of unit, each fitted; the phase's is the highest
        parts = [p for p in measured[last][key] if p == "Total" or p.startswith("in the")
                 and all(p in m[key] for m in measured.values())]
        at = max(parts, key=lambda p: fit(p, s["layers"], s["vision_depth"]))
        full_rest[key] = fit(at, s["layers"], s["vision_depth"])
        # the check of what the extrapolation rests on: the fit of the part highest at full depth, at (3, 3)
        predicted, got = held[last][grads] + fit(at, *last), measured[last][key][at]
        name = key if isinstance(key, str) else "rollouts: " + ("prefill" if key[1] == "prefill" else
                                                                "decode, " + layouts[key[1]])
        check.append(dict(phase=name, part=at, predicted_gib=predicted / GIB, measured_gib=got / GIB,
                          error=abs(predicted - got) / got))
    if None in plan["layouts"]:  # common.sample has no shared_prefix= yet: today's decode, with the layout's KV
        full_rest[("rollouts", True)] = full_rest[("rollouts", None)] - kv[None] + kv[True]
    # the gather, measured at full depth on the policy alone: with the reference's gathered root unit, as the others
    ref_root = measured[last]["reference log-probs"]["Reference"] - held_bytes([], [], shapes[last], world)
    full_rest[("rollouts", "gather")] = gather + ref_root
    parts = {k[1]: v for k, v in full_rest.items() if isinstance(k, tuple)}
    rows = [dict(phase=f"rollouts, {name}", how="estimated" if layout and None in plan["layouts"] else "measured",
                 shards=held["full"][False], kv=kv[layout], target=budget,
                 rest=max(parts["gather"], parts["prefill"], parts[layout]))
            for layout, name in layouts.items() if layout in parts]
    rows += [dict(phase=key, how="measured", shards=held["full"][key == "policy forward + backward"], kv=0,
                  target=budget, rest=full_rest[key]) for key in full_rest if isinstance(key, str)]
    host_target = 2 * total + 6 * n  # one bf16 copy and the shards (the policy's fp32, the reference's bf16)
    rows = [dict(phase="start-up, host (rank 0)", how="computed", shards=0, rest=rss + 2 * total, kv=0,
                 target=host_target),
            dict(phase="start-up, device", how="computed", shards=6 * n, rest=2 * largest + 4 * largest // world, kv=0,
                 target=budget)] + rows + [
            dict(phase="optimizer step", how="measured", shards=held["full"][True], kv=0, target=budget,
                 rest=opt_peak - (held["full"][True] - 2 * n)),  # it ran over all the shards but the reference's
            dict(phase="save, device", how="computed", shards=held["full"][False], kv=0, target=budget,
                 rest=2 * largest + 2 * largest // world),
            dict(phase="save, host (rank 0)", how="computed", shards=0, rest=rss + 2 * total, kv=0, target=host_target)]
    print(f"  {'phase':40s} {'how':>9s} {'shards':>7s} {'rest':>7s} {'of it KV':>8s} {'peak':>7s} {'target':>7s}  GiB")
    for r in rows:
        r.update(peak=r["shards"] + r["rest"])
        r.update({k: r[k] / GIB for k in ("shards", "rest", "kv", "peak", "target")}, fits=r["peak"] <= r["target"])
        print(f"  {r['phase']:40s} {r['how']:>9s} {r['shards']:7.2f} {r['rest']:7.2f} {r['kv']:8.2f} {r['peak']:7.2f} "
              f"{r['target']:7.2f}  {'PASS' if r['fits'] else 'MISS'}")
    print(f"  rollouts, the rest part by part: the gather of every unit {parts['gather'] / GIB:.2f} (measured at full "
          f"depth), the prefill {parts['prefill'] / GIB:.2f}, the decode " + ", ".join(
              f"{parts[x] / GIB:.2f} ({layouts[x]})" for x in layouts if x in parts) + " GiB")
    print(f"  shards (computed): the policy's fp32 master weights and AdamW's moments (and fp32 gradients where they "
          f"exist) and the reference's bf16 weights, 1/{world} each, FSDP2's padding of dim 0 included; FSDPMemTracker "
          f"saw exactly the policy's and AdamW's at every measured depth: {'yes' if agrees else 'NO'}")
    print(f"  rest, measured: torch's memory trackers under FakeTensorMode, this process rank 0 of a fake {world}-rank "
          f"process group, the real code at the real width, image size and token counts with (decoder layers, vision "
          f"blocks) = {' '.join(f'({x},{y})' for x, y in MEMORY_DEPTHS)}, fitted per layer and per block and "
          f"extrapolated to ({s['layers']},{s['vision_depth']}); the optimizer step at full depth. Computed: start-up "
          f"(rank 0 reads the checkpoint once in bf16 and broadcasts a tensor at a time) and save (a parameter at a "
          f"time gathered in bf16), on a process of {rss / GIB:.2f} GiB before any weight (measured here)")
    print(f"  not in the figures: the CUDA context, NCCL's and cuBLAS's buffers, the caching allocator's rounding and "
          f"fragmentation (no GPU here); FSDP's overlap on CUDA streams, one unit gathered ahead and one "
          f"reduce-scatter behind (computed: {6 * layer / GIB:.2f} GiB for a decoder layer); the decode attention "
          f"over the rows' own tokens after step 3 (computed: < {R * s['heads'] * T * 8 / GIB:.2f} GiB)")
    print(f"  extrapolation check: the fit on (layers, blocks) = {' '.join(map(str, MEMORY_DEPTHS[:3]))} predicts "
          f"{last}; each phase's peak and its peaks inside each kind of unit are fitted, the highest at full depth "
          f"counts:")
    for c in check:
        print(f"    {c['phase']:40s} predicted {c['predicted_gib']:8.3f} GiB, measured {c['measured_gib']:8.3f} GiB, "
              f"error {c['error']:.2%} ({'the whole phase' if c['part'] == 'Total' else c['part']}: its peak at full "
              f"depth)")
    return dict(world=world, pairs=plan["pairs"], k=K, completion=T, micro_batch=plan["micro_batch"],
                grad_checkpointing=plan["checkpointing"], image=list(plan["size"]), prompt_tokens=P,
                parameters=total, budget_gib=a.budget, phases=rows, check=check, shards_agree=agrees,
                rollout_parts_gib={str(k): v / GIB for k, v in parts.items()},
                host_rss_gib=rss / GIB, depths=[dict(layers=d[0], blocks=d[1], phases={str(k): v for k, v in m.items()})
                                                for d, m in measured.items()], seconds=time.time() - t0)


# -----------------------------------------------------------------------------


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.child:
        spec = json.loads(a.child)
        return decode_child(spec) if spec.get("stage") == "decode" else grpo_child(spec)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    stages = a.stage or ["vote", "grpo", "eval", "distort", "decode"]
    if a.quick:
        a.votes, a.k, a.samples, a.steps, a.mult = min(a.votes, 4), min(a.k or 8, 3), min(a.samples, 2), 1, a.mult[-1:]
    a.reasoning = a.reasoning or (4 if a.quick else 256 if a.shape in ("7b", "3b") else 32)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    machine = dict(device=str(device), cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                   load=os.getloadavg()[0], torch=torch.__version__, date=time.strftime("%Y-%m-%d", time.gmtime()))
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name()
    print(f"bench: shape {a.shape}, stages {' '.join(stages)}; {json.dumps(machine)}")
    results = dict(bench="evoquality", shape=a.shape, machine=machine)
    needs_model = [s for s in stages if s in ("vote", "eval", "decode")]
    if needs_model:
        model, tok, cfg, side, grpo_side = build_model(a.shape, device)
        n = sum(p.numel() for p in model.parameters())
        print(f"model: {a.shape}, {n / 1e6:.1f}M parameters ({sum(p.numel() for p in model.model.visual.parameters()) / 1e6:.1f}M "
              f"vision), {next(model.parameters()).dtype}")
        for s in needs_model:
            results[s] = dict(vote=bench_vote, eval=bench_eval, decode=bench_decode)[s](
                model, tok, cfg, grpo_side if s == "decode" and not a.quick else side, a, device)
        del model
    if "grpo" in stages:
        results["grpo"] = bench_grpo(a, device)
    if "distort" in stages:
        results["distort"] = bench_distort(a)
    if "memory" in stages:
        results["memory"] = bench_memory(a)
    results["machine"]["load_end"] = os.getloadavg()[0]
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
