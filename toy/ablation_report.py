"""
toy/ablation.sh's table, in the form of the paper's Table 5 / Fig. 3, from the files the stages wrote:

    python toy/ablation_report.py --out runs/ablation --world runs/demo

Per row (round 0 = the base; EvoQuality round 1 with K votes per pair; EvoEstimate round 1):
- pseudo-labels, on the training pool: how often the majority of K votes names the better image (the lower level of
  one (crop, type) group) and how often it is a tie; for EvoEstimate the SRCC of the pseudo-estimates against -level
  within each (crop, type) group, averaged over groups;
- held-out: SRCC / PLCC of the mean sampled score against mos = 5 - level (evaluate.py's report.json) and the SRCC
  within (crop, type) groups; the expected score's SRCC (sum of d * p(d) over the one-token answers 1-5, no
  sampling noise; the only figure here that loads the models).
Prints the table, then one JSON line; writes <out>/report.md and <out>/report.json.
"""
import argparse
import datetime
import json
import os
import platform
import sys

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import prepare  # noqa: E402  (toy/prepare.py: the pools and the expected score)
import report  # noqa: E402  (toy/report.py: vote accuracy, held-out figures, (crop, type) groups)


def rows_of(out):
    """[(key, row name, K, model directory under out, or None for the world's base)]: round 0, EvoQuality for each K
    voted (the k<K> folders, by K), EvoEstimate."""
    ks = sorted(int(d[1:]) for d in os.listdir(out) if d[:1] == "k" and d[1:].isdigit())
    estimate = os.path.join(out, "estimate", "estimates.jsonl")
    k_est = common.read_jsonl(estimate)[0]["k"] if os.path.exists(estimate) else None
    return ([("base", "round 0 (base)", None, None)] + [(f"k{k}", f"EvoQuality, K = {k}", k, f"k{k}/final") for k in ks]
            + [("estimate", f"EvoEstimate, K = {k_est}", k_est, "estimate/final")])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ablation", help="toy/ablation.sh's folder")
    p.add_argument("--world", default="runs/demo", help="the toy world it ran on (toy/prepare.py's folder)")
    p.add_argument("--prompts", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts.json"))
    p.add_argument("--wall", type=float, help="seconds the whole run took (toy/ablation.sh measures it)")
    return p.parse_args(argv)


def estimate_accuracy(path):
    """The pseudo-estimates against the levels: SRCC within each (crop, type) group averaged over groups, and over all."""
    rows = {r["image"]: r for r in common.read_jsonl(path) if r["estimate"] is not None}
    within = []
    for images in report.group_images(rows).values():
        est = [rows[i]["estimate"] for i in images]
        within.append(spearmanr(est, [-rows[i]["level"] for i in images])[0] if np.ptp(est) > 0 else 0.0)
    est, level = zip(*((r["estimate"], -r["level"]) for r in rows.values()))
    return dict(images=len(rows), within=float(np.nanmean(within)), srcc=float(spearmanr(est, level)[0]))


def main(argv=None):
    args = parse_args(argv)
    res = dict(date=datetime.date.today().isoformat(), out=args.out, world=args.world,
               machine=f"{platform.machine()}, {os.cpu_count()} cores", rows={})
    truth = {r["image"]: r for r in common.read_jsonl(os.path.join(args.world, "heldout.jsonl"))}
    prompts = common.load_prompts(args.prompts)
    for key, name, k, model in rows_of(args.out):
        folder = os.path.join(args.out, "eval", key)
        if not os.path.exists(os.path.join(folder, "report.json")):
            continue
        row = dict(name=name, k=k, heldout=report.eval_figures(folder, truth))
        votes = os.path.join(args.out, key, "votes.jsonl")
        estimates = os.path.join(args.out, key, "estimates.jsonl")
        if os.path.exists(votes):
            row["votes"] = report.vote_accuracy(votes)
        if os.path.exists(estimates):
            row["estimates"] = estimate_accuracy(estimates)
        m, tok, cfg = common.load_model(os.path.join(args.world, "base") if model is None else
                                        os.path.join(args.out, model), "cpu", "float32")
        pool, images = prepare.load_pool(args.world, "heldout", cfg)
        row["expected"] = prepare.score_figures(prepare.expected_scores(m, tok, prompts, pool, images), pool)
        res["rows"][key] = row
    res["seconds"] = {}
    if os.path.exists(os.path.join(args.out, "timings.tsv")):
        with open(os.path.join(args.out, "timings.tsv")) as f:
            res["seconds"] = {name: float(sec) for name, sec in (line.rsplit("\t", 1) for line in f if line.strip())}
    res["seconds_wall"] = args.wall

    fmt = report.fmt
    n = next((r["heldout"]["n"] + r["heldout"]["invalid"] for r in res["rows"].values()), "?")
    lines = [f"Ablations on the toy world, round 1 ({res['date']}, {res['machine']}): {args.out}", "",
             f"{'':<22} {'':>3}  {'training pool':^24}   {f'held-out ({n} images): mean sampled score':^44}   "
             f"{'expected score':^16}",
             f"{'row':<22} {'K':>3}  {'majority':>8} {'ties':>5} {'estimate':>9}   {'SRCC':>7} {'PLCC':>7} "
             f"{'in group':>9} {'spread':>7} {'invalid':>8}   {'SRCC':>7} {'in group':>8}"]
    for row in res["rows"].values():
        v, e, h, x = row.get("votes") or {}, row.get("estimates") or {}, row["heldout"], row["expected"]
        lines.append(f"{row['name']:<22} {row['k'] or '-':>3}  {fmt(v.get('majority')):>8} {fmt(v.get('ties')):>5} "
                     f"{fmt(e.get('within')):>9}   {fmt(h['srcc']):>7} {fmt(h['plcc']):>7} {fmt(h['within']):>9} "
                     f"{fmt(h['spread']):>7} {h['invalid']:>8}   {fmt(x['score_srcc']):>7} "
                     f"{fmt(x['score_srcc_within_mean']):>8}")
    lines += ["", "majority / ties: the training pairs whose majority of K votes names the better image (the lower "
              "level) / is a tie;", "estimate: SRCC of the pseudo-estimates against -level within (crop, type) groups, "
              "averaged; in group: the same for the held-out scores"]
    base = res["rows"].get("base", {}).get("heldout", {}).get("srcc")
    gains = {key: row["heldout"]["srcc"] - base for key, row in res["rows"].items() if key != "base" and base is not None}
    res["gain_srcc"] = gains
    if gains:
        lines += ["", "held-out SRCC gain over round 0: " + ", ".join(f"{res['rows'][k]['name']} {v:+.3f}"
                                                                       for k, v in gains.items())]
    if res["seconds"]:
        lines += ["", "seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in res["seconds"].items())
                  + f"; sum {sum(res['seconds'].values()):.0f}" + (f", wall {args.wall:.0f}" if args.wall else "")]
    table = "\n".join(lines)
    print(table)
    common.write_atomic(os.path.join(args.out, "report.md"), "```\n" + table + "\n```\n")
    common.write_atomic(os.path.join(args.out, "report.json"), json.dumps(res, indent=1) + "\n")
    print(json.dumps(dict(seconds_wall=args.wall, **{f"srcc_{k}": r["heldout"]["srcc"] for k, r in res["rows"].items()},
                          **{f"plcc_{k}": r["heldout"]["plcc"] for k, r in res["rows"].items()})))


if __name__ == "__main__":
    common.run_main(main)
