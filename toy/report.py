"""
The CPU demo's final table, from the files the stages wrote under the demo's folder:

    python toy/report.py --out runs/demo      # after demo.sh (which runs it)

- self-consistency: on the round's training pairs, how often one vote names the better image (the lower level
  of one (crop, type) group) and how often the majority of K votes does (vote.py's output);
- evolution: held-out SRCC / PLCC of the mean sampled score (evaluate.py's report.json), the SRCC within each
  (crop, type) group averaged over groups (from its scores.jsonl), the per-image spread of the sampled scores,
  and the held-out compare accuracy of each model (vote.py on held-out pairs, with its label probabilities);
- the expected score of each model (sum of d * p(d) over the one-token answers 1-5): its SRCC has no sampling
  noise, so a model that only narrows its score spread cannot move it (the only figure here that loads the models);
- the seconds each step of demo.sh took (<out>/timings.tsv) and, with --wall, the whole run's (two steps run at
  a time, so the steps add up to more).

Prints the table for people, then one JSON line for scripts; writes <out>/report.md, <out>/report.json and, once
base, round 1 and round 2 are there, the picture <out>/sheet.png (toy/sheet.py).
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
import prepare  # noqa: E402  (toy/prepare.py: the groups and the expected score)
import sheet  # noqa: E402  (toy/sheet.py: the picture)

MODELS = [("base", "base"), ("round1", "round 1"), ("control", "control: random labels"), ("round2", "round 2")]
CHECKPOINTS = {"base": "base", "round1": "round1/final", "control": "control/final", "round2": "round2/final"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="the demo's folder")
    p.add_argument("--prompts", default=None, help="the prompts of the expected score (default: each checkpoint's)")
    p.add_argument("--wall", type=float, help="seconds the whole run took (demo.sh measures it)")
    return p.parse_args(argv)


def better_side(row):
    """1.0 if a is the better image (lower level, same crop and type or the original), 0.0 if b, None if unknown."""
    same = row.get("ref_a") is not None and row.get("ref_a") == row.get("ref_b")
    types = {row.get("distortion_a"), row.get("distortion_b")} - {None}
    if not same or len(types) > 1 or row.get("level_a") is None or row.get("level_a") == row.get("level_b"):
        return None
    return float(row["level_a"] < row["level_b"])


def vote_accuracy(path):
    """Single-vote and majority accuracy of vote.py's rows against the levels; argmax accuracy from --save-text."""
    rows = [(r, better_side(r)) for r in common.read_jsonl(path)]
    rows = [(r, t) for r, t in rows if t is not None]
    if not rows:
        return None
    right = sum(r["wins_a"] if t == 1.0 else r["wins_b"] for r, t in rows)
    out = dict(pairs=len(rows), k=rows[0][0]["k"], single=right / sum(r["k"] for r, _ in rows),
               majority=float(np.mean([r["p"] == t for r, t in rows])),
               ties=float(np.mean([r["p"] == 0.5 for r, _ in rows])),
               invalid=sum(r["invalid"] for r, _ in rows) / sum(r["k"] for r, _ in rows))
    probs = [(r["probs"], t) for r, t in rows if isinstance(r.get("probs"), dict)]
    if probs:  # --no-think --save-text: the label probabilities per order (ab: a shown first, ba: b first)
        hits = []
        for pr, t in probs:
            for order, a_label in (("ab", 0), ("ba", 1)):
                if pr.get(order):
                    p_a, p_b = pr[order][a_label], pr[order][1 - a_label]
                    hits.append(float((p_a > p_b) == (t == 1.0)) if p_a != p_b else 0.0)
        out["argmax"] = float(np.mean(hits))
    return out


def eval_figures(folder, truth):
    """evaluate.py's held-out figures plus the SRCC within each (crop, type) group, overall and per type."""
    with open(os.path.join(folder, "report.json")) as f:
        report = json.load(f)
    d = next(iter(report["datasets"].values()))
    scores = {r["image"]: r["score"] for r in common.read_jsonl(os.path.join(folder, "scores.jsonl"))}
    per_type = {}
    for (ref, t), images in group_images(truth).items():
        s = [scores.get(i) for i in images]
        if None in s or np.ptp(s) == 0:  # an unscored image, or constant scores: no rank order to compare
            per_type.setdefault(t, []).append(0.0 if None not in s else np.nan)
            continue
        per_type.setdefault(t, []).append(spearmanr(s, [-truth[i]["level"] for i in images])[0])
    within = {t: float(np.nanmean(v)) for t, v in per_type.items()}
    return dict(srcc=d["srcc"], plcc=d["plcc"], spread=d["spread"], n=d["n"], invalid=d["invalid"],
                within=float(np.nanmean([x for v in per_type.values() for x in v])), within_type=within)


def expected_figures(out, key, prompts_path=None):
    """prepare.score_figures of one model on the held-out pool (None if the model is not there), asked with the
    checkpoint's own prompts unless --prompts; each image's expected score goes to <out>/eval/<key>/expected.jsonl
    (toy/sheet.py draws them), and a rerun reads them back unless the checkpoint is newer or --prompts is given."""
    path = os.path.join(out, CHECKPOINTS[key])
    if not os.path.isdir(path):
        return None
    done = os.path.join(out, "eval", key, "expected.jsonl")
    if prompts_path is None and os.path.exists(done) and \
            os.path.getmtime(done) > os.path.getmtime(os.path.join(path, "model.safetensors")):
        rows = common.read_jsonl(os.path.join(out, "pool", "heldout", "manifest.jsonl"))
        return prepare.score_figures({r["image"]: r["expected"] for r in common.read_jsonl(done)}, rows)
    model, tok, cfg = common.load_model(path, "cpu", "float32")
    prompts = common.resolve_prompts(path, prompts_path, False)[0]  # the expected score needs one-token answers
    rows, images = prepare.load_pool(out, "heldout", cfg)
    expected = prepare.expected_scores(model, tok, prompts, rows, images)
    os.makedirs(os.path.join(out, "eval", key), exist_ok=True)
    common.write_jsonl_atomic(os.path.join(out, "eval", key, "expected.jsonl"),
                              [dict(image=k, expected=v) for k, v in expected.items()])
    return prepare.score_figures(expected, rows)


def group_images(truth):
    """{(crop, type): images}, the original in every type's group."""
    types = sorted({r["distortion"] for r in truth.values() if r["distortion"]})
    groups = {}
    for image, r in truth.items():
        for t in [r["distortion"]] if r["distortion"] else types:
            groups.setdefault((r["ref"], t), []).append(image)
    return groups


def fmt(x, signed=False):
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else (f"{x:+.3f}" if signed else f"{x:.3f}")


def main(argv=None):
    args = parse_args(argv)
    out = args.out
    res = dict(date=datetime.date.today().isoformat(), out=out, machine=f"{platform.machine()}, {os.cpu_count()} cores")
    if hasattr(os, "getloadavg"):
        res["load"] = [round(x, 2) for x in os.getloadavg()]
    truth = {r["image"]: r for r in common.read_jsonl(os.path.join(out, "heldout.jsonl"))}

    # --- self-consistency of each round's votes on its training pairs
    res["votes"] = {}
    for rnd in ("round1", "round2"):
        path = os.path.join(out, rnd, "votes.jsonl")
        if os.path.exists(path):
            res["votes"][rnd] = vote_accuracy(path)

    # --- evolution on the held-out pool
    res["models"] = {}
    for key, _ in MODELS:
        m = {}
        if os.path.exists(os.path.join(out, "eval", key, "report.json")):
            m.update(eval_figures(os.path.join(out, "eval", key), truth))
        path = os.path.join(out, "eval", key, "compare.jsonl")
        if os.path.exists(path):
            m["compare"] = vote_accuracy(path)
        if m:
            m["expected"] = expected_figures(out, key, args.prompts)
        if m:
            res["models"][key] = m
    base, r1, ctl = (res["models"].get(k, {}).get("srcc") for k in ("base", "round1", "control"))
    res["gain_round1"] = None if None in (base, r1) else r1 - base
    res["gain_control"] = None if None in (base, ctl) else ctl - base
    eb, e1, ec = ((res["models"].get(k, {}).get("expected") or {}).get("score_srcc") for k in ("base", "round1", "control"))
    res["gain_round1_expected"] = None if None in (eb, e1) else e1 - eb
    res["gain_control_expected"] = None if None in (eb, ec) else ec - eb

    # --- timings written by demo.sh
    res["seconds"] = {}
    if os.path.exists(os.path.join(out, "timings.tsv")):
        with open(os.path.join(out, "timings.tsv")) as f:
            for line in f:
                if line.strip():
                    step, sec = line.rsplit("\t", 1)
                    res["seconds"][step] = float(sec)
    res["seconds_total"] = sum(res["seconds"].values())
    res["seconds_wall"] = args.wall

    # --- the table
    lines = [f"EvoQuality CPU demo, {res['date']} ({res['machine']}"
             + (f", load {' '.join(map(str, res['load']))}" if "load" in res else "") + f"): {out}", ""]
    if res["votes"]:
        lines += ["Self-consistency: votes on the training pairs (same crop and type) against the levels",
                  f"{'votes by':<14} {'pairs':>6} {'K':>3}  {'one vote':>8}  {'majority of K':>13}  {'ties':>5}"]
        for rnd, v in res["votes"].items():
            lines.append(f"{'round 1 model' if rnd == 'round2' else 'base':<14} {v['pairs']:>6} {v['k']:>3}  "
                         f"{fmt(v['single']):>8}  {fmt(v['majority']):>13}  {fmt(v['ties']):>5}")
        lines.append("")
    n = next((m["n"] for m in res["models"].values() if "n" in m), "?")
    lines += [f"Evolution on the held-out pool ({n} images of photographs never trained on; mos = 5 - level)",
              f"{'':<24} {'mean of sampled scores':^40}   {'expected score':^14}   {'compare':^15}",
              f"{'model':<24} {'SRCC':>6} {'PLCC':>6} {'in group':>8} {'spread':>6} {'invalid':>7}   "
              f"{'SRCC':>6} {'in group':>8}   {'argmax':>6} {'one vote':>8}"]
    for key, name in MODELS:
        m = res["models"].get(key)
        if not m:
            continue
        c, e = m.get("compare") or {}, m.get("expected") or {}
        lines.append(f"{name:<24} {fmt(m.get('srcc')):>6} {fmt(m.get('plcc')):>6} {fmt(m.get('within')):>8} "
                     f"{fmt(m.get('spread')):>6} {m.get('invalid', '-'):>7}   {fmt(e.get('score_srcc')):>6} "
                     f"{fmt(e.get('score_srcc_within_mean')):>8}   {fmt(c.get('argmax')):>6} {fmt(c.get('single')):>8}")
    types = sorted({t for m in res["models"].values() for t in (m.get("expected") or {}).get("score_srcc_within", {})})
    if types:  # a row per type, so that no name is cut
        shown = [(key, name) for key, name in MODELS if (res["models"].get(key) or {}).get("expected")]
        width = max(map(len, types))
        lines += ["", "Expected-score SRCC within (crop, type) groups, by type:",
                  f"{'type':<{width}} " + " ".join(f"{name.split(':')[0]:>8}" for _, name in shown)]
        for t in types:
            lines.append(f"{t:<{width}} " + " ".join(
                f"{fmt(res['models'][key]['expected']['score_srcc_within'].get(t)):>8}" for key, _ in shown))
    lines += ["", f"round 1 - base, held-out SRCC of the mean sampled score: {fmt(res['gain_round1'], True)} (target "
                  f">= +0.13), of the expected score: {fmt(res['gain_round1_expected'], True)}",
              f"control - base (target ~0): {fmt(res['gain_control'], True)} and {fmt(res['gain_control_expected'], True)}"]
    if res["seconds"]:
        lines += ["", "seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in res["seconds"].items())
                  + f"; sum {res['seconds_total']:.0f}"
                  + (f", wall {res['seconds_wall']:.0f} (two steps at a time)" if res["seconds_wall"] else "")]
    table = "\n".join(lines)
    if all(os.path.exists(os.path.join(out, "eval", key, "expected.jsonl")) for key in ("base", "round1", "round2")):
        sheet.main(["--out", out])
    print(table)
    common.write_atomic(os.path.join(out, "report.md"), "```\n" + table + "\n```\n")
    common.write_atomic(os.path.join(out, "report.json"), json.dumps(res, indent=1) + "\n")
    print(json.dumps(dict(gain_round1=res["gain_round1"], gain_control=res["gain_control"],
                          gain_round1_expected=res["gain_round1_expected"],
                          gain_control_expected=res["gain_control_expected"],
                          seconds=round(res["seconds_total"]), seconds_wall=res["seconds_wall"],
                          **{f"srcc_{k}": m.get("srcc") for k, m in res["models"].items()})))


if __name__ == "__main__":
    common.run_main(main)
