"""
Offline stage of EvoQuality (paper Sec. 3.1, Algorithm 1 lines 2-5): the current model votes K times on each
image pair with the compare prompt (Table 1), and majority voting gives the pseudo-label p* (Eq. 1).

    # round 1: 20,000 random pairs of authentic images, K = 32, T = 1.0 (paper Sec. 4.1); pool/ is distort.py's
    # output from your photos (KonIQ-10k's in the paper), the model comes from the hub
    python vote.py --model Qwen/Qwen2.5-VL-7B-Instruct --manifest pool/manifest.jsonl --mode random \\
        --source authentic --pairs 20000 --k 32 --out round1/votes.jsonl
    torchrun --standalone --nproc_per_node=8 vote.py --model Qwen/Qwen2.5-VL-7B-Instruct \\
        --manifest pool/manifest.jsonl --mode random --source authentic --pairs 20000 --out round1/votes.jsonl
    # round 2: pairs among an original and its distorted variants, voted by the round-1 model
    torchrun --standalone --nproc_per_node=8 vote.py --model round1/final --manifest pool/manifest.jsonl \\
        --mode same-ref --pairs 20000 --out round2/votes.jsonl
    # CPU, from a fresh clone: a toy pool (seconds; see toy/prepare.py), then the tiny random-weight model (its
    # votes are noise, the plumbing is real) and the toy base model (its prompts.json: A / B labels, no suffix)
    python toy/prepare.py --out /tmp/toy --crops 1 --steps 40 --lr 5e-3
    python vote.py --model tiny --manifest /tmp/toy/pool/train/manifest.jsonl --pairs 10 --k 4 \\
        --max-new-tokens 16 --out /tmp/v.jsonl
    python vote.py --model /tmp/toy/base --manifest /tmp/toy/pool/train/manifest.jsonl --mode same-ref \\
        --pairs 100 --k 16 --out /tmp/toy/votes.jsonl

Each pair's K queries are split evenly between the two orders (a first, b first): K//2 each, the odd one's
order drawn per pair. Equal counts cancel position bias exactly instead of on average; which image of a pair is
`a` is random too. Each order is one request sampled K/2 times from a single prefill.

A checkpoint written by train_grpo.py or toy/prepare.py carries the prompts it was trained with (prompts.json:
the prompts and whether the reasoning suffix was on); they are used unless --prompts or --think / --no-think say
otherwise, and the run prints which prompts it uses and from where. <out>.args.json records them as resolved.

--no-think drops the reasoning suffix, so the answer is one token: the bare label ("0" or "1"), any token whose
text stripped of spaces is a label counting for it. One forward pass per order then gives the exact probability
of each label under softmax(logits / T) over the whole vocabulary (the rest is the invalid rate), and the K votes
are a multinomial draw from it: the same distribution as K sampled one-token answers, without sampling them.

Every pair's votes depend only on (--seed, its index, the order), never on batches or ranks, so a killed run
restarted with the same arguments, or one on another number of ranks, ends with the same file. Finished pairs
are appended to <out>.part (<out>.rank{r}.part under torchrun); rank 0 merges them into <out> at the end.
<out>.args.json records the arguments, and a rerun with other arguments refuses to touch the results.

Output, one line per pair: i, a, b (paths as in the manifest), wins_a, wins_b, invalid, k, p (p* from a's
side), first_wins (votes for the image shown first), the images' ref/distortion/level/mos as ref_a, ref_b, ...
when the manifest has them (diagnostics only, never labels), and with --save-text the completions (texts: ab
and ba, by order shown) or, with --no-think, the label probabilities per order (probs).

--task score is the offline stage of EvoEstimate (paper Sec. 4.3, Table 5), the ablation that votes on absolute
scores instead: K samples of the score prompt c_score per image (--images N of the manifest, or all), and the
pseudo-estimate is the mean of the valid ones; train_grpo.py --reward regression trains on it.

    python vote.py --task score --model Qwen/Qwen2.5-VL-7B-Instruct --manifest pool/manifest.jsonl \\
        --source authentic --images all --k 32 --out round1/estimates.jsonl

One line per image: i, image, k, scores (the K parsed scores, null where invalid), estimate (their valid mean,
null if none is valid), invalid, the image's ref/distortion/level/mos when the manifest has them, and with
--save-text the completions (texts). With --no-think an answer is one token, and one forward gives each image's
exact score distribution over the tokens that parse as a score: expected (the exact mean score of a valid answer)
is written, the K scores are a draw from that distribution, and --save-text adds it (probs).
"""

import argparse
import glob
import json
import math
import os

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import common

META = ("ref", "distortion", "level", "mos")  # copied to the output for diagnostics, never used as labels
FIELD_TYPES = dict(ref=str, distortion=str, source=str, level=(int, float), mos=(int, float))  # each may be null


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # data
    p.add_argument("--model", default="tiny",
                   help="'tiny', a checkpoint directory or a hub id (paper: Qwen/Qwen2.5-VL-7B-Instruct)")
    p.add_argument("--manifest", required=True,
                   help="JSONL with an 'image' path (relative to it) per line, e.g. distort.py's")
    p.add_argument("--mode", choices=("random", "same-ref"), default="random",
                   help="random: any two images (round 1); same-ref: images sharing a 'ref', originals included "
                        "(round 2)")
    p.add_argument("--source", default=None, help="only images with this 'source', e.g. authentic (round 1)")
    p.add_argument("--group-by", default="ref", help="same-ref fields, e.g. ref,distortion: one distortion type "
                   "(plus its original, which has none) per group")
    p.add_argument("--pairs", default="20000", help="distinct unordered pairs to draw, or 'all' (paper: 20000)")
    p.add_argument("--pairs-file", default=None, help="vote on these pairs, in this order, instead of drawing them "
                   "(JSONL with 'a', 'b' paths as in the manifest)")
    p.add_argument("--seed", type=int, default=0, help="fixes the pairs, the orders and every sample")
    p.add_argument("--task", choices=("compare", "score"), default="compare",
                   help="compare: K votes per pair, Eq. 1 (EvoQuality); score: K scores per image with c_score, "
                        "their mean the pseudo-estimate (EvoEstimate, Sec. 4.3; not the paper's method)")
    p.add_argument("--images", default="all", help="--task score: images drawn from the manifest, or 'all'")
    # sampling
    p.add_argument("--k", type=int, default=32,
                   help="queries per pair, split evenly between the two orders (paper: 32)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (paper: 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (paper: off)")
    p.add_argument("--top-k", type=int, default=0, help="0: off (paper: off)")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="a longer reasoning counts as invalid")
    p.add_argument("--think", action=argparse.BooleanOptionalAction, default=None,
                   help="the reasoning suffix (default: as the --model checkpoint was trained, else on as in the paper); "
                        "--no-think: exact one-token vote probabilities")
    p.add_argument("--batch-pairs", type=int, default=4, help="pairs per sampler call (2 requests x K/2 rows each; "
                   "--task score: images, 1 request x K rows each)")
    p.add_argument("--prompts", default=None, help="JSON overriding the Table 1 prompts / compare_labels "
                   "(default: the --model checkpoint's prompts.json, else Table 1)")
    # output
    p.add_argument("--out", default="votes.jsonl", help="one line per pair; <out>.args.json records the arguments")
    p.add_argument("--save-text", action="store_true", help="keep the completions (or --no-think probabilities)")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    args = p.parse_args(argv)
    args.no_think = args.think is False  # what the functions read; main() resolves it against the checkpoint
    if args.pairs != "all" and not (args.pairs.isdigit() and int(args.pairs) > 0):
        p.error(f"--pairs must be a positive integer or 'all', got {args.pairs!r}")
    if args.images != "all" and not (args.images.isdigit() and int(args.images) > 0):
        p.error(f"--images must be a positive integer or 'all', got {args.images!r}")
    if args.task == "score" and args.pairs_file:
        p.error("--pairs-file names pairs: it is for --task compare")
    if args.k < 1 or args.batch_pairs < 1:
        p.error("--k and --batch-pairs must be at least 1")
    common.check_sampling(p, args)
    common.check_numbers(p, args, nonnegative=("seed",))  # numpy's generators take no negative seed
    common.check_out(p, args.out, inputs=(args.manifest, args.pairs_file, args.prompts, args.model))
    return args


# -----------------------------------------------------------------------------
# the pool and its pairs

def read_manifest(path):
    """The manifest's rows, each with its line number (`line`) so that errors can point at it."""
    rows = []
    seen = {}
    for n, row in common.read_jsonl_lines(path):
        row["line"] = n
        rows.append(row)
        if not isinstance(row.get("image"), str):
            raise ValueError(f"{path}:{n}: no 'image' path")
        if row["image"] in seen:
            raise ValueError(f"{path}:{n}: image {row['image']!r} already on line {seen[row['image']]}")
        seen[row["image"]] = n
        for field, kind in FIELD_TYPES.items():  # a "3" for a level would fail only in the summary, after the votes
            value = row.get(field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, kind)
                                      or kind is not str and not math.isfinite(value)):
                raise ValueError(f"{path}:{n}: {field} must be {'a string' if kind is str else 'a number'} or null, "
                                 f"got {value!r}")
    return rows


def groups_of(pool, fields):
    """
    Pool indices grouped by equal values of `fields`. A row without a value for a later field joins every
    group that agrees on the fields it has: an original (distortion null) belongs with each of its variants'
    types. Rows without the first field (no ref) are in no group.
    """
    value = lambda row, f: row.get(f) if row.get(f) != "" else None
    groups = {}
    for j, row in enumerate(pool):
        if all(value(row, f) is not None for f in fields):
            groups.setdefault(tuple(value(row, f) for f in fields), []).append(j)
    for j, row in enumerate(pool):
        if value(row, fields[0]) is not None and any(value(row, f) is None for f in fields[1:]):
            for key, members in groups.items():
                if all(value(row, f) in (None, v) for f, v in zip(fields, key)):
                    members.append(j)
    return list(groups.values())


def draw_pairs(pool, mode, pairs, seed, group_by=("ref",)):
    """
    The run's ordered list of pairs (pool index of a, of b): `pairs` (an int or 'all') distinct unordered pairs
    drawn uniformly from those `mode` allows, in random order, each with a random side as `a`.
    """
    rng = np.random.default_rng(seed)
    if mode == "random":
        total = len(pool) * (len(pool) - 1) // 2

        def pair_at(t):  # the t-th pair (u < v) in the order (0,1), (0,2), (1,2), (0,3), ...
            v = (1 + math.isqrt(1 + 8 * t)) // 2
            return t - v * (v - 1) // 2, v
    else:
        space = sorted({(u, v) for g in groups_of(pool, group_by) for u in g for v in g if u < v})
        total, pair_at = len(space), space.__getitem__
    count = total if pairs == "all" else int(pairs)
    if count > total or count == 0:
        raise ValueError(f"--pairs {count}: only {total} distinct pairs exist among {len(pool)} images in mode "
                         f"{mode}" + (f" (grouped by {','.join(group_by)})" if mode == "same-ref" else ""))
    picks = rng.permutation(total) if count == total else rng.choice(total, size=count, replace=False)
    swap = rng.random(count) < 0.5
    return [(v, u) if s else (u, v) for (u, v), s in zip(map(pair_at, picks.tolist()), swap)]


def read_pairs_file(path, pool):
    """Pairs given as JSONL lines with 'a' and 'b' paths as in the manifest, kept in their order."""
    index = {row["image"]: j for j, row in enumerate(pool)}
    pairs, seen = [], {}
    for n, row in common.read_jsonl_lines(path):
        if row.get("a") not in index or row.get("b") not in index:
            missing = row.get("a") if row.get("a") not in index else row.get("b")
            raise ValueError(f"{path}:{n}: pair ({row.get('a')!r}, {row.get('b')!r}): {missing!r} is not in the "
                             f"manifest")
        pair = (index[row["a"]], index[row["b"]])
        if pair[0] == pair[1] or frozenset(pair) in seen:
            raise ValueError(f"{path}:{n}: pair ({row['a']!r}, {row['b']!r}) is a self-pair or repeats line "
                             f"{seen.get(frozenset(pair), n)}")
        seen[frozenset(pair)] = n
        pairs.append(pair)
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs


# -----------------------------------------------------------------------------
# voting

def preference(wins_a, wins_b):
    """Eq. 1: p*(a, b) = 1 if a has more votes, 0.5 on a tie, 0 if b has more. Invalid answers count for neither."""
    return 1.0 if wins_a > wins_b else 0.5 if wins_a == wins_b else 0.0


def order_counts(k, seed, i):
    """Queries of pair i shown (a, b) and (b, a): K//2 each, the odd one's order drawn from (seed, i) by numpy's
    seeded generator (a CRC's low bit, before, ran in blocks of consecutive pairs and was equal for seeds 0 / 1)."""
    ab = k // 2 + k % 2 * int(np.random.default_rng([seed, i]).integers(2))
    return ab, k - ab


def tally(ab, ba):
    """Votes of a pair from its (first, second, invalid) counts in each order, mapped back to a and b."""
    return dict(wins_a=ab[0] + ba[1], wins_b=ab[1] + ba[0], invalid=ab[2] + ba[2], first_wins=ab[0] + ba[0])


def label_tokens(tokenizer, labels):
    """Per label, the token ids whose text alone, stripped, is that label: a one-token answer naming it."""
    texts = tokenizer.batch_decode([[t] for t in range(len(tokenizer))], skip_special_tokens=True)
    ids = [[t for t, s in enumerate(texts) if s.strip() == label] for label in labels]
    for label, found in zip(labels, ids):
        if not found:
            raise ValueError(f"--no-think: compare label {label!r} is not a single token of this tokenizer")
    return ids


@torch.no_grad()
def label_probs(model, tokenizer, requests, images, label_ids, temperature, top_p=1.0, top_k=0):
    """[R, L] float64: the probability that a one-token answer to each request is each of the L labels (the first /
    second image's, or with --task score each score value), a label being any of its token ids."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else common.stop_ids(tokenizer)[0]
    logits = common.prefill(model, requests, images, pad_id=pad)[0]  # float32, as the sampler sees them
    probs = common.token_probs(logits, temperature, top_p, top_k)  # what the sampler draws from
    return torch.stack([probs[:, ids].sum(-1) for ids in label_ids], -1).double().cpu()


def output_row(i, a, b, ab, ba, k):
    """Pair i's line: its votes and p* (Eq. 1), and the images' manifest fields for diagnostics."""
    v = tally(ab, ba)
    row = dict(i=i, a=a["image"], b=b["image"], wins_a=v["wins_a"], wins_b=v["wins_b"], invalid=v["invalid"], k=k,
               p=preference(v["wins_a"], v["wins_b"]), first_wins=v["first_wins"])
    row.update({f"{field}_{side}": r[field] for field in META for side, r in (("a", a), ("b", b)) if field in r})
    return row


def load_images(rows, root, image_cfg, manifest):
    """{path: (pixel_values, grid)} of the distinct images among `rows`, each decoded once."""
    images = {}
    for row in rows:
        if row["image"] not in images:
            try:
                image = common.load_image(os.path.join(root, row["image"]))
            except ValueError as e:
                raise ValueError(f"{manifest}:{row['line']}: {e}") from None
            images[row["image"]] = common.preprocess_image(image, image_cfg)
    return images


def vote_batch(model, tokenizer, prompts, image_cfg, root, pool, pairs, batch, args, label_ids):
    """Output rows for the pair indices in `batch`: one request per (pair, order), all in one sampler call."""
    images = load_images([pool[j] for i in batch for j in pairs[i]], root, image_cfg, args.manifest)
    requests, counts, seeds = [], [], []
    for i in batch:
        a, b = pool[pairs[i][0]]["image"], pool[pairs[i][1]]["image"]
        for order, shown, n in zip((0, 1), ((a, b), (b, a)), order_counts(args.k, args.seed, i)):
            ids = common.encode_prompt(tokenizer, prompts, "compare", [images[s][1] for s in shown],
                                       think=not args.no_think)
            requests.append((ids, list(shown)))
            counts.append(n)
            seeds.append(common.stable_seed(args.seed, i, order))  # a pair's votes don't depend on its batch
    kept = [r for r, n in enumerate(counts) if n > 0]  # K = 1 leaves one order empty
    results = {r: ((0, 0, 0), None) for r in range(len(requests))}  # request -> (counts, texts or probs)
    if args.no_think:
        probs = label_probs(model, tokenizer, [requests[r] for r in kept], images, label_ids,
                             args.temperature, args.top_p, args.top_k)
        for r, (p0, p1) in zip(kept, probs.tolist()):
            pvals = np.array([p0, p1, max(0.0, 1.0 - p0 - p1)])  # first label, second label, anything else
            drawn = np.random.default_rng(seeds[r]).multinomial(counts[r], pvals / pvals.sum())
            results[r] = (tuple(drawn.tolist()), [p0, p1])
    else:
        out = common.sample(model, tokenizer, [requests[r] for r in kept], images, n=[counts[r] for r in kept],
                            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=[seeds[r] for r in kept])
        texts = iter(out["texts"])  # rows come request by request
        for r in kept:
            mine = [next(texts) for _ in range(counts[r])]
            answers = [common.parse_compare(t, prompts["compare_labels"]) for t in mine]
            results[r] = ((answers.count(0), answers.count(1), answers.count(None)), mine)
    rows = []
    for slot, i in enumerate(batch):
        (ab, extra_ab), (ba, extra_ba) = results[2 * slot], results[2 * slot + 1]
        row = output_row(i, pool[pairs[i][0]], pool[pairs[i][1]], ab, ba, args.k)
        if args.save_text:
            row["probs" if args.no_think else "texts"] = dict(ab=extra_ab, ba=extra_ba)
        rows.append(row)
    return rows


# -----------------------------------------------------------------------------
# --task score (EvoEstimate, Sec. 4.3): K scores of c_score per image, the pseudo-estimate their valid mean

def draw_images(pool, images, seed):
    """The run's images as 1-tuples of pool indices: `images` (an int or 'all') drawn without replacement, kept in
    manifest order."""
    count = len(pool) if images == "all" else int(images)
    if count > len(pool):
        raise ValueError(f"--images {count}: the manifest has only {len(pool)} images")
    return [(j,) for j in sorted(np.random.default_rng(seed).permutation(len(pool))[:count].tolist())]


def score_tokens(tokenizer):
    """([score values], [[token ids]]): the tokens whose text alone is a valid score (common.parse_score), by value."""
    texts = tokenizer.batch_decode([[t] for t in range(len(tokenizer))], skip_special_tokens=True)
    by_value = {}
    for t, s in enumerate(texts):
        value = common.parse_score(s)
        if value is not None:
            by_value.setdefault(value, []).append(t)
    if not by_value:
        raise ValueError("--no-think --task score: no single token of this tokenizer is a valid score")
    values = sorted(by_value)
    return values, [by_value[v] for v in values]


def score_row(i, image, scores, k):
    """Image i's line: its K parsed scores and the pseudo-estimate, their valid mean (None if none is valid)."""
    valid = [s for s in scores if s is not None]
    row = dict(i=i, image=image["image"], k=k, scores=scores, estimate=float(np.mean(valid)) if valid else None,
               invalid=k - len(valid))
    row.update({field: image[field] for field in META if field in image})
    return row


def score_batch(model, tokenizer, prompts, image_cfg, root, pool, items, batch, args, score_ids):
    """Output rows for the image indices in `batch`: one request per image, sampled K times from one prefill, or
    with --no-think K draws from its exact one-token score distribution (score_ids: score_tokens' pair)."""
    shown = [pool[items[i][0]] for i in batch]
    images = load_images(shown, root, image_cfg, args.manifest)
    requests = [(common.encode_prompt(tokenizer, prompts, "score", [images[r["image"]][1]], think=not args.no_think),
                 [r["image"]]) for r in shown]
    seeds = [common.stable_seed(args.seed, r["image"], "score") for r in shown]  # an image's scores: its own seed
    rows = []
    if args.no_think:
        values, ids = score_ids
        probs = label_probs(model, tokenizer, requests, images, ids, args.temperature, args.top_p, args.top_k).numpy()
        for i, image, pv, seed in zip(batch, shown, probs, seeds):
            pv = np.append(pv, max(0.0, 1.0 - pv.sum()))  # each value, then anything else (invalid)
            drawn = np.random.default_rng(seed).choice(len(pv), size=args.k, p=pv / pv.sum())
            row = score_row(i, image, [values[d] if d < len(values) else None for d in drawn.tolist()], args.k)
            valid = pv[:-1].sum()
            row["expected"] = float(pv[:-1] @ np.array(values) / valid) if valid > 0 else None  # exact, no draws
            if args.save_text:
                row["probs"] = {f"{v:g}": float(q) for v, q in zip(values, pv)} | {"invalid": float(pv[-1])}
            rows.append(row)
        return rows
    out = common.sample(model, tokenizer, requests, images, n=args.k, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=seeds)
    for n, (i, image) in enumerate(zip(batch, shown)):
        texts = out["texts"][n * args.k:(n + 1) * args.k]  # rows come request by request
        row = score_row(i, image, [common.parse_score(t) for t in texts], args.k)
        if args.save_text:
            row["texts"] = texts
        rows.append(row)
    return rows


def summarize_scores(rows):
    """Print (and return) what tells a user whether these pseudo-estimates are worth training on."""
    from scipy.stats import spearmanr

    votes = sum(r["k"] for r in rows)
    estimates = np.array([r["estimate"] for r in rows if r["estimate"] is not None])
    spread = [np.std([s for s in r["scores"] if s is not None]) for r in rows if r["k"] - r["invalid"] > 1]
    summary = dict(images=len(rows), votes=votes, invalid_rate=sum(r["invalid"] for r in rows) / votes,
                   all_invalid=sum(r["estimate"] is None for r in rows),
                   estimate_mean=float(estimates.mean()) if len(estimates) else None,
                   estimate_std=float(estimates.std()) if len(estimates) else None,
                   score_spread=float(np.mean(spread)) if spread else None)
    for name, sign in (("level", -1), ("mos", 1)):  # lower level is better, higher mos is better
        known = [(r["estimate"], sign * r[name]) for r in rows if r["estimate"] is not None
                 and isinstance(r.get(name), (int, float))]
        if len(known) > 1 and np.ptp([e for e, _ in known]) > 0:
            summary[f"srcc_{name}"] = float(spearmanr(*zip(*known))[0])
    common.print0(f"images scored     {summary['images']} ({votes} scores)")
    common.print0(f"invalid answers   {summary['invalid_rate']:.1%}; {summary['all_invalid']} images with no valid "
                  f"score (estimate null: train_grpo.py skips them)")
    if len(estimates):
        common.print0(f"pseudo-estimates  mean {summary['estimate_mean']:.3f}, std across images "
                      f"{summary['estimate_std']:.3f}; mean spread of an image's valid scores "
                      + (f"{summary['score_spread']:.3f}" if spread else "-"))
    for name, rule in (("level", "lower level better"), ("mos", "higher mos better")):
        if f"srcc_{name}" in summary:
            common.print0(f"SRCC of the estimates with {name} ({rule}): {summary[f'srcc_{name}']:.3f}")
    common.print0(json.dumps(summary))
    return summary


# -----------------------------------------------------------------------------
# diagnostics: is the base model's vote worth training on?

def ground_truth(row):
    """(by level, by mos) of one output row: 1.0 if the manifest says a is better, 0.0 if b, None if it can't."""
    a, b = ({f: row.get(f"{f}_{side}") for f in META} for side in "ab")
    level = None
    same_type = a["distortion"] == b["distortion"] or None in (a["distortion"], b["distortion"])  # or the original
    if a["ref"] is not None and a["ref"] == b["ref"] and same_type and None not in (a["level"], b["level"]):
        level = None if a["level"] == b["level"] else float(a["level"] < b["level"])  # lower level is better
    mos = None
    if None not in (a["mos"], b["mos"]) and a["mos"] != b["mos"]:
        mos = float(a["mos"] > b["mos"])  # higher mos is better
    return level, mos


def summarize(rows):
    """Print (and return) what tells a user whether these votes are worth training on."""
    votes = sum(r["k"] for r in rows)
    invalid = sum(r["invalid"] for r in rows)
    margins = np.array([abs(r["wins_a"] - r["wins_b"]) / r["k"] for r in rows])
    edges = (0, 0.25, 0.5, 0.75, 1.0)
    margin = {"tie": float(np.mean(margins == 0))}
    margin |= {f"({lo},{hi}]": float(np.mean((margins > lo) & (margins <= hi))) for lo, hi in zip(edges, edges[1:])}
    summary = dict(pairs=len(rows), votes=votes, invalid_rate=invalid / votes,
                   all_invalid=sum(r["wins_a"] + r["wins_b"] == 0 for r in rows),
                   first_shown_wins=sum(r["first_wins"] for r in rows) / max(votes - invalid, 1),
                   p_star={str(v): sum(r["p"] == v for r in rows) / len(rows) for v in (1.0, 0.5, 0.0)}, margin=margin)
    for n, name in enumerate(("level", "mos")):
        truth = [(r["p"], ground_truth(r)[n]) for r in rows if ground_truth(r)[n] is not None]
        if truth:
            summary[f"agree_{name}"] = dict(pairs=len(truth), agree=sum(p == t for p, t in truth) / len(truth),
                                            tie=sum(p == 0.5 for p, _ in truth) / len(truth))
    common.print0(f"pairs voted       {summary['pairs']} ({votes} votes)")
    common.print0(f"invalid answers   {summary['invalid_rate']:.1%}; {summary['all_invalid']} pairs with no valid vote "
                  f"(p* = 0.5 by Eq. 1: train_grpo.py skips them, --min-valid-votes)")
    common.print0(f"first shown wins  {summary['first_shown_wins']:.1%} of valid votes (50% = no position bias)")
    common.print0("p* = 1 / 0.5 / 0  " + " / ".join(f"{v:.1%}" for v in summary["p_star"].values()))
    common.print0("vote margin |K_a - K_b| / K: " + "  ".join(f"{k} {v:.1%}" for k, v in summary["margin"].items()))
    for name, rule in (("level", "same ref and distortion type, lower level better"), ("mos", "higher mos better")):
        if f"agree_{name}" in summary:
            s = summary[f"agree_{name}"]
            common.print0(f"p* agrees with {name} ({rule}) on {s['agree']:.1%} of {s['pairs']} pairs, "
                          f"ties {s['tie']:.1%}")
    common.print0(json.dumps(summary))
    return summary


# -----------------------------------------------------------------------------
# resumable, sharded run

def part_files(out):
    return sorted(glob.glob(glob.escape(out) + ".part") + glob.glob(glob.escape(out) + ".rank*.part"))


def check_resume(out, record):
    """Refuse to mix results of different arguments: leftovers of an earlier run must come from the same ones."""
    leftovers = part_files(out) + ([out] if os.path.exists(out) else [])
    if not leftovers:
        return
    if not os.path.exists(out + ".args.json"):
        raise ValueError(f"{leftovers[0]} exists but {out}.args.json does not, so its arguments are unknown; "
                         f"remove it or choose another --out")
    changed = common.changed_args(out + ".args.json", record)
    if changed:
        raise ValueError(f"{', '.join(leftovers)} came from other arguments ({'; '.join(changed)}); rerun with the "
                         f"same arguments to resume, or remove them / choose another --out")


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = common.dist_setup()
    barrier = dist.barrier if dist.is_initialized() else (lambda: None)
    pool = read_manifest(args.manifest)
    root = os.path.dirname(os.path.abspath(args.manifest))
    if args.pairs_file:
        pairs = read_pairs_file(args.pairs_file, pool)
    else:
        if args.source is not None:
            sources = sorted({str(r.get("source")) for r in pool})
            pool = [r for r in pool if r.get("source") == args.source]
            if not pool:
                raise ValueError(f"{args.manifest}: no image has source {args.source!r} "
                                 f"(sources: {', '.join(sources)})")
        pairs = (draw_pairs(pool, args.mode, args.pairs, args.seed, args.group_by.split(",")) if args.task == "compare"
                 else draw_images(pool, args.images, args.seed))  # --task score: an item is an image, (j,)
    for j in sorted({j for pair in pairs for j in pair}):  # every image exists before any vote is cast
        if not os.path.isfile(os.path.join(root, pool[j]["image"])):
            raise ValueError(f"{args.manifest}:{pool[j]['line']}: image {pool[j]['image']!r} not found "
                             f"({os.path.join(root, pool[j]['image'])})")

    prompts, think, source = common.resolve_prompts(args.model, args.prompts, args.think)
    args.no_think = not think  # what the votes read
    common.print0(source)
    # the prompts and suffix as resolved, not the flags: a resume cannot mix two ways of asking
    record = json.loads(json.dumps({k: v for k, v in vars(args).items() if k not in ("out", "prompts", "think")}
                                   | dict(prompts=prompts)))
    check_resume(args.out, record)
    done = {row["i"] for path in part_files(args.out) + [args.out] for row in common.read_partial_jsonl(path)}
    if rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        common.write_atomic(args.out + ".args.json", json.dumps(record, indent=1, sort_keys=True) + "\n")
    barrier()  # every rank has read what is done before anyone appends
    part = f"{args.out}.rank{rank}.part" if world > 1 else f"{args.out}.part"
    common.drop_torn_tail(part)

    batches = [list(range(s, min(s + args.batch_pairs, len(pairs)))) for s in range(0, len(pairs), args.batch_pairs)]
    todo = [b for b in batches if any(i not in done for i in b)]  # a batch reruns whole: same padding, same numbers
    mine = common.shard(todo, rank, world)
    unit, prefills = ("pairs", "2 prefills per pair") if args.task == "compare" else ("images", "1 prefill per image")
    common.print0(f"{len(pairs)} {unit} ({len(done)} already voted) x K={args.k} = {len(pairs) * args.k} queries "
                  f"({'exact one-token' if args.no_think else 'sampled'}, {prefills}); "
                  f"{len(todo)} of {len(batches)} batches of {args.batch_pairs} {unit} left, over {world} rank(s)")
    if mine:
        model, tokenizer, image_cfg = common.load_model(args.model, args.device or device, args.dtype)
        if args.task == "compare":
            label_ids = label_tokens(tokenizer, prompts["compare_labels"]) if args.no_think else None
            run_batch = lambda batch: vote_batch(model, tokenizer, prompts, image_cfg, root, pool, pairs, batch, args,
                                                 label_ids)
        else:
            score_ids = score_tokens(tokenizer) if args.no_think else None
            run_batch = lambda batch: score_batch(model, tokenizer, prompts, image_cfg, root, pool, pairs, batch, args,
                                                  score_ids)
        for batch in tqdm(mine, desc="vote", disable=rank != 0, unit="batch"):
            rows = run_batch(batch)
            common.append_jsonl(part, [row for row in rows if row["i"] not in done])

    barrier()
    if rank == 0:  # merge: the earlier output (a finished rerun) and every part, in pair order
        rows = {}
        for path in [args.out] + part_files(args.out):
            for row in common.read_partial_jsonl(path):
                rows.setdefault(row["i"], row)
        if sorted(rows) != list(range(len(pairs))):
            raise RuntimeError(f"{args.out}: {len(pairs) - len(rows)} of {len(pairs)} pairs missing after voting")
        common.write_jsonl_atomic(args.out, [rows[i] for i in range(len(pairs))])
        for path in part_files(args.out):
            os.remove(path)
        common.print0(f"wrote {args.out}")
        (summarize if args.task == "compare" else summarize_scores)([rows[i] for i in range(len(pairs))])
    common.dist_exit()


if __name__ == "__main__":
    common.run_main(main)
