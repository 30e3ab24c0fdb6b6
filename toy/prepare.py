"""
The CPU demo's toy world, in the spirit of nanoGPT's data/*/prepare.py: real photographs that come with
scikit-image, cut into many small references, distorted by distort.py at every level, and a toy base model.

    python toy/prepare.py --out runs/demo                                # the demo's world (~2 minutes, 2 cores)
    python toy/prepare.py --out /tmp/toy --crops 1 --steps 40 --lr 5e-3  # seconds: a small world whose base
                                                                         # answers validly (the stages' examples)

Writes
    <out>/refs/{train,heldout}/<photo>_<i>.png   random crops, split by photograph (no photo in both)
    <out>/pool/{train,heldout}/manifest.jsonl    distort.py's pools: each crop plus 5 types x 5 levels
    <out>/heldout.jsonl                          the held-out pool with a ground-truth `mos` for evaluate.py
    <out>/base/                                  the toy base model: an ordinary checkpoint directory, with the
                                                 toy prompts in its prompts.json (no reasoning suffix)
    <out>/base.json                              the warm-up's settings and the base model's held-out figures

The base model stands in for the pretraining a real VLM has, and it is made WITH labels: a short supervised
warm-up of the built-in tiny architecture. EvoQuality itself (vote.py -> train_grpo.py) never sees a label.
Like Qwen2.5-VL in the paper, the base compares better than it scores:
- compare (toy/prompts.json, answers A / B): taught which of two images of one (crop, type) group has the lower
  level, first on clean labels, then on soft 0.7 / 0.3 targets, so that one sampled vote is noisy but a
  majority of many is right;
- score (answer a digit 1-5): taught the answer's FORMAT only: a fresh random digit for every image each time
  it is seen, so its sampled scores spread over all five digits (room for GRPO to explore) and rank nothing.
  What a good image is, EvoQuality has to carry over from the compare answer to the score by itself.
  (--score-type T also teaches the true quality of type T's images. Not the demo's choice: the compare training
  builds a quality feature that the taught type's scores then read for EVERY type, so the base already ranked
  the training images of each (crop, type) group by its expected score (SRCC 0.92 within groups, blur taught),
  left GRPO nothing to learn on its training pairs, and round 1 only narrowed the sampled scores' spread.
  Untaught, the base's within-group SRCC on the training pool is -0.09, and round 1 lifts it to 0.73.)
The ground truth is the level: within a (crop, type) group, a lower level is better; `mos` = 5 - level.

A warm-up step encodes the images of a few (crop, type) groups once through the vision tower and asks many
questions about them: the vision tower is the expensive part on a CPU, the text model is cheap.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image
from scipy.stats import spearmanr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402

# scikit-image's bundled photographs (grey ones become RGB); the held-out four are fixed here, never tuned
PHOTOS = ["astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket",
          "stereo_motorcycle", "camera", "coins", "grass", "gravel", "moon", "brick", "clock"]
HELDOUT = ["coffee", "camera", "gravel", "hubble_deep_field"]
TYPES = ["blur_gaussian", "noise_gaussian_rgb", "darken_rgb_shift", "contrast_weaken_scale", "contrast_weaken_stretch"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # data
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--crops", type=int, default=12, help="random crops per photograph")
    p.add_argument("--size", type=int, default=56, help="crop side in pixels (56 -> 4 visual tokens)")
    p.add_argument("--types", default=",".join(TYPES), help="distortion types of the toy pools")
    p.add_argument("--prompts", default=os.path.join(ROOT, "toy", "prompts.json"), help="the demo's prompts")
    p.add_argument("--score-type", default="none",
                   help="the one type whose scores the warm-up teaches; none (the demo): no type, only the format")
    # warm-up
    p.add_argument("--steps", type=int, default=1200, help="optimiser steps")
    p.add_argument("--clean-steps", type=int, default=800, help="steps on clean compare labels before soft ones")
    p.add_argument("--soft", type=float, default=0.7, help="target probability of the better image after that")
    p.add_argument("--groups", type=int, default=4, help="(crop, type) groups per step: their images are encoded once")
    p.add_argument("--pairs", type=int, default=12, help="compare questions per group per step (of 15 pairs)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW, constant")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# the toy world: crops of the bundled photographs, distorted at every level

def make_refs(out, crops, size, seed):
    """Square crops of random sizes, downscaled to size x size, split into train / held-out by photograph."""
    import skimage.data

    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        split = "heldout" if name in HELDOUT else "train"
        os.makedirs(os.path.join(out, "refs", split), exist_ok=True)
        photo = getattr(skimage.data, name)()
        photo = photo[0] if isinstance(photo, tuple) else photo  # stereo_motorcycle: (left, right, disparity)
        image = Image.fromarray(photo).convert("RGB")
        for i in range(crops):
            side = int(rng.integers(min(image.size) // 4, min(image.size) // 2 + 1))
            x, y = rng.integers(0, image.width - side + 1), rng.integers(0, image.height - side + 1)
            crop = image.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC)
            crop.save(os.path.join(out, "refs", split, f"{name}_{i}.png"))


def distort_pools(out, types, seed):
    for split in ("train", "heldout"):
        run = subprocess.run([sys.executable, os.path.join(ROOT, "distort.py"), "--input", os.path.join(out, "refs", split),
                              "--out", os.path.join(out, "pool", split), "--types", ",".join(types),
                              "--variants", str(len(types)), "--all-levels", "--seed", str(seed), "--workers", "2"],
                             capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"distort.py failed on {split}:\n{run.stdout[-2000:]}{run.stderr[-2000:]}")


def load_pool(out, split, cfg):
    """The pool's rows and {image: (pixel_values, grid)}."""
    manifest = os.path.join(out, "pool", split, "manifest.jsonl")
    rows = common.read_jsonl(manifest)
    base = os.path.dirname(manifest)
    images = {r["image"]: common.preprocess_image(common.load_image(os.path.join(base, r["image"])), cfg) for r in rows}
    return rows, images


def groups_of(rows):
    """{(crop, type): rows by level}: the original counts as level 0 of every type."""
    types = sorted({r["distortion"] for r in rows if r["distortion"]})
    groups = {}
    for r in rows:
        for t in [r["distortion"]] if r["distortion"] else types:
            groups.setdefault((r["ref"], t), []).append(r)
    return {k: sorted(g, key=lambda r: r["level"]) for k, g in sorted(groups.items())}


def reinit(model, seed):
    """
    An ordinary initialisation for training: the built-in tiny model is drawn at std 0.3 (common.INIT_STD, wide on
    purpose so the equivalence tests can see a wrong position or mask), which saturates its softmaxes and leaves a
    warm-up at chance. Weights at 1/sqrt(fan_in), embeddings and output at 0.02; norms and biases as they are.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2:
                continue
            fan_in = p[0].numel()
            std = 0.02 if "embed_tokens" in name or "lm_head" in name else fan_in ** -0.5
            p.copy_(torch.randn(p.shape, generator=gen) * std)


# -----------------------------------------------------------------------------
# the warm-up: cross-entropy on the one-token answer and the <|im_end|> after it

def answer_loss(model, requests, images, image_embeds, targets):
    """Mean cross-entropy of the last two tokens of each request (answer, <|im_end|>); targets [B, 2, V]."""
    x, mask, pos, _ = common.batch_inputs(model, requests, images, image_embeds=image_embeds)
    logits = model(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=3).logits
    return -(targets * logits[:, :2].float().log_softmax(-1)).sum(-1).sum(-1).mean()


def warm_up(model, tok, prompts, rows, images, args, log=print):
    rng = np.random.default_rng(args.seed)
    groups = list(groups_of(rows).values())
    grid = next(iter(images.values()))[1]
    compare_ids = common.encode_prompt(tok, prompts, "compare", [grid, grid], think=False)
    score_ids = common.encode_prompt(tok, prompts, "score", [grid], think=False)
    V = model.config.text_config.vocab_size
    label = [tok.convert_tokens_to_ids(s) for s in prompts["compare_labels"]]
    digit = [tok.convert_tokens_to_ids(str(d)) for d in range(1, 6)]
    end = tok.convert_tokens_to_ids("<|im_end|>")

    def score_digit(r):
        if r["distortion"] == args.score_type:
            return int(round(5 - 0.8 * r["level"]))  # level 0..5 -> 5 4 3 3 2 1
        # no signal: a fresh random digit each time, so the answer stays near uniform (sampled scores rank nothing).
        # With a taught type, the small tilt it gives the others, borrowed from the compare training, still ordered
        # the images of a group (the report's expected score). A fixed digit per image changed neither.
        return int(rng.integers(1, 6))

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model.train()
    t0 = time.time()
    for step in range(args.steps):
        soft = 1.0 if step < args.clean_steps else args.soft
        chosen = [groups[i] for i in rng.choice(len(groups), args.groups, replace=False)]
        keys = list(dict.fromkeys(r["image"] for g in chosen for r in g))
        embeds = common.encode_images(model, images, keys)  # once per image, however many questions use it
        requests, targets = [], []
        for g in chosen:
            pairs = [(i, j) for i in range(len(g)) for j in range(i + 1, len(g))]  # g[i] is better: lower level
            for n in rng.choice(len(pairs), min(args.pairs, len(pairs)), replace=False):
                better, worse = g[pairs[n][0]]["image"], g[pairs[n][1]]["image"]
                first = rng.random() < 0.5  # which side the better image is shown on
                t = torch.zeros(2, V)
                t[0, label[0 if first else 1]], t[0, label[1 if first else 0]] = soft, 1 - soft
                t[1, end] = 1.0
                requests.append((compare_ids + [label[0], end], [better, worse] if first else [worse, better]))
                targets.append(t)
        n_compare = len(requests)
        for key in keys:
            r = next(r for g in chosen for r in g if r["image"] == key)
            t = torch.zeros(2, V)
            t[0, digit[score_digit(r) - 1]], t[1, end] = 1.0, 1.0
            requests.append((score_ids + [digit[0], end], [key]))  # the answer ids are only placeholders
            targets.append(t)
        targets = torch.stack(targets)
        loss_c = answer_loss(model, requests[:n_compare], images, embeds, targets[:n_compare])
        loss_s = answer_loss(model, requests[n_compare:], images, embeds, targets[n_compare:])
        optimizer.zero_grad(set_to_none=True)
        (loss_c + loss_s).backward()
        optimizer.step()
        if step % 100 == 0 or step == args.steps - 1:
            log(f"step {step:5d} | compare loss {loss_c.item():.3f} | score loss {loss_s.item():.3f} | "
                f"{time.time() - t0:.0f}s")
    model.eval()


# -----------------------------------------------------------------------------
# how good is a model as a voter and as a scorer (exact one-token probabilities, no sampling)

@torch.no_grad()
def measure(model, tok, prompts, rows, images, batch=256):
    """dict: compare single-vote and argmax accuracy over both orders of every pair of a (crop, type) group;
    expected-score SRCC against -level overall and averaged within groups."""
    grid = next(iter(images.values()))[1]
    compare_ids = common.encode_prompt(tok, prompts, "compare", [grid, grid], think=False)
    label = [tok.convert_tokens_to_ids(s) for s in prompts["compare_labels"]]
    groups = groups_of(rows)
    pairs = sorted({(g[i]["image"], g[j]["image"]) for g in groups.values()
                    for i in range(len(g)) for j in range(i + 1, len(g)) if g[i]["level"] < g[j]["level"]})
    right, wrong = [], []
    for s in range(0, len(pairs), batch):
        chunk = pairs[s:s + batch]
        requests = [(compare_ids, [b, w]) for b, w in chunk] + [(compare_ids, [w, b]) for b, w in chunk]
        probs = common.prefill(model, requests, images)[0].softmax(-1)
        n = len(chunk)
        right += probs[:n, label[0]].tolist() + probs[n:, label[1]].tolist()
        wrong += probs[:n, label[1]].tolist() + probs[n:, label[0]].tolist()
    right, wrong = np.array(right), np.array(wrong)
    return dict(compare_single=float(right.mean()), compare_argmax=float((right > wrong).mean()),
                compare_valid=float((right + wrong).mean()),
                **score_figures(expected_scores(model, tok, prompts, rows, images, batch), rows))


@torch.no_grad()
def expected_scores(model, tok, prompts, rows, images, batch=256):
    """{image: the expected score sum_d d * p(d) / sum_d p(d)} over the one-token answers 1-5 (no sampling noise)."""
    grid = next(iter(images.values()))[1]
    score_ids = common.encode_prompt(tok, prompts, "score", [grid], think=False)
    digit = [tok.convert_tokens_to_ids(str(d)) for d in range(1, 6)]
    expected = {}
    keys = [r["image"] for r in rows]
    for s in range(0, len(keys), batch):
        probs = common.prefill(model, [(score_ids, [k]) for k in keys[s:s + batch]], images)[0].softmax(-1)
        p = probs[:, digit]
        expected.update(zip(keys[s:s + batch], (p @ torch.arange(1.0, 6.0) / p.sum(-1)).tolist()))
    return expected


def score_figures(expected, rows):
    """SRCC of the expected scores against -level: over all images, and averaged within (crop, type) groups, by type."""
    keys = [r["image"] for r in rows]
    level = {r["image"]: r["level"] for r in rows}
    srcc = lambda ks: spearmanr([expected[k] for k in ks], [-level[k] for k in ks])[0]
    within = {}
    for (ref, t), g in groups_of(rows).items():
        within.setdefault(t, []).append(srcc([r["image"] for r in g]))
    return dict(score_srcc=float(srcc(keys)), score_srcc_within={t: float(np.nanmean(v)) for t, v in within.items()},
                score_srcc_within_mean=float(np.nanmean([v for vs in within.values() for v in vs])))


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    t0 = time.time()
    make_refs(args.out, args.crops, args.size, args.seed)
    distort_pools(args.out, args.types.split(","), args.seed)
    model, tok, cfg = common.load_model("tiny", "cpu", "float32")
    reinit(model, args.seed)
    cfg = dict(cfg, min_pixels=args.size * args.size, max_pixels=args.size * args.size)
    prompts = common.load_prompts(args.prompts)
    train, train_images = load_pool(args.out, "train", cfg)
    heldout, heldout_images = load_pool(args.out, "heldout", cfg)
    print(f"toy world: {len(train_images)} train / {len(heldout_images)} held-out images "
          f"({len(PHOTOS) - len(HELDOUT)} / {len(HELDOUT)} photographs x {args.crops} crops x (1 + "
          f"{len(args.types.split(','))} types x 5 levels)) in {time.time() - t0:.0f}s")
    print(f"warm-up: {args.steps} steps ({args.clean_steps} on clean compare labels, then {args.soft} / "
          f"{1 - args.soft:.1f}) x {args.groups} groups x ({args.pairs} compare + 6 score questions)")
    warm_up(model, tok, prompts, train, train_images, args)
    base = measure(model, tok, prompts, heldout, heldout_images)
    print(f"base on held-out: compare single-vote {base['compare_single']:.3f}, argmax {base['compare_argmax']:.3f}; "
          f"expected-score SRCC {base['score_srcc']:.3f}, within groups {base['score_srcc_within_mean']:.3f} ("
          + ", ".join(f"{t} {v:.2f}" for t, v in base["score_srcc_within"].items()) + ")")

    common.save_checkpoint(model, tok, cfg, os.path.join(args.out, "base"))
    common.save_prompts(os.path.join(args.out, "base"), prompts, False)  # one-token answers: no reasoning suffix
    held = [dict(r, mos=5 - r["level"], image=os.path.join("pool", "heldout", r["image"])) for r in heldout]
    common.write_jsonl_atomic(os.path.join(args.out, "heldout.jsonl"), held)
    common.write_atomic(os.path.join(args.out, "base.json"),
                        json.dumps(dict(args=vars(args), heldout=base, seconds=time.time() - t0), indent=1) + "\n")
    print(f"wrote {args.out}/base and {args.out}/heldout.jsonl ({len(held)} images) in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    common.run_main(main)
