"""
The online stage of EvoQuality (paper Sec. 3.2, Eq. 2-6, Algorithm 1 lines 6-15): GRPO on vote.py's
pseudo-labels with the fidelity reward. One run = one round: start from --model, write the evolved model.

    # one 8-GPU node, Qwen2.5-VL-7B; the defaults are the paper's K=32, lr 3e-7, beta 0.05, eps 0.2
    torchrun --standalone --nproc_per_node=8 train_grpo.py --model Qwen/Qwen2.5-VL-7B-Instruct \
        --labels round1/votes.jsonl --out round1/ --batch-pairs 4 --max-new-tokens 1024 \
        --micro-batch 4 --save-every 50
    # more nodes: torchrun's own flags (--nnodes, --node-rank, --rdzv-endpoint); nothing else changes
    # 7B on one GPU: LoRA adapters (rank 64) on the frozen bf16 base, no reference copy (README: LoRA); the paper's
    # 4 pairs x K=32 x 1,024 tokens peak at 34.2 GiB (memplan.py), so 48 GB cards fit; 24 GB ones at --lora 16
    # --batch-pairs 1 --max-new-tokens 512 --micro-batch 1 (README: What fits where)
    python train_grpo.py --model Qwen/Qwen2.5-VL-7B-Instruct --labels round1/votes.jsonl --out round1/ --lora 64 \
        --lr 1e-5
    # one GPU: the same FSDP2 path on one rank; one CPU process: plain fp32 modules
    python train_grpo.py --model Qwen/Qwen2.5-VL-3B-Instruct --labels round1/votes.jsonl --out round1/
    # CPU, from a fresh clone: the toy base model on its own votes, those of vote.py's CPU example (see its
    # docstring; the tiny random-weight model's votes are all invalid, so none of its pairs would train)
    python train_grpo.py --model /tmp/toy/base --labels /tmp/toy/votes.jsonl --image-root /tmp/toy/pool/train \
        --out /tmp/grpo --k 4 --max-new-tokens 2 --batch-pairs 2 --lr 1e-3 --max-steps 4

Image paths in a labels file are relative to --image-root (default: that labels file's directory, where
vote.py's manifest and votes sit). The run writes <out>/metrics.jsonl, <out>/step_<N>/ (a Hugging Face
model directory in --model's dtype, plus the sharded fp32 state that --resume reads; the newest --keep of them;
and prompts.json, the prompts it was trained with, which every later stage uses unless told otherwise) and
<out>/final -> step_<last>; pass <out>/final as the next round's --model. The prompts come from --prompts /
--think / --no-think, else from --model's own prompts.json, else the paper's. --resume continues from the newest
complete step_<N>, bit for bit, on the same number of ranks. policy.py holds how the policy and its reference
live on the ranks: meta-device start-up from one read of --model, FSDP2, bf16 compute over fp32 master weights on
CUDA, activation checkpointing (on by default on CUDA), LoRA, the rollouts' weight gather, and the checkpoints.

--lora R trains low-rank adapters on the frozen base instead of every weight: the base stays in --model's dtype on
CUDA (fp32 on CPU) with no gradient or optimizer state, the adapters are fp32 with AdamW, and the reference log-probs
come from the same model with its adapters off (no second model). One process with LoRA keeps a plain module (no
FSDP2, whose one rank would copy the whole base for the rollouts). step_<N>/ holds the merged weights, which every
stage loads as it loads any checkpoint, and the adapters alone (adapter.safetensors, adapter_config.json).

Log-probs (policy, pi_old, reference) take the shared-prefix path by default: per micro-batch, one forward
over its images' prompts records their keys/values with gradients, then one forward over the completions
attends to them, instead of one prompt+completion forward per completion. It equals the plain path
(--no-shared-prefix, kept as the oracle) to float rounding, with or without --grad-checkpointing and under
FSDP; a micro-batch holding all K completions of its images (--micro-batch K) runs each prompt once.

load_labels decides each pair's label and whether it trains: pairs whose K answers were all invalid are skipped
(--min-valid-votes), as are the same two images repeated with another p (refused, naming both lines; repeats
that agree are merged). Ablations and variants, each off by default and each a departure from the paper:
    --reward regression --labels round1/estimates.jsonl   EvoEstimate (Sec. 4.3, Table 5): Q-Insight's score
        reward against vote.py --task score's pseudo-estimates instead of Eq. 2-3; Eq. 4-6, FSDP and checkpoints
        are shared (metrics.jsonl's fidelity_mean is then the mean score reward of the valid rollouts)
    --adv-norm none      Dr. GRPO's advantage r - mean(r) instead of Eq. 4's standardised one
    --label soft         p* = wins_a / (wins_a + wins_b) instead of Eq. 1's majority
    --min-margin M       only pairs whose vote margin |wins_a - wins_b| / (wins_a + wins_b) is at least M
"""

import argparse
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import common
import policy


MAY_CHANGE_ON_RESUME = {"max_steps", "save_every", "keep", "save_dtype", "grad_checkpointing", "out", "resume"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # data
    ap.add_argument("--model", default="tiny", help="policy init: 'tiny', a checkpoint dir or a hub id")
    ap.add_argument("--labels", nargs="+", required=True,
                    help="vote.py JSONL file(s); with --reward regression, vote.py --task score's (pseudo-estimates)")
    ap.add_argument("--image-root", help="directory the labels' image paths are relative to (default: each labels file's directory)")
    ap.add_argument("--prompts", help="JSON file overriding the paper's prompts (Table 1; default: the --model "
                    "checkpoint's prompts.json, else Table 1); the checkpoints keep the prompts trained with")
    ap.add_argument("--batch-pairs", type=int, default=4, help="pairs per step per rank (the paper's B)")
    ap.add_argument("--batch-groups", type=int, default=0,
                    help="instead: G whole groups of pairs sharing a reference image per step per rank")
    ap.add_argument("--group-by", default="ref", help="the fields a group's pairs share, as vote.py's --group-by: "
                    "ref,distortion makes one group per (reference, type); an original (distortion null) goes "
                    "with its partner's type")
    ap.add_argument("--batch-images", type=int, default=0,
                    help="--reward regression: images per step per rank (0: twice --batch-pairs, the images of B pairs)")
    ap.add_argument("--label", choices=("hard", "soft"), default="hard",
                    help="hard: p* of Eq. 1 as vote.py wrote it (the paper); soft: p* = wins_a / (wins_a + wins_b), "
                         "the vote share (a departure from the paper)")
    ap.add_argument("--min-margin", type=float, default=0.0,
                    help="train only on pairs whose vote margin |wins_a - wins_b| / (wins_a + wins_b) is at least this "
                         "(0: every pair, the paper; more is a departure from it)")
    ap.add_argument("--min-valid-votes", type=int, default=1,
                    help="skip, and count, pairs with fewer valid votes wins_a + wins_b (all invalid: Eq. 1's 0.5 says "
                         "nothing), or with --reward regression images with fewer valid scores")
    ap.add_argument("--epochs", type=int, default=1, help="passes over the pairs")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: all epochs); may change "
                    "on --resume (the learning rate then decays to 0 at the new end)")
    # rollouts
    ap.add_argument("--k", type=int, default=32, help="rollouts per image (paper: K=32)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--think", action=argparse.BooleanOptionalAction, default=None,
                    help="the score prompt's reasoning suffix (default: as the --model checkpoint was trained, else on)")
    ap.add_argument("--gamma", type=float, default=1e-6, help="Eq. 2's variance floor (the paper: 'a small positive constant')")
    # reward and advantage
    ap.add_argument("--reward", choices=("fidelity", "regression"), default="fidelity",
                    help="fidelity: Eq. 2-3 against the pairs' p* (EvoQuality); regression: Q-Insight's score reward "
                         "against vote.py --task score's pseudo-estimates (EvoEstimate, the ablation of Sec. 4.3)")
    ap.add_argument("--score-threshold", type=float, default=0.35,
                    help="--reward regression: a score within this of the estimate earns 1 (Q-Insight's default 0.35)")
    ap.add_argument("--adv-norm", choices=("std", "none"), default="std",
                    help="std: Eq. 4 (the paper); none: r - mean(r), Dr. GRPO's advantage (a departure from the paper)")
    # optimisation
    ap.add_argument("--clip-eps", type=float, default=0.2, help="Eq. 5's epsilon (paper: 0.2)")
    ap.add_argument("--beta", type=float, default=0.05, help="KL weight of Eq. 5 (paper: 0.05)")
    ap.add_argument("--lr", type=float, default=3e-7, help="AdamW learning rate, decayed linearly to 0 (paper: 3e-7)")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm")
    ap.add_argument("--updates-per-batch", type=int, default=1, help="optimiser steps per rollout batch")
    ap.add_argument("--micro-batch", type=int, default=8, help="completions per forward/backward")
    ap.add_argument("--shared-prefix", action=argparse.BooleanOptionalAction, default=True,
                    help="run each prompt once per micro-batch and let its completions attend to its keys/values "
                         "(--no-shared-prefix: one full prompt+completion forward per completion, the plain path)")
    ap.add_argument("--seed", type=int, default=0)
    # LoRA: low-rank adapters on frozen base weights (the paper trains every weight)
    ap.add_argument("--lora", type=int, default=0, help="rank R of LoRA adapters on the frozen base weights (0: full "
                    "fine-tuning, the paper's); the reference is the base, the policy with its adapters off")
    ap.add_argument("--lora-alpha", type=float, help="adapter scale alpha / R (default: alpha = 2R, a scale of 2 at any "
                    "rank)")
    ap.add_argument("--lora-dropout", type=float, help="dropout on the adapters' input (default: 0)")
    ap.add_argument("--lora-targets", help="comma-separated ends of linear names: in the language model's layers, "
                    "lm_head, or visual.<end> in the vision tower, frozen unless named (default: "
                    + ",".join(policy.LORA_TARGETS) + ", every linear of the language model's attention and MLP)")
    # distributed/memory
    ap.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                    help="activation checkpointing of every decoder layer and vision block (default: on on CUDA, off "
                         "on CPU); may change on --resume")
    ap.add_argument("--device", help="default: cuda (the rank's GPU) when available, else cpu")
    ap.add_argument("--dtype", default="float32", help="master weights, the ones AdamW updates (with --lora the "
                    "adapters; the frozen base stays in --model's dtype): float32 only (on CUDA the forward and "
                    "backward run in bf16 over them)")
    # output
    ap.add_argument("--out", required=True, help="run directory (it may move before a --resume)")
    ap.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (0: only at the end); may "
                    "change on --resume")
    ap.add_argument("--keep", type=int, default=2, help="keep the newest N step_<N> directories (0: all); may change "
                    "on --resume")
    ap.add_argument("--save-dtype", choices=("bfloat16", "float16", "float32"),
                    help="dtype of the saved Hugging Face weights (default: --model's, bf16 for the released "
                         "Qwen2.5-VL; the fp32 master weights for --resume are saved apart); may change on --resume")
    ap.add_argument("--resume", action="store_true", help="continue from the newest complete <out>/step_<N>, with the "
                    "same arguments (those that may change say so)")
    args = ap.parse_args(argv)
    args.no_think = args.think is False  # main() resolves it against the --model checkpoint
    if args.dtype != "float32":
        # measured on N(0, 0.02) weights (the config's initializer_range) and on a model built from the 7B config.json:
        # 0.49% and 0.50% of bf16 weights change in one AdamW step at lr 3e-7
        raise SystemExit(f"--dtype {args.dtype}: AdamW needs fp32 master weights. Its updates at the paper's lr 3e-7 "
                         f"are far below half a {args.dtype} step for almost every weight and round away (measured: "
                         f"one step changes 0.5% of bf16 weights, 100% of fp32 ones), so training would silently do "
                         f"almost nothing. On CUDA the forward and backward already run in bf16 over fp32 masters.")
    common.check_numbers(ap, args, nonnegative=("lora",))  # before the defaults below derive from it
    if not args.lora:
        given = [f for f in ("lora_alpha", "lora_dropout", "lora_targets") if getattr(args, f) is not None]
        if given:
            ap.error(f"--{given[0].replace('_', '-')} needs --lora R (without it every weight is trained)")
    else:
        args.lora_alpha = 2.0 * args.lora if args.lora_alpha is None else args.lora_alpha
        args.lora_dropout = 0.0 if args.lora_dropout is None else args.lora_dropout
        args.lora_targets = args.lora_targets or ",".join(policy.LORA_TARGETS)
        if not 0 <= args.lora_dropout < 1:  # NaN fails too
            ap.error(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
        if not all(args.lora_targets.split(",")):
            ap.error(f"--lora-targets: an empty name in '{args.lora_targets}'")
    if args.k < 2:
        raise SystemExit(f"--k must be at least 2 (Eq. 4 standardises within an image's K rollouts), got {args.k}")
    for name in ("batch_pairs", "epochs", "updates_per_batch", "micro_batch"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    common.check_sampling(ap, args, training=True)
    common.check_numbers(ap, args, positive=("gamma", "clip_eps", "lr", "grad_clip", "lora_alpha"),
                         nonnegative=("beta", "weight_decay", "max_steps", "save_every", "keep", "batch_groups", "seed"))
    common.check_out(ap, args.out, inputs=(args.model, args.prompts, *args.labels), directory=True)
    common.check_numbers(ap, args, nonnegative=("min_margin", "min_valid_votes", "batch_images"),
                         positive=("score_threshold",))
    if args.min_margin > 1:
        ap.error(f"--min-margin must be in [0, 1], got {args.min_margin}")
    if args.reward == "regression" and (args.label != "hard" or args.min_margin > 0):
        ap.error("--label and --min-margin choose pairs' labels; --reward regression trains on estimates")
    return args


# -----------------------------------------------------------------------------
# data: vote.py's pairs, checked before any training, grouped into per-step batches


def pair_group(row, fields):
    """
    The values of `fields` a pair's two images share (from the row's <field>_a / <field>_b), or None. The first
    field (the reference) must be set and equal on both sides; a later field null on one side takes the other
    side's value, so a pair (original, blurred) groups with the blurred pairs; two different values: None.
    """
    key = []
    for n, f in enumerate(fields):
        va, vb = row.get(f + "_a"), row.get(f + "_b")
        if n == 0 and (va is None or vb is None):  # no shared reference
            return None
        if va is not None and vb is not None and va != vb:
            return None
        key.append(va if va is not None else vb)
    return tuple(key)


def vote_counts(row, where):
    """(wins_a, wins_b) of a vote.py row, or None for a label file that carries no votes."""
    if "wins_a" not in row and "wins_b" not in row:
        return None
    votes = row.get("wins_a"), row.get("wins_b")
    if not all(type(v) is int and v >= 0 for v in votes):
        raise ValueError(f"{where}: wins_a and wins_b must be non-negative integers, got {votes}")
    return votes


def load_labels(paths, image_root=None, group_by=("ref",), label="hard", min_margin=0.0, min_valid_votes=1):
    """
    [{a, b, names, p, group}]: a, b resolved image paths, names the paths as written (they seed the rollouts,
    so a moved data directory samples the same), p = p*(a, b), group the pair's (file, shared values of group_by).
    The one place that decides a pair's label and whether it trains:
      - p: label 'hard' (the paper) takes the row's p, which must be Eq. 1's 0, 0.5 or 1; label 'soft' (a departure
        from the paper) takes the vote share wins_a / (wins_a + wins_b), Eq. 3 being defined for any p in [0, 1]
        (a row's own p must then be its votes' Eq. 1 or that share; a row without votes gives its own p in [0, 1]);
      - skipped, and counted: pairs with fewer than min_valid_votes valid votes wins_a + wins_b (all K answers
        invalid gives Eq. 1's 0.5, which says nothing), and pairs whose vote margin |wins_a - wins_b| / (wins_a +
        wins_b) is below min_margin (0 valid votes: margin 0). Both read the votes, never p;
      - the same two images twice, in either order: merged if their p agree (one pair, trained once), refused
        with both lines if not.
    A row without wins_a / wins_b (a label file not written by vote.py) is used as its p says, under either label;
    min_margin > 0 and min_valid_votes > 1 need the votes. Errors name file and row.
    """
    pairs, readable, seen = [], set(), {}
    skipped = dict(votes=0, margin=0, merged=0)
    for path in paths:
        root = image_root or os.path.dirname(os.path.abspath(path))
        for n, row in common.read_jsonl_lines(path):
            where = f"{path}:{n}"
            if not (isinstance(row.get("a"), str) and isinstance(row.get("b"), str)):
                raise ValueError(f"{where}: needs image paths 'a' and 'b', got {row}")
            votes = vote_counts(row, where)
            if votes is None and (min_margin > 0 or min_valid_votes > 1):
                raise ValueError(f"{where}: --min-margin and --min-valid-votes > 1 need the row's votes wins_a, wins_b")
            given = row.get("p")
            if "p" not in row:
                raise ValueError(f"{where}: no label 'p' (vote.py writes it: the pseudo-label p* of Eq. 1), got {row}")
            if label == "hard" and (type(given) not in (int, float) or given not in (0, 0.5, 1)):
                raise ValueError(f"{where}: p must be 0, 0.5 or 1 (Eq. 1), got {given!r} (a soft p* in (0, 1) needs "
                                 f"--label soft)")
            if type(given) not in (int, float) or not 0 <= given <= 1:
                raise ValueError(f"{where}: p must be a number in [0, 1], got {given!r}")
            if label == "hard" or votes is None:
                p = float(given)
            else:
                p = votes[0] / sum(votes) if sum(votes) else 0.5
                eq1 = 1.0 if votes[0] > votes[1] else 0.5 if votes[0] == votes[1] else 0.0
                if given not in (eq1, p):  # e.g. labels shuffled across pairs: soft would train on the votes
                    raise ValueError(f"{where}: p {given!r} is neither Eq. 1 of its votes {votes[0]}:{votes[1]} "
                                     f"({eq1}) nor their share ({p:.4g}); --label soft takes p* from the votes")
            if votes is not None and sum(votes) < min_valid_votes:
                skipped["votes"] += 1
                continue
            margin = abs(votes[0] - votes[1]) / sum(votes) if votes is not None and sum(votes) else 0.0
            if votes is not None and margin < min_margin:
                skipped["margin"] += 1
                continue
            a, b = (os.path.normpath(os.path.join(root, row[s])) for s in "ab")
            if a == b:
                raise ValueError(f"{where}: 'a' and 'b' are the same image {a}")
            for s, f in (("a", a), ("b", b)):
                if f in readable:
                    continue
                if not os.path.isfile(f):
                    raise ValueError(f"{where}: image '{s}' not found: {f}")
                try:  # its header, 0.07 ms: a corrupt file fails here, before any model, not when its pair is drawn
                    common.check_image(f)
                except ValueError as e:
                    raise ValueError(f"{where}: image '{s}': {e}") from None
                readable.add(f)
            key, p_key = (a, b), p  # p*(first, second) of the pair in a fixed order, to compare either order
            if b < a:
                key, p_key = (b, a), 1.0 - p
            if key in seen:
                first, first_p = seen[key]
                if first_p != p_key:
                    raise ValueError(f"{where}: pair ({row['a']!r}, {row['b']!r}) has p* {p} but {first} labels the "
                                     f"same two images p* {first_p if key == (a, b) else 1.0 - first_p} in this order: "
                                     f"contradictory labels")
                skipped["merged"] += 1
                continue
            seen[key] = (where, p_key)
            # vote.py groups pairs by their shared reference (and type); a pair without one is its own group
            key = pair_group(row, group_by)
            group = (path, *key) if key is not None else (path, n)
            pairs.append(dict(a=a, b=b, names=(row["a"], row["b"]), p=p, group=group))
    common.print0(f"labels: {len(pairs)} pairs ({label} p*); skipped {skipped['votes']} with fewer than "
                  f"{min_valid_votes} valid votes and {skipped['margin']} with a vote margin below {min_margin}; "
                  f"merged {skipped['merged']} repeated pairs")
    if not pairs:
        left = " left after skipping" if skipped["votes"] or skipped["margin"] else ""
        raise ValueError(f"{' '.join(paths)}: no labelled pairs{left}")
    return pairs


def load_estimates(paths, image_root=None, group_by=("ref",), min_valid_votes=1):
    """
    --reward regression's labels, vote.py --task score's lines: [{a, names, estimate, group}] per image (a the
    resolved path, names the path as written, estimate the pseudo-estimate, group the image's (file, values of
    group_by) for --batch-groups). Images with fewer than min_valid_votes valid scores (estimate null: none) are
    skipped and counted; an image listed twice is merged if its estimates agree and refused with both lines if not.
    """
    items, seen = [], {}
    skipped = dict(votes=0, merged=0)
    for path in paths:
        root = image_root or os.path.dirname(os.path.abspath(path))
        for n, row in common.read_jsonl_lines(path):
            where = f"{path}:{n}"
            if not isinstance(row.get("image"), str):
                raise ValueError(f"{where}: needs an image path 'image' (vote.py --task score's lines), got {row}")
            estimate, k, invalid = row.get("estimate"), row.get("k"), row.get("invalid")
            if not (estimate is None or (type(estimate) in (int, float) and 1 <= estimate <= 5)):
                raise ValueError(f"{where}: estimate must be a score in [1, 5] or null, got {estimate!r}")
            if not (type(k) is int and type(invalid) is int and 0 <= invalid <= k):
                raise ValueError(f"{where}: needs integers k and invalid <= k, got {k!r}, {invalid!r}")
            if estimate is None or k - invalid < min_valid_votes:
                skipped["votes"] += 1
                continue
            a = os.path.normpath(os.path.join(root, row["image"]))
            if not os.path.isfile(a):
                raise ValueError(f"{where}: image not found: {a}")
            try:  # its header, as load_labels does: a corrupt file fails before any model
                common.check_image(a)
            except ValueError as e:
                raise ValueError(f"{where}: image: {e}") from None
            if a in seen:
                if seen[a][1] != estimate:
                    raise ValueError(f"{where}: image {row['image']!r} has estimate {estimate} but {seen[a][0]} gives "
                                     f"it {seen[a][1]}: contradictory labels")
                skipped["merged"] += 1
                continue
            seen[a] = (where, estimate)
            values = tuple(row.get(f) for f in group_by)
            group = (path, *values) if values[0] is not None else (path, n)
            items.append(dict(a=a, names=(row["image"],), estimate=float(estimate), group=group))
    common.print0(f"labels: {len(items)} images with a pseudo-estimate; skipped {skipped['votes']} with fewer than "
                  f"{min_valid_votes} valid scores; merged {skipped['merged']} repeated images")
    if not items:
        raise ValueError(f"{' '.join(paths)}: no image with a pseudo-estimate")
    return items


def make_units(pairs, by_groups):
    """What a step draws: single pairs, or whole groups of pairs (--batch-groups)."""
    if not by_groups:
        return [[p] for p in pairs]
    groups = {}
    for p in pairs:
        groups.setdefault(p["group"], []).append(p)
    return list(groups.values())


def step_pairs(units, per_rank, world, rank, seed, step):
    """This rank's pairs at `step`: a seeded permutation per epoch, the same on every rank and world size."""
    per_step = per_rank * world
    steps_per_epoch = len(units) // per_step
    epoch, i = divmod(step, steps_per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(len(units))
    chosen = [units[j] for j in order[i * per_step:(i + 1) * per_step]]
    return [p for unit in common.shard(chosen, rank, world) for p in unit]


def partners_of(pairs):
    """{image: [(partner, p*(image, partner))]} over the pairs of this rank's batch (Algorithm 1 lines 8-11)."""
    partners = {}
    for pr in pairs:
        partners.setdefault(pr["a"], []).append((pr["b"], pr["p"]))
        partners.setdefault(pr["b"], []).append((pr["a"], 1.0 - pr["p"]))  # swap the pair's order
    return partners


# -----------------------------------------------------------------------------
# reward (Eq. 2-3) and advantage (Eq. 4)


def fidelity_rewards(scores, partners, gamma):
    """
    {image: K rewards} from {image: K parsed scores (None = invalid)}. mu and sigma^2 of Eq. 2 are over an
    image's VALID scores, population variance (ddof=0). Edge cases, none of which can give NaN:
      - an invalid rollout gets reward 0 and is left out of its image's mean and variance;
      - a partner with no valid score is skipped: Eq. 3's mean runs over the partners that have one;
      - a partner (or the image itself) with exactly one valid score has variance 0, so only gamma and the
        other image's variance stay under the square root;
      - an image with no valid score, or whose partners are all skipped, gets reward 0 on every rollout.
    """
    valid = {x: np.array([s for s in q if s is not None], dtype=np.float64) for x, q in scores.items()}
    rewards = {}
    for x, q in scores.items():
        r = np.zeros(len(q))
        usable = [(y, p) for y, p in partners[x] if len(valid[y])]
        ok = np.array([s is not None for s in q])
        if usable and ok.any():
            qi = valid[x]
            fid = []
            for y, p in usable:
                # Eq. 2: Thurstone probability that rollout k of x beats y
                pk = torch.special.ndtr(torch.from_numpy((qi - valid[y].mean()) / math.sqrt(qi.var() + valid[y].var() + gamma))).numpy()
                fid.append(np.sqrt(p * pk) + np.sqrt((1 - p) * (1 - pk)))  # Eq. 3's fidelity to p*
            r[ok] = np.mean(fid, axis=0)  # Eq. 3: mean over the usable partners
        rewards[x] = r
    return rewards


def rollout_rewards(texts, partners, gamma):
    """Parse each rollout's score and turn them into Eq. 3's rewards: ({image: K rewards}, {image: K scores})."""
    scores = {x: [common.parse_score(t) for t in ts] for x, ts in texts.items()}
    return fidelity_rewards(scores, partners, gamma), scores


def regression_rewards(scores, targets, threshold):
    """
    --reward regression, EvoEstimate's online stage (Sec. 4.3: "the rewards as Q-Insight"): {image: K rewards} from
    {image: K parsed scores (None = invalid)} and {image: its pseudo-estimate}. Q-Insight's score reward: 1 if a
    rollout's score is strictly within the threshold (default 0.35) of the label, else 0; 0 for an answer that does
    not parse. Source: bytedance/Q-Insight, src/open-r1-multimodal/src/open_r1/qinsight_multi_task.py,
    score_reward(), lines 345-346 (the 0.35 default of score_reward_threshold: line 104), read in its fork
    TobyYang7/Q-Insight at commit 0dcad791 (the public-code index we searched holds no copy of the bytedance
    repository's training code; the fork jxma20/Q-insight-underwater has the same rule plus a bonus of its own).
    Q-Insight also adds a format reward (format_reward() in the same file: 1 for its <think> ... <answer>{"rating":
    ...}</answer> layout). It is left out: Eq. 3 has none, so only the reward on the score differs between the two.
    """
    return {x: np.array([float(s is not None and abs(s - targets[x]) < threshold) for s in q])
            for x, q in scores.items()}


def advantages(r, norm="std"):
    """
    Eq. 4 over one image's K rewards, population std (ddof=0). Invalid rollouts (reward 0) are part of the
    group: that is what teaches the policy to answer validly. Zero spread -> zero advantage, never NaN.
    norm 'none' (--adv-norm none, Dr. GRPO's advantage; a departure from the paper): r - mean(r), unscaled, so
    rewards that differ by 1e-6 within a group give advantages of ~1e-6 instead of Eq. 4's +-1.73.
    """
    r = np.asarray(r, dtype=np.float64)
    if norm == "none":
        return r - r.mean()
    std = r.std()
    return np.zeros_like(r) if std < 1e-8 else (r - r.mean()) / std


# -----------------------------------------------------------------------------
# the loss (Eq. 5-6); the log-probs it takes are policy.py's


def grpo_loss(logp, logp_old, logp_ref, adv, mask, clip_eps, beta):
    """
    Eq. 5 with Eq. 6 per token, averaged over each completion's tokens (the DeepSeekMath form). Returns the
    SUM over completions (the caller divides by the global count) and per-completion KL and clip fraction.
    """
    ratio = torch.exp(logp - logp_old)
    a = adv[:, None]
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)  # Eq. 5's clipped term
    kl = torch.exp(logp_ref - logp) - (logp_ref - logp) - 1  # Eq. 6 (k3): >= 0, pulls logp toward logp_ref
    per_token = -(surrogate - beta * kl)
    n = mask.sum(1).clamp(min=1)
    per_seq = (per_token * mask).sum(1) / n
    clipped = ((ratio - 1).abs() > clip_eps).float()
    return per_seq.sum(), (kl * mask).sum(1).detach() / n, (clipped * mask).sum(1) / n


def stop_unless_finite(step, out, **values):
    """Stop at the first loss, KL or gradient norm that is not finite, before the optimizer step takes it into the
    weights: no checkpoint ever holds a NaN, and the error names the step."""
    bad = [f"{name} {value}" for name, value in values.items() if not math.isfinite(value)]
    if bad:
        raise FloatingPointError(f"step {step}: {', '.join(bad)} is not finite; stopped before the optimizer step, so "
                                 f"no checkpoint holds it (the newest step_<N> in {out} is the last good one). Try a "
                                 f"lower --lr or --grad-clip, and check this step's images and labels")


# -----------------------------------------------------------------------------


def resume_record(args, prompts):
    """
    What a --resume must match, written to each checkpoint's args.json: every argument but those whose help says they
    may change, with the prompts and the suffix (args.no_think) as resolved, not as flagged, so that a resume cannot
    mix two ways of asking (policy.save also writes them to the checkpoint's prompts.json).
    """
    return {k: v for k, v in vars(args).items() if k not in MAY_CHANGE_ON_RESUME | {"prompts", "think"}} | \
        dict(prompts=prompts)


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = common.dist_setup()
    # torch's global RNG starts from a random seed in every process; only --lora-dropout draws from it (the rollouts
    # have their own generators): seeded, a rerun draws the same masks (and --resume restores it)
    torch.manual_seed(common.stable_seed(args.seed, "global", rank))
    device = torch.device(args.device) if args.device and world == 1 else device
    prompts, think, source = common.resolve_prompts(args.model, args.prompts, args.think)
    args.no_think = not think  # resolved: what the rollouts, args.json and the checkpoints' prompts.json hold
    regression, group_by = args.reward == "regression", args.group_by.split(",")  # regression: a unit is an image
    labelled = (load_estimates(args.labels, args.image_root, group_by, args.min_valid_votes) if regression else
                load_labels(args.labels, args.image_root, group_by, args.label, args.min_margin, args.min_valid_votes))
    units = make_units(labelled, args.batch_groups > 0)
    per_rank = args.batch_groups or ((args.batch_images or 2 * args.batch_pairs) if regression else args.batch_pairs)
    unit = "groups" if args.batch_groups else "images" if regression else "pairs"
    steps_per_epoch = len(units) // (per_rank * world)
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(units)} {unit} cannot fill one step of {per_rank} per rank x {world} ranks")
    total = steps_per_epoch * args.epochs if not args.max_steps else min(args.max_steps, steps_per_epoch * args.epochs)

    record = resume_record(args, prompts)
    resume_dir = policy.latest_checkpoint(args.out) if args.resume else None
    saved = policy.check_resume(resume_dir, record, world) if resume_dir else None
    policy.init_single_process(device, args.lora)  # one CUDA process: FSDP2 on one rank, as torchrun's (not LoRA's)
    checkpointing = device.type == "cuda" if args.grad_checkpointing is None else args.grad_checkpointing
    common.print0(f"activation checkpointing {'on' if checkpointing else 'off'}"
                  + (f" (the default on {device.type})" if args.grad_checkpointing is None else ""))
    # the policy (fp32 master weights) and the frozen reference (the run's initial model), from one read of --model;
    # with --lora the frozen base with fp32 adapters, and no reference model (the base is the reference)
    lora = (dict(r=args.lora, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=args.lora_targets.split(","),
                 seed=args.seed) if args.lora else None)
    model, ref, tok, image_cfg, model_dtype = policy.load(args.model, device, checkpointing, lora)
    params = policy.trainable(model)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    start = 0
    if resume_dir:  # the policy's fp32 master weights, AdamW's state and the RNG, as they were after that step
        policy.restore(resume_dir, model, optimizer)
        start = saved["step"]
    save_dtype = args.save_dtype or model_dtype
    os.makedirs(args.out, exist_ok=True)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    if rank == 0:  # a resumed run rewrites the steps after its checkpoint
        common.write_jsonl_atomic(metrics_path, [m for m in common.read_partial_jsonl(metrics_path) if m["step"] <= start])

    per_unit = np.mean([len({x for p in u for x in (p["a"], p.get("b", p["a"]))}) for u in units])
    common.print0(f"{sum(map(len, units))} {'images' if regression else 'pairs'} in {len(units)} {unit}, {world} "
                  f"rank(s): {per_rank} {unit} x "
                  f"{per_unit:.3g} images x {args.k} rollouts = {per_rank * per_unit * args.k:.0f} completions per step "
                  f"per rank (fewer where pairs share images); {steps_per_epoch} steps per epoch, {total} steps"
                  + (f" from step {start} ({resume_dir})" if resume_dir else "")
                  + f"; {args.updates_per_batch} update(s) per batch, lr {args.lr} -> 0")
    # the rows of a micro-batch are consecutive completions, image by image: with --shared-prefix each of its
    # images' prompts runs once, not once per completion
    logprobs = policy.shared_prefix_logprobs if args.shared_prefix else policy.completion_logprobs
    common.print0(f"log-probs: micro-batches of {args.micro_batch} completions, " +
                  ("shared-prefix path (a prompt runs once per micro-batch holding its completions)" if args.shared_prefix
                   else "plain path (one prompt+completion forward per completion)"))
    common.print0(source)
    bar = tqdm(range(start, total), initial=start, total=total, disable=rank != 0, dynamic_ncols=True)
    for step in bar:
        t0 = time.time()
        pairs = step_pairs(units, per_rank, world, rank, args.seed, step)
        partners = None if regression else partners_of(pairs)
        targets = {pr["a"]: pr["estimate"] for pr in pairs} if regression else None
        keys = list(targets if regression else partners)
        names = {x: n for pr in pairs for x, n in zip((pr["a"], pr.get("b")), pr["names"])}  # an image has one name
        images = {x: common.preprocess_image(common.load_image(x), image_cfg) for x in keys}

        # --- sample: K rollouts of c_score per image, seeded per (step, image) so batching never changes them
        requests = [(common.encode_prompt(tok, prompts, "score", [images[x][1]], think), [x]) for x in keys]
        try:
            out = policy.generate(model, tok, requests, images, n=args.k, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                  seed=[common.stable_seed(args.seed, step, names[x]) for x in keys])
        except FloatingPointError as e:  # the last step's update left finite weights whose logits overflow
            raise FloatingPointError(f"step {step + 1}, rollouts: {e}; the newest step_<N> in {args.out} is the last "
                                     f"good one. Try a lower --lr or --grad-clip") from None
        texts = {x: out["texts"][i * args.k:(i + 1) * args.k] for i, x in enumerate(keys)}

        # --- score + reward (Eq. 2-3; --reward regression: Q-Insight's score reward against the pseudo-estimates)
        if regression:
            scores = {x: [common.parse_score(t) for t in ts] for x, ts in texts.items()}
            rewards = regression_rewards(scores, targets, args.score_threshold)
        else:
            rewards, scores = rollout_rewards(texts, partners, args.gamma)

        # --- advantage (Eq. 4), within each image's K rollouts
        adv = torch.tensor(np.concatenate([advantages(rewards[x], args.adv_norm) for x in keys]), dtype=torch.float32, device=device)
        # a sampled <|image_pad|> would read as an image slot in the forward: the completion ends there for
        # the loss (that token's own log-prob stays exact, as the last token is never an input)
        img_tok = model.config.image_token_id
        rows = [(requests[i][0], x, c[:c.index(img_tok) + 1] if img_tok in c else c)
                for i, x in enumerate(keys) for c in out["tokens"][i * args.k:(i + 1) * args.k]]

        # --- loss (Eq. 5-6): sum of per-completion means over 1/(completions of ALL ranks); every rank runs
        # the same number of forwards, since each one is a collective under FSDP
        counts = torch.tensor([len(rows), math.ceil(len(rows) / args.micro_batch)], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(counts[:1])
            dist.all_reduce(counts[1:], op=dist.ReduceOp.MAX)
        n_global, n_micro = int(counts[0]), int(counts[1])
        chunks = [c.tolist() for c in np.array_split(np.arange(len(rows)), n_micro)]
        # an empty chunk still does a forward (on row 0, weighted 0) to match the other ranks' collectives
        chunks = [(c, 1.0) if c else ([0], 0.0) for c in chunks]
        with torch.no_grad():
            with policy.reference(model, ref) as pi_ref:  # with --lora: the policy with its adapters off
                ref_lp = [logprobs(pi_ref, [rows[i] for i in c], images, args.temperature)[0] for c, _ in chunks]
            old_lp = ([logprobs(model, [rows[i] for i in c], images, args.temperature)[0] for c, _ in chunks]
                      if args.updates_per_batch > 1 else None)

        # --- step: FSDP averages gradients over ranks, hence the factor `world`
        for u in range(args.updates_per_batch):
            lr = args.lr * (1 - (step * args.updates_per_batch + u) / (total * args.updates_per_batch))
            for g in optimizer.param_groups:
                g["lr"] = lr
            kl_sum = clip_sum = 0.0
            for j, (c, w) in enumerate(chunks):
                logp, mask = logprobs(model, [rows[i] for i in c], images, args.temperature)
                # with one update per batch, pi_old is the current policy: logp_old = logp, detached
                lp_old = old_lp[j] if old_lp is not None else logp.detach()
                loss, kl, clip = grpo_loss(logp, lp_old, ref_lp[j], adv[c], mask, args.clip_eps, args.beta)
                kl_chunk = kl.sum().item()
                stop_unless_finite(step + 1, args.out, loss=loss.item(), kl=kl_chunk)
                (loss * w * world / n_global).backward()
                kl_sum, clip_sum = kl_sum + w * kl_chunk, clip_sum + w * clip.sum().item()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            stop_unless_finite(step + 1, args.out, grad_norm=float(grad_norm))  # the same on every rank
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        # --- log: sums over all ranks, one JSON line per step
        flat_r = np.concatenate([rewards[x] for x in keys])
        valid = np.array([s is not None for x in keys for s in scores[x]])
        lengths = np.array([len(t) for t in out["tokens"]])
        sums = torch.tensor([len(flat_r), flat_r.sum(), (flat_r ** 2).sum(), flat_r[valid].sum(), valid.sum(),
                             len(flat_r) - sum(out["stopped"]), lengths.sum(), kl_sum, clip_sum], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(sums)
        n, rs, rs2, fs, nv, trunc, ls, kls, cls = sums.tolist()
        m = dict(step=step + 1, reward_mean=rs / n, reward_std=math.sqrt(max(rs2 / n - (rs / n) ** 2, 0.0)),
                 fidelity_mean=fs / max(nv, 1), invalid_rate=1 - nv / n, truncation_rate=trunc / n, kl=kls / n,
                 clip_frac=cls / n, completion_len=ls / n, lr=lr,
                 grad_norm=float(grad_norm), seconds=time.time() - t0)
        if rank == 0:
            common.append_jsonl(metrics_path, [m])
            bar.set_postfix(reward=f"{m['reward_mean']:.3f}", invalid=f"{m['invalid_rate']:.2f}", kl=f"{m['kl']:.4f}",
                            len=f"{m['completion_len']:.0f}")

        # --- save
        if (args.save_every and (step + 1) % args.save_every == 0) or step + 1 == total:
            policy.save(args.out, step + 1, model, optimizer, tok, image_cfg, save_dtype, args.keep,
                        dict(step=step + 1, epoch=(step + 1) // steps_per_epoch, world=world), record)
    if rank == 0:
        link, last = policy.link_final(args.out)
        common.print0(f"done: {total} steps, model at {link} -> {os.path.basename(last)}")
    common.dist_exit()


if __name__ == "__main__":
    common.run_main(main)
