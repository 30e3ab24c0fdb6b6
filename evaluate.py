"""
Zero-shot evaluation (paper Tables 2-5): the model rates every image of one or more IQA datasets with the score
prompt c_score of Table 1 (plus the reasoning suffix), an image's score is the mean of its valid sampled ratings,
and the scores are correlated with the human mean opinion scores: PLCC and SRCC per dataset, and WAVG weighted
by the number of images.

    # the paper's base model on KonIQ-10k (official test split), SPAQ and CSIQ: the label files are the meta_info_*.csv
    # of the pyiqa toolbox (github.com/chaofengc/IQA-PyTorch), the images each dataset's own download
    python evaluate.py --model Qwen/Qwen2.5-VL-7B-Instruct \
        --data koniq=meta_info_KonIQ10kDataset.csv --root koniq=/data/koniq10k/512x384 --split test \
        --data spaq=meta_info_SPAQDataset.csv --root spaq=/data/spaq/TestImage \
        --data csiq=meta_info_CSIQDataset.csv --root csiq=/data/CSIQ/dst_imgs \
        --samples 8 --temperature 1.0 --out runs/eval/qwen7b
    # the same on 8 GPUs: each rank scores every 8th image, rank 0 merges the per-image files and reports
    torchrun --standalone --nproc_per_node=8 evaluate.py --model Qwen/Qwen2.5-VL-7B-Instruct ... --out runs/eval/qwen7b
    # a trained checkpoint, with the relative change (%) over the base model's report, as in Table 2
    python evaluate.py --model round1/final ... --baseline runs/eval/qwen7b/report.json --out runs/eval/round1
    # CPU, from a fresh clone: the toy base model of toy/prepare.py's small world on its held-out pool (it answers
    # with its own prompts.json: the toy prompts, no reasoning suffix); first, in seconds:
    #   python toy/prepare.py --out /tmp/toy --crops 1 --steps 40 --lr 5e-3
    python evaluate.py --model /tmp/toy/base --data /tmp/toy/heldout.jsonl --samples 4 --max-new-tokens 2 \
        --out /tmp/eval_toy
    # your own photos: a CSV with an image column and a mos column (e.g. img_name,mos), images beside it or in --root
    python evaluate.py --model tiny --data photos=labels.csv --root photos=images/ --limit 8 --samples 2 \
        --max-new-tokens 16 --out /tmp/eval_tiny

Datasets are NAME=PATH (or just PATH, named after the file). PATH is
  - a JSONL manifest, one {"image": path, "mos": number} per line (an optional "split" field is honoured);
  - a pyiqa-style CSV: an image column (dist_name / dis_img_path / img_name / Image name / image / filename; a
    full-reference file's distorted image is scored, its reference ignored), a score column (mos / mos_zscore /
    qmos / dmos / elo_score / score) and an optional split column (split / official_split: names such as "test",
    or pyiqa's codes 0/1/2 = train/val/test). Column names are matched case-insensitively.
Image paths are relative to --root (one DIR for every dataset, or NAME=DIR per dataset), else to the label
file's directory.

Score direction: a lower-is-better score (a DMOS) is flipped to mos = -score, so higher is always better. It is
decided per file, never by its name, and printed per dataset with the reason: --lower-better / --higher-better NAME
when given; else the content, where the image names carry the distortion level after the reference's name
(KADID-10k, CSIQ, TID2008/2013, LIVE-MD, distort.py's pools): scores that rise with the level are a DMOS,
whatever the column is called (KADID-10k's 'dmos' is a MOS); else LIVE IQA's layout (refimgs/, jp2k/, ...: its
names carry no level and its 'mos' holds DMOS); else the column name ('dmos' lower, the others higher), said so.

Outputs in --out: scores.jsonl (one row per image: dataset, line of the label file, image, path, mos, parsed
scores, score, std, and with --save-text the completions), report.json, run.json (the scoring settings, the prompt as
resolved included: a resumed run must match them). A killed run resumes where it stopped: finished images are
never rescored. The prompts are --prompts / --think / --no-think, else the --model checkpoint's own prompts.json
(train_grpo.py and toy/prepare.py write one), else the paper's Table 1; the run prints which.
"""

import argparse
import csv
import glob
import json
import math
import os
import re
import warnings

import numpy as np
import torch.distributed as dist
from scipy.optimize import OptimizeWarning, curve_fit
from scipy.stats import rankdata
from tqdm import tqdm

from common import (append_jsonl, check_image, check_numbers, check_out, check_sampling,
                    dist_exit, dist_setup, drop_torn_tail, encode_prompt, load_image, load_model,
                    parse_score, preprocess_image, print0, prompt_text, read_jsonl, read_jsonl_lines, read_partial_jsonl,
                    resolve_prompts, run_main, sample, shard, stable_seed, write_atomic, write_jsonl_atomic)

# -----------------------------------------------------------------------------
# datasets: label files -> rows {dataset, line, image, path, mos}; `line` (the label file's line) is the row's key,
# so the same image listed twice stays two rows and --split / --limit never shift the keys of a resumed run

IMAGE_COLUMNS = ["dist_name", "dis_img_path", "img_name", "image name", "image", "filename"]  # first found wins
SCORE_COLUMNS = ["mos", "mos_zscore", "qmos", "dmos", "elo_score", "score"]
SPLIT_COLUMNS = ["split", "official_split"]
REF_COLUMNS = ["ref_name", "ref_img_path", "hq_name"]  # a full-reference file's pristine image (direction evidence)
LOWER_IS_BETTER = {"dmos"}
# LIVE IQA's names carry no distortion level, but its layout is its own: references in refimgs/, distorted images in
# these five folders. pyiqa's "mos" column there holds LIVE's DMOS (pyiqa's own dataset_info agrees).
LIVE_FOLDERS = {"jp2k", "jpeg", "wn", "gblur", "fastfading"}
SPLIT_CODES = {"0": "train", "1": "val", "2": "test"}  # pyiqa's numeric split column (KonIQ-10k: 7058/1000/2015)
MIN_BASELINE = 0.05  # --baseline: a relative change against a smaller |figure| is noise blown up (+251757%)


def number(text, where, column):
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"{where}: {column} {text!r} is not a number")
    return value


def read_csv_labels(path):
    """[(line, image, score, split or None, reference or None)], the score column's name, the split column's."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip().lower() for h in next(reader, [])]
        image_col, score_col, split_col, ref_col = (next((n for n in names if n in header), None)
                                                    for names in (IMAGE_COLUMNS, SCORE_COLUMNS, SPLIT_COLUMNS, REF_COLUMNS))
        if image_col is None or score_col is None:
            raise ValueError(f"{path}: header {header} needs an image column (one of {IMAGE_COLUMNS}) and a score "
                             f"column (one of {SCORE_COLUMNS})")
        i, s, p, r = (header.index(c) if c else None for c in (image_col, score_col, split_col, ref_col))
        records = []
        for fields in reader:
            where = f"{path}:{reader.line_num}"
            if not any(x.strip() for x in fields):
                continue
            if len(fields) != len(header):  # more: a decimal comma ("3,1") or an unquoted comma shifts the columns
                raise ValueError(f"{where}: {len(fields)} fields, the header has {len(header)}")
            if not fields[i].strip():
                raise ValueError(f"{where}: empty {image_col}")
            records.append((reader.line_num, fields[i].strip(), number(fields[s], where, score_col),
                            fields[p].strip() if split_col else None, fields[r].strip() if ref_col else None))
    return records, score_col, split_col


def read_manifest(path):
    """The JSONL form: [(line, image, mos, split or None, ref or None)]."""
    records = []
    for line, row in read_jsonl_lines(path):
        if not isinstance(row.get("image"), str) or not row["image"]:
            raise ValueError(f"{path}:{line}: expected {{\"image\": path, \"mos\": number}}, "
                             f"got {json.dumps(row)[:80]}")
        if "mos" not in row:
            raise ValueError(f"{path}:{line}: no 'mos' field (the human score each image is correlated with)")
        mos = row.get("mos")
        if isinstance(mos, (bool, str)):  # JSON true is no score, and a quoted one is a malformed file
            raise ValueError(f"{path}:{line}: mos {mos!r} is not a number")
        records.append((line, row["image"], number(mos, f"{path}:{line}", "mos"),
                        None if row.get("split") is None else str(row["split"]),
                        row["ref"] if isinstance(row.get("ref"), str) else None))
    return records, "mos", "split" if any(r[3] is not None for r in records) else None


def level_trend(records):
    """
    Kendall's tau between distortion level and score, over the pairs of images that share a reference and a
    distortion type, with the level the last number of the image's name after its reference's name (KADID-10k
    I01_01_03.png, CSIQ 1600.AWGN.3.png, TID2013 i01_01_3.bmp, LIVE-MD babygirl_blur3.bmp, distort.py's
    ref__blur_gaussian_3.png): positive when the score rises with the distortion (a DMOS). -> (tau, pairs).
    """
    groups = {}
    stem = lambda p: os.path.splitext(os.path.basename(p))[0].lower()
    for _, image, score, _, ref in records:
        if not ref or not stem(image).startswith(stem(ref)):
            continue
        rest = stem(image)[len(stem(ref)):]
        numbers = list(re.finditer(r"\d+", rest))
        if numbers:
            last = numbers[-1]
            key = (ref.lower(), os.path.dirname(image).lower(), rest[:last.start()] + "#" + rest[last.end():])
            groups.setdefault(key, []).append((int(last.group()), score))
    agree = disagree = 0
    for g in groups.values():
        level, score = np.array(g, dtype=float).T
        sign = np.sign(level[:, None] - level[None, :]) * np.sign(score[:, None] - score[None, :])
        agree, disagree = agree + int((sign > 0).sum()) // 2, disagree + int((sign < 0).sum()) // 2
    return (agree - disagree) / max(agree + disagree, 1), agree + disagree


def score_direction(records, column, override=None):
    """
    (lower is better, why). In order: --lower-better / --higher-better NAME; the file's content, where the names
    carry distortion levels (scores that rise with the level are a DMOS, whatever the column is called: KADID-10k's
    'dmos' is a MOS); LIVE IQA's layout; the column's name, said to be only that.
    """
    if override is not None:
        return override, "--lower-better" if override else "--higher-better"
    tau, pairs = level_trend(records)
    if pairs >= 20 and abs(tau) >= 0.5:
        return tau > 0, (f"content: the scores {'rise' if tau > 0 else 'fall'} with the distortion level in the "
                         f"image names, Kendall tau {tau:+.2f} over {pairs} same-reference pairs")
    if all((r[4] or "").startswith("refimgs/") and r[1].split("/")[0] in LIVE_FOLDERS for r in records):
        return True, ("LIVE IQA's layout (refimgs/, jp2k/, ...): its score column holds DMOS; the names carry no "
                      "level to check it against; --higher-better NAME overrides")
    evidence = (f"the numbers in the image names do not track the scores, Kendall tau {tau:+.2f} over {pairs} pairs"
                if pairs >= 20 else "no distortion levels in the image names to check it against")
    return column in LOWER_IS_BETTER, (f"the column name '{column}' alone ({evidence}); --lower-better / "
                                       f"--higher-better NAME overrides")


def load_dataset(name, path, root=None, split=None, limit=None, skip_missing=False, lower=None):
    """
    A dataset dict: name, file, rows, and what the report says about it (score column, direction and why, split,
    missing and unreadable files skipped). `lower`: the --lower-better (True) / --higher-better (False) override.
    """
    records, column, split_col = read_manifest(path) if path.endswith(".jsonl") else read_csv_labels(path)
    flipped, direction = score_direction(records, column, lower)  # from the whole file, before --split / --limit
    if split and split_col:
        seen = sorted({str(r[3]) for r in records})
        records = [r for r in records if split.lower() in ((r[3] or "").lower(), SPLIT_CODES.get(r[3]))]
        if not records:
            raise ValueError(f"{path}: no rows of split '{split}'; column '{split_col}' holds {seen[:10]}")
    records = records[:limit] if limit else records
    if not records:
        raise ValueError(f"{path}: no rows")
    root = root or os.path.dirname(path)
    rows = [dict(dataset=name, line=line, image=image, path=os.path.join(root, image), mos=-score if flipped else score)
            for line, image, score, _, _ in records]
    missing = [r["path"] for r in rows if not os.path.exists(r["path"])]
    if missing and not skip_missing:
        raise ValueError(f"{name}: {len(missing)} of {len(rows)} image files are missing, e.g. {missing[:5]}; check "
                         f"--root or pass --skip-missing to drop them")
    unreadable = {}
    for image in dict.fromkeys(r["path"] for r in rows).keys() - set(missing):  # headers only, 0.07 ms a file
        try:
            check_image(image)
        except ValueError as e:
            unreadable[image] = str(e)
    if unreadable and not skip_missing:
        raise ValueError(f"{name}: {len(unreadable)} of {len(rows)} image files cannot be read, e.g. "
                         f"{'; '.join(sorted(unreadable.values())[:3])}; pass --skip-missing to drop them")
    skipped = [dict(path=p, reason="missing") for p in missing] + [dict(path=p, reason=unreadable[p])
                                                                   for p in sorted(unreadable)]
    gone = set(missing) | unreadable.keys()
    rows = [r for r in rows if r["path"] not in gone]
    if not rows:
        raise ValueError(f"{name}: no image file can be read")
    if split and not split_col:
        split = f"{split} requested, but the file has no split column: all rows kept"
    return dict(name=name, file=path, rows=rows, score_column=column, flipped=flipped, direction=direction,
                missing=len(missing), skipped=skipped, split=split)


def split_name(spec):
    """'NAME=VALUE' -> (NAME, VALUE); a bare 'VALUE' -> (None, VALUE)."""
    return tuple(spec.split("=", 1)) if "=" in spec else (None, spec)


# -----------------------------------------------------------------------------
# scoring: N completions of c_score per image from one shared prefill, the image's score = mean of the valid ones

def aggregate(texts):
    """Parsed scores (None where invalid), their mean and std. No valid score: score None (counted, never guessed)."""
    scores = [parse_score(t) for t in texts]
    valid = [s for s in scores if s is not None]
    return dict(scores=scores, score=float(np.mean(valid)) if valid else None,
                std=float(np.std(valid)) if len(valid) > 1 else None)


def score_batch(model, tokenizer, image_cfg, prompts, rows, args):
    images, unreadable = {}, {}
    for i, row in enumerate(rows):  # a file cut short after its header passed load_dataset's check fails here
        try:
            images[i] = preprocess_image(load_image(row["path"]), image_cfg)
        except ValueError as e:
            if not args.skip_missing:
                raise ValueError(f"{e} ({row['dataset']}, line {row['line']}); pass --skip-missing to skip "
                                 f"unreadable images") from None
            unreadable[i] = str(e)
    requests = [(encode_prompt(tokenizer, prompts, "score", [images[i][1]], think=not args.no_think), [i])
                for i in images]
    # one seed per image, from its name: its samples do not depend on the batch, the rank or a resume
    out = sample(model, tokenizer, requests, images, n=args.samples, max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                 seed=[stable_seed(args.seed, rows[i]["image"]) for i in images]) if images else dict(texts=[])
    results, texts = [], iter(out["texts"])  # rows come request by request
    for i, row in enumerate(rows):
        if i in unreadable:  # counted and listed in the report, never scored
            results.append(row | dict(scores=[], score=None, std=None, unreadable=unreadable[i]))
            continue
        mine = [next(texts) for _ in range(args.samples)]
        results.append(row | aggregate(mine) | (dict(texts=mine) if args.save_text else {}))
    return results


# -----------------------------------------------------------------------------
# metrics: PLCC (after the DeQA-Score 4-parameter logistic, or raw) and SRCC

def pearson(x, y):
    x, y = np.asarray(x, float), np.asarray(y, float)
    x, y = x - x.mean(), y - y.mean()
    return float(x @ y / math.sqrt((x @ x) * (y @ y)))


def spearman(x, y):
    return pearson(rankdata(x), rankdata(y))  # Pearson of ranks; ties share their average rank


def logistic4(x, b1, b2, b3, b4):
    return (b1 - b2) / (1 + np.exp(-(x - b3) / np.abs(b4))) + b2


def fit_logistic(x, y):
    """The DeQA-Score protocol's fit of mos ~ logistic4(score), from its starting point."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    with warnings.catch_warnings(), np.errstate(over="ignore"):
        warnings.simplefilter("ignore", OptimizeWarning)
        params, _ = curve_fit(logistic4, x, y, p0=[y.max(), y.min(), x.mean(), x.std() / 4], maxfev=100000)
    return params


def correlate(x, y, plcc="logistic"):
    """dict(plcc, srcc, plcc_method). A failed fit falls back to raw Pearson and says so: hours of scoring survive."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return dict(plcc=None, srcc=None, plcc_method="undefined: fewer than 3 scored images, or constant scores")
    if plcc == "raw":
        return dict(plcc=pearson(x, y), srcc=spearman(x, y), plcc_method="raw")
    try:
        fitted = logistic4(x, *fit_logistic(x, y))
        if not np.isfinite(fitted).all() or np.ptp(fitted) == 0:
            raise RuntimeError("the fitted curve is flat or not finite")
        return dict(plcc=pearson(fitted, y), srcc=spearman(x, y), plcc_method="logistic")
    except (RuntimeError, ValueError, TypeError, np.linalg.LinAlgError) as e:  # TypeError: fewer than 4 points
        return dict(plcc=pearson(x, y), srcc=spearman(x, y), plcc_method=f"raw (logistic fit failed: {e})")


# -----------------------------------------------------------------------------
# results files: each rank appends to its own part file; rank 0 merges them into scores.jsonl

def read_results(out):
    """{(dataset, line): row} from scores.jsonl and any part files a killed or finished run left behind."""
    final = os.path.join(out, "scores.jsonl")
    rows = read_jsonl(final) if os.path.exists(final) else []
    for part in sorted(glob.glob(os.path.join(out, "scores.rank*.jsonl"))):
        rows += read_partial_jsonl(part)
    return {(r["dataset"], r["line"]): r for r in rows}


def merge_results(out, names):
    """scores.jsonl in dataset order, then line order, written atomically; the part files go."""
    results = read_results(out)
    order = {n: i for i, n in enumerate(names)}
    rows = sorted(results.values(), key=lambda r: (order.get(r["dataset"], len(order)), r["dataset"], r["line"]))
    write_jsonl_atomic(os.path.join(out, "scores.jsonl"), rows)
    for part in glob.glob(os.path.join(out, "scores.rank*.jsonl")):
        os.remove(part)
    return results


# -----------------------------------------------------------------------------
# report: the paper's table (dataset | n | PLCC | SRCC), plus invalid count and spread

def build_report(datasets, results, settings, plcc, baseline=None):
    per = {}
    for ds in datasets:
        rows = [results[(ds["name"], r["line"])] | dict(mos=r["mos"]) for r in ds["rows"]]
        valid = [r for r in rows if r["score"] is not None]
        stds = [r["std"] for r in rows if r["std"] is not None]
        failed = [dict(path=r["path"], reason=r["unreadable"]) for r in rows if r.get("unreadable")]  # at decode
        skipped = ds["skipped"] + failed
        per[ds["name"]] = dict(
            file=ds["file"], n=len(valid), invalid=len(rows) - len(valid) - len(failed), missing=ds["missing"],
            unreadable=len(skipped) - ds["missing"], skipped=skipped,
            **correlate([r["score"] for r in valid], [r["mos"] for r in valid], plcc),
            spread=float(np.mean(stds)) if stds else None,  # mean per-image std of the valid sampled scores
            mean_score=float(np.mean([r["score"] for r in valid])) if valid else None,
            score_column=ds["score_column"], flipped=ds["flipped"], direction=ds["direction"], split=ds["split"])
    scored = [d for d in per.values() if d["plcc"] is not None]
    total = sum(d["n"] for d in scored)
    wavg = dict(n=total, invalid=sum(d["invalid"] for d in per.values()),  # weights: images in each correlation
                **{m: sum(d["n"] * d[m] for d in scored) / total if total else None for m in ("plcc", "srcc")})
    report = dict(settings=settings, plcc=plcc, datasets=per, wavg=wavg)
    if baseline:  # None (the table's "n/a"): no figure, or a baseline too near 0 for a relative change to mean much
        base = dict(baseline["datasets"], WAVG=baseline["wavg"])
        report["baseline"] = {name: {m: 100 * (d[m] - base[name][m]) / abs(base[name][m])
                                     if d[m] is not None and abs(base[name].get(m) or 0) >= MIN_BASELINE else None
                                     for m in ("plcc", "srcc")}
                              for name, d in dict(per, WAVG=wavg).items() if name in base}
    return report


def direction_line(d):
    col = d["score_column"]
    return (f"'{col}' is {'lower' if d['flipped'] else 'higher'}-is-better ({d['direction']})"
            + (f": flipped to mos = -{col}" if d["flipped"] else ""))


def format_table(report):
    delta = report.get("baseline", {})

    def fig(name, d, m):  # "0.840 (+10.4%)" as in Table 2
        text = "-" if d[m] is None else f"{d[m]:.3f}"
        if name in delta:
            text += " (n/a)" if delta[name][m] is None else f" ({delta[name][m]:+.1f}%)"
        return text

    lines = [f"{'dataset':<12} {'n':>6}  {'PLCC':<16} {'SRCC':<16} {'invalid':>7}  spread"]
    for name, d in report["datasets"].items():
        spread = "-" if d["spread"] is None else f"{d['spread']:.3f}"
        lines.append(f"{name:<12} {d['n']:>6}  {fig(name, d, 'plcc'):<16} {fig(name, d, 'srcc'):<16} "
                     f"{d['invalid']:>7}  {spread}")
    w = report["wavg"]
    lines.append(f"{'WAVG':<12} {w['n']:>6}  {fig('WAVG', w, 'plcc'):<16} {fig('WAVG', w, 'srcc'):<16} "
                 f"{w['invalid']:>7}")
    method = "after the 4-parameter logistic mapping (DeQA-Score)" if report["plcc"] == "logistic" else "raw Pearson"
    lines.append(f"PLCC {method}. n: images with a valid score; invalid: images with none (left out); spread: mean "
                 f"per-image std of the sampled scores" + (f"; (%): change relative to the baseline (n/a: no figure, "
                                                           f"or |baseline| < {MIN_BASELINE})" if delta else ""))
    for name, d in report["datasets"].items():
        lines.append(f"  {name}: {direction_line(d)}")
        if d["plcc_method"] not in ("logistic", "raw"):
            lines.append(f"  {name}: PLCC {d['plcc_method']}")
        if d["skipped"]:
            lines.append(f"  {name}: skipped {d['missing']} missing and {d['unreadable']} unreadable image files: "
                         + ", ".join(s["path"] for s in d["skipped"][:5]) + (", ... (report.json lists them all)"
                                                                             if len(d["skipped"]) > 5 else ""))
        if d["split"]:
            lines.append(f"  {name}: split {d['split']}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny",
                   help="'tiny', a checkpoint directory or a hub id (paper: Qwen/Qwen2.5-VL-7B-Instruct)")
    # data
    p.add_argument("datasets", nargs="*", metavar="NAME=PATH", help="datasets (JSONL manifest or pyiqa-style CSV)")
    p.add_argument("--data", action="append", default=[], metavar="NAME=PATH", help="a dataset; repeatable")
    p.add_argument("--root", action="append", default=[], metavar="[NAME=]DIR",
                   help="image directory: DIR for every dataset, or NAME=DIR for one; repeatable "
                        "(default: the label file's directory)")
    p.add_argument("--split", default=None, help="keep only this split where the file has a split column (e.g. test)")
    p.add_argument("--skip-missing", action="store_true",
                   help="drop rows whose image file is missing or cannot be read (counted and listed in the report)")
    p.add_argument("--limit", type=int, default=None, help="first N rows per dataset (after --split), for quick checks")
    p.add_argument("--lower-better", action="append", default=[], metavar="NAME",
                   help="dataset NAME's scores are lower-is-better (a DMOS): flip them; repeatable. Default: decided "
                        "from the file (see 'Score direction' above), printed per dataset")
    p.add_argument("--higher-better", action="append", default=[], metavar="NAME",
                   help="dataset NAME's scores are higher-is-better whatever the file suggests; repeatable")
    # sampling
    p.add_argument("--samples", type=int, default=8, help="completions per image; its score is their valid mean. "
                   "--samples 1 --temperature 0 is greedy")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k cut")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="a completion cut off before its answer is invalid")
    p.add_argument("--think", action=argparse.BooleanOptionalAction, default=None,
                   help="the reasoning suffix of Table 1 (default: as the --model checkpoint was trained, else on)")
    p.add_argument("--prompts", default=None, help="JSON file overriding prompts of Table 1 (keys 'score', 'suffix'; "
                   "default: the --model checkpoint's prompts.json, else Table 1)")
    p.add_argument("--batch-images", type=int, default=8, help="images per sampler call (x --samples sequences)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: this rank's GPU, else cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    # output
    p.add_argument("--out", default="runs/eval", help="directory for scores.jsonl, report.json, run.json")
    p.add_argument("--plcc", choices=["logistic", "raw"], default="logistic",
                   help="PLCC after the DeQA-Score 4-parameter logistic mapping (paper), or plain Pearson")
    p.add_argument("--baseline", default=None,
                   help="another run's report.json: adds the relative change (%%) of each figure, as in Table 2")
    p.add_argument("--save-text", action="store_true", help="keep the completions in scores.jsonl")
    args = p.parse_args(argv)
    args.no_think = args.think is False  # what the functions read; main() resolves it against the checkpoint
    if args.samples < 1 or args.batch_images < 1:
        p.error("--samples and --batch-images must be at least 1")
    if not args.datasets + args.data:
        p.error("give at least one dataset, NAME=PATH")
    check_sampling(p, args)
    check_numbers(p, args, positive=("limit",))
    both = set(args.lower_better) & set(args.higher_better)
    if both:
        p.error(f"--lower-better and --higher-better both name {sorted(both)}")
    inputs = [split_name(spec)[1] for spec in args.datasets + args.data + args.root]
    check_out(p, args.out, inputs=inputs + [args.baseline, args.prompts, args.model], directory=True)
    return args


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = dist_setup()
    specs = [split_name(spec) for spec in args.datasets + args.data]
    specs = [(name or os.path.splitext(os.path.basename(path))[0], path) for name, path in specs]
    names = [n for n, _ in specs]
    roots = dict(split_name(spec) for spec in args.root)  # None: the root of every dataset not named
    if len(set(names)) != len(names) or len(roots) != len(args.root) or set(roots) - set(names) - {None}:
        raise ValueError(f"dataset names must differ and each --root name once, matching a dataset: datasets "
                         f"{names}, --root {args.root}")
    unknown = set(args.lower_better + args.higher_better) - set(names)
    if unknown:
        raise ValueError(f"--lower-better / --higher-better name {sorted(unknown)}, not datasets: {names}")
    lower = {n: True for n in args.lower_better} | {n: False for n in args.higher_better}
    datasets = [load_dataset(n, path, roots.get(n, roots.get(None)), args.split, args.limit, args.skip_missing,
                             lower.get(n)) for n, path in specs]
    for ds in datasets:  # before hours of scoring, not only in the report
        print0(f"{ds['name']}: {len(ds['rows'])} images, {direction_line(ds)}")
    prompts, think, source = resolve_prompts(args.model, args.prompts, args.think)
    args.no_think = not think  # what score_batch reads; run.json records the prompt as resolved
    print0(source)
    baseline = None
    if args.baseline:
        with open(args.baseline) as f:
            baseline = json.load(f)

    # settings that decide the scores: a resumed run must use the same ones, or its rows would mix two runs
    os.makedirs(args.out, exist_ok=True)
    settings = dict(model=args.model, prompt=prompt_text(prompts, "score", not args.no_think), samples=args.samples,
                    temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                    max_new_tokens=args.max_new_tokens, seed=args.seed)
    run_file = os.path.join(args.out, "run.json")
    if os.path.exists(run_file):
        with open(run_file) as f:
            old = json.load(f)
        changed = sorted(k for k in settings if old.get(k) != settings[k])
        if changed:
            raise ValueError(f"{args.out} holds a run with other settings ({', '.join(changed)}); use a fresh --out")
    elif rank == 0:
        write_atomic(run_file, json.dumps(settings, indent=2) + "\n")

    # --- resume: skip every (dataset, line) already scored
    results = read_results(args.out)
    for ds in datasets:
        for r in ds["rows"]:
            old = results.get((ds["name"], r["line"]))
            if old is not None and old["image"] != r["image"]:
                raise ValueError(f"{args.out}: {ds['name']} line {r['line']} was {old['image']}, now {r['image']}: "
                                 f"the label file changed; use a fresh --out")
    todo = [r for ds in datasets for r in ds["rows"] if (r["dataset"], r["line"]) not in results]
    if world > 1:
        dist.barrier()  # every rank has read the same finished set before any rank appends to it
    part = os.path.join(args.out, f"scores.rank{rank}.jsonl")
    drop_torn_tail(part)
    mine = shard(todo, rank, world)
    total = sum(len(ds["rows"]) for ds in datasets)
    print0(f"{total} images in {len(datasets)} datasets, {total - len(todo)} already scored in {args.out}; "
           f"{len(todo)} x {args.samples} samples = {len(todo) * args.samples} completions on {world} rank(s), "
           f"{args.batch_images} images x {args.samples} = {args.batch_images * args.samples} sequences per batch")

    # --- score this rank's share, appending each finished batch
    if mine:
        model, tokenizer, image_cfg = load_model(args.model, args.device or device, args.dtype)
        bar = tqdm(total=len(mine), disable=rank != 0, desc="scoring", unit="img")
        for i in range(0, len(mine), args.batch_images):
            batch = mine[i:i + args.batch_images]
            append_jsonl(part, score_batch(model, tokenizer, image_cfg, prompts, batch, args))
            bar.update(len(batch))
        bar.close()

    # --- rank 0: merge, correlate, report
    if world > 1:
        dist.barrier()
    if rank == 0:
        results = merge_results(args.out, names)
        report = build_report(datasets, results, settings, args.plcc, baseline)
        write_atomic(os.path.join(args.out, "report.json"), json.dumps(report, indent=2) + "\n")
        print(format_table(report))
        print(json.dumps({name: {m: d[m] for m in ("n", "plcc", "srcc")}
                          for name, d in dict(report["datasets"], WAVG=report["wavg"]).items()}), flush=True)
    dist_exit()


if __name__ == "__main__":
    run_main(main)
