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
    python bench.py --stage memory --shape 7b --world 1 --lora 64 --budget 38          # LoRA on one 48 GB GPU

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
  memory   (only when named) memplan.py's plan of --shape on --world ranks: the peak bytes per rank of each phase of
           a training step against --budget, measured without a GPU (see memplan.py); --lora R: train_grpo.py's
           --lora R

Shapes: tiny (common's built-in model); small (random weights, a width where a CPU is arithmetic-bound);
7b and 3b (Qwen2.5-VL-7B-Instruct's and -3B-Instruct's config.json values, random bf16 weights, CUDA only but for
--stage memory). All use common's tiny tokenizer (a model vocabulary at least its size), but for the memory plan of 7b
and 3b, which uses Qwen2.5-VL's own when ../shared/models has it (the prompts training sees).
"""

import argparse
import contextlib
import copy
import functools
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
from PIL import Image

import common
import distort
import evaluate
import memplan
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
    memplan.add_arguments(p)  # --world, --image-size, --budget, --lora
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


def model_config(shape, tok):
    """The Qwen2.5-VL config of a shape around `tok`'s special tokens."""
    from transformers import Qwen2_5_VLConfig

    s = SHAPES[shape][0]
    ids = {t: tok.convert_tokens_to_ids(t) for t in common.SPECIAL_TOKENS}
    hd = s["hidden"] // s["heads"]
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=s["vocab"] or len(tok), hidden_size=s["hidden"], intermediate_size=s["ffn"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                         max_position_embeddings=128000, rms_norm_eps=1e-6,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                              mrope_section=[hd // 8, 3 * hd // 16, 3 * hd // 16]),
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], initializer_range=s["std"]),
        vision_config=dict(depth=s["vision_depth"], hidden_size=s["vision_hidden"], intermediate_size=s["vision_ffn"],
                           num_heads=s["vision_heads"], out_hidden_size=s["hidden"], window_size=112,
                           fullatt_block_indexes=s["fullatt"], initializer_range=s["std"]),
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
    fn = policy.shared_prefix_logprobs if spec["path"] == "shared" else policy.completion_logprobs
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
            # seconds under the default allocator; memory in a second run under MEMORY_ENV (--quick: both from one)
            runs = [run_child(spec, a.threads, env) for env in ((MEMORY_ENV,) if a.quick else (os.environ, MEMORY_ENV))]
            sides[path] = dict(runs[-1], seconds=runs[0]["seconds"])
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
# stage: the memory plan (memplan.py) of a shape


def memory_tokenizer(shape):
    """(tokenizer, name): Qwen2.5-VL's own for the real shapes when its files are here (../shared/models), whose
    prompts are those training sees; else common's tiny tokenizer (a longer prompt: its text takes more tokens)."""
    real = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "models", "qwen2.5-vl-7b-instruct")
    if shape in ("7b", "3b") and os.path.isdir(real):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(real), "Qwen2.5-VL's tokenizer"
    return common.tiny_tokenizer(), "the tiny tokenizer"


def write_shape(shape, out):
    """A checkpoint directory of `shape` without weights (config.json and tokenizer files), as memplan.plan reads;
    the name of its tokenizer."""
    tok, name = memory_tokenizer(shape)
    model_config(shape, tok).save_pretrained(out)
    tok.save_pretrained(out)
    return name


def bench_memory(a):
    if a.shape not in SHAPES:
        raise SystemExit(f"--stage memory plans one of the shapes {', '.join(SHAPES)}, not {a.shape}")
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        spec = os.path.join(tmp, a.shape)
        print(f"\n--shape {a.shape}: its config.json with {write_shape(a.shape, spec)} (memplan.py)")
        return memplan.plan(spec, a.world, a.pairs, a.k, a.completion, a.micro_batch, a.grad_checkpointing is not False,
                            None, a.image_size, a.budget, a.lora, log=lambda *x: print(*x, flush=True))


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
