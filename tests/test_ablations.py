"""The paper's ablations and the variants (issue 15) and which pairs train (issue 14): vote.py --task score
(EvoEstimate's pseudo-estimates, its exact --no-think path), train_grpo.py's load_labels / load_estimates, the
regression reward, --adv-norm, --label soft, --min-margin, and toy/ablation.sh's plumbing."""
import copy
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import stats

import common
import policy
import train_grpo
import vote

from test_train_grpo import one_thread, phi  # noqa: F401  (fixtures and helpers shared with the stages' tests)
from test_vote import pool_dir, tiny  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -----------------------------------------------------------------------------
# vote.py --task score


def score_stub(model, tokenizer, requests, images, n=1, seed=0, **kwargs):
    """A sampler whose scores follow the image's brightness, every fourth answer unparsable, the darkest image
    (img0: mean normalised pixel -0.66, the next -0.15) never answering validly."""
    texts = []
    for ids, keys in requests:
        bright = images[keys[0]][0].mean().item()
        for t in range(n):
            if bright < -0.5 or t % 4 == 3:
                texts.append("no idea")
            else:
                texts.append(f"<think>...</think> \\boxed{{{min(5.0, 2.0 + bright + 0.25 * t):.2f}}}")
    return dict(texts=texts, tokens=[[]] * len(texts), stopped=[True] * len(texts), num_tokens=0)


def test_score_task_estimate_is_the_mean_of_the_valid_scores(pool_dir, tmp_path, monkeypatch, tiny, capsys):
    monkeypatch.setattr(common, "load_model", lambda *a, **kw: tiny)
    monkeypatch.setattr(common, "sample", score_stub)
    out = tmp_path / "est.jsonl"
    vote.main(["--task", "score", "--manifest", str(pool_dir / "manifest.jsonl"), "--k", "6", "--batch-pairs", "4",
               "--out", str(out)])
    rows = common.read_jsonl(out)
    assert [r["image"] for r in rows] == [f"img{j}.png" for j in range(6)]  # --images all: manifest order
    images = {k: common.preprocess_image(common.load_image(pool_dir / k), tiny[2]) for k in (r["image"] for r in rows)}
    texts = score_stub(None, None, [(None, [r["image"]]) for r in rows], images, n=6)["texts"]
    for j, r in enumerate(rows):
        assert set(r) == {"i", "image", "k", "scores", "estimate", "invalid", "ref", "distortion", "level", "mos"}
        want = [common.parse_score(t) for t in texts[6 * j:6 * j + 6]]
        assert r["scores"] == want and r["k"] == 6 and r["invalid"] == want.count(None)
        valid = [s for s in want if s is not None]
        assert r["estimate"] == (pytest.approx(np.mean(valid)) if valid else None)
    assert rows[0]["estimate"] is None and rows[0]["invalid"] == 6  # the darkest image never answers
    assert rows[5]["invalid"] == 1 and rows[5]["estimate"] > rows[1]["estimate"]
    printed = capsys.readouterr().out
    assert "1 images with no valid score" in printed and "SRCC of the estimates with level" in printed


def test_draw_images_is_seeded_and_distinct():
    pool = [dict(image=f"x{j}.png") for j in range(50)]
    drawn = vote.draw_images(pool, "20", seed=3)
    assert len({j for (j,) in drawn}) == 20 and drawn == sorted(drawn) == vote.draw_images(pool, "20", seed=3)
    assert drawn != vote.draw_images(pool, "20", seed=4)
    assert vote.draw_images(pool, "all", seed=0) == [(j,) for j in range(50)]
    with pytest.raises(ValueError, match="only 50 images"):
        vote.draw_images(pool, "51", seed=0)


def test_score_no_think_exact_expected_score_matches_sampled_answers(pool_dir, tiny):
    model, tokenizer, image_cfg = tiny
    model = copy.deepcopy(model)
    prompts = common.load_prompts()
    images = {"img2.png": common.preprocess_image(common.load_image(pool_dir / "img2.png"), image_cfg)}
    request = (common.encode_prompt(tokenizer, prompts, "score", [images["img2.png"][1]], think=False), ["img2.png"])
    values, ids = vote.score_tokens(tokenizer)
    assert values == [1.0, 2.0, 3.0, 4.0, 5.0]
    # steer the head: each one-token score gets its share (1: 5% + 5% as "1" / " 1", ...), anything else 20%
    seen = []
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(inp[0][0, -1]))
    logits = common.prefill(model, [request], images)[0][0]
    hook.remove()
    h, flat = seen[0], [t for g in ids for t in g]
    others = logits[[t for t in range(len(logits)) if t not in flat]].logsumexp(0)
    shares = dict(zip(flat, [0.05, 0.05, 0.20, 0.05, 0.15, 0.20, 0.10][:len(flat)]))
    for token, share in shares.items():
        model.lm_head.weight.data[token] = (math.log(share / 0.20) + others) * h / h.dot(h)
    exact = vote.label_probs(model, tokenizer, [request], images, ids, temperature=1.0)[0].numpy()
    np.testing.assert_allclose(exact, [0.10, 0.20, 0.05, 0.15, 0.30], atol=2e-3)  # the steering took: not vacuous
    expected = float(exact @ np.array(values) / exact.sum())

    counts, sampled = np.zeros(6), []
    for call in range(5):  # 5 x 1000 one-token answers through the real sampler
        out = common.sample(model, tokenizer, [request], images, n=1000, max_new_tokens=1, temperature=1.0, seed=call)
        for text in out["texts"]:
            s = common.parse_score(text)
            counts[values.index(s) if s is not None else 5] += 1
            sampled += [s] if s is not None else []
    assert stats.chisquare(counts, np.append(exact, 1 - exact.sum()) * counts.sum()).pvalue > 1e-3
    sd = np.sqrt(exact @ (np.array(values) - expected) ** 2 / exact.sum())
    assert abs(np.mean(sampled) - expected) < 4 * sd / math.sqrt(len(sampled))  # z-test at 4 sigma

    # vote.py's row: the exact expected score, and K draws from the same distribution
    args = vote.parse_args(["--task", "score", "--manifest", str(pool_dir / "manifest.jsonl"), "--no-think",
                            "--k", "20000", "--save-text"])
    pool = vote.read_manifest(pool_dir / "manifest.jsonl")
    row = vote.score_batch(model, tokenizer, prompts, image_cfg, str(pool_dir), pool, [(2,)], [0], args,
                           (values, ids))[0]
    assert row["image"] == "img2.png" and row["expected"] == pytest.approx(expected, abs=1e-12)
    assert abs(row["estimate"] - expected) < 4 * sd / math.sqrt(20000 - row["invalid"])
    p_invalid = 1 - exact.sum()
    assert abs(row["invalid"] / 20000 - p_invalid) < 4 * math.sqrt(p_invalid * (1 - p_invalid) / 20000)
    assert row["probs"]["invalid"] == pytest.approx(p_invalid) and row["probs"]["5"] == pytest.approx(exact[4])


def test_compare_summary_counts_the_pairs_whose_answers_were_all_invalid(capsys):
    rows = [dict(wins_a=a, wins_b=b, invalid=4 - a - b, k=4, p=vote.preference(a, b), first_wins=a)
            for a, b in ((3, 1), (0, 0), (2, 2), (0, 0), (0, 1))]
    assert vote.summarize(rows)["all_invalid"] == 2
    assert "2 pairs with no valid vote" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# train_grpo.py: which pairs train, with which label


def write_votes(d, votes, ps=None, name="votes.jsonl", extra=None):
    """Pairs (img{2j}, img{2j+1}) with the given (wins_a, wins_b), p from Eq. 1 unless given."""
    rng = np.random.default_rng(0)
    for i in range(2 * len(votes)):
        if not (d / f"img{i}.png").exists():
            Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(d / f"img{i}.png")
    rows = [dict(i=j, a=f"img{2 * j}.png", b=f"img{2 * j + 1}.png", wins_a=wa, wins_b=wb, invalid=8 - wa - wb, k=8,
                 p=vote.preference(wa, wb) if ps is None else ps[j]) for j, (wa, wb) in enumerate(votes)]
    for r in rows:
        r.update(extra or {})
    (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(d / name)


def test_pairs_without_enough_valid_votes_are_skipped_and_counted(tmp_path, capsys):
    path = write_votes(tmp_path, [(0, 0), (1, 0), (0, 0), (3, 1)])
    pairs = train_grpo.load_labels([path])
    assert [p["names"][0] for p in pairs] == ["img2.png", "img6.png"]
    assert "skipped 2 with fewer than 1 valid votes" in capsys.readouterr().out
    assert [p["names"][0] for p in train_grpo.load_labels([path], min_valid_votes=4)] == ["img6.png"]
    assert len(train_grpo.load_labels([path], min_valid_votes=0)) == 4  # 0: every pair, as before issue 14
    with pytest.raises(ValueError, match="no labelled pairs left after skipping"):
        train_grpo.load_labels([path], min_valid_votes=5)


def test_label_soft_is_the_vote_share_and_hard_refuses_a_soft_p(tmp_path):
    path = write_votes(tmp_path, [(3, 1), (2, 2), (0, 5), (7, 1)])
    hard, soft = train_grpo.load_labels([path]), train_grpo.load_labels([path], label="soft")
    assert [p["p"] for p in hard] == [1.0, 0.5, 0.0, 1.0]
    assert [p["p"] for p in soft] == [0.75, 0.5, 0.0, 0.875]
    for h, s in zip(hard, soft):  # only p changes
        assert {k: v for k, v in h.items() if k != "p"} == {k: v for k, v in s.items() if k != "p"}
    share = write_votes(tmp_path, [(7, 3)], ps=[0.7], name="share.jsonl")
    with pytest.raises(ValueError, match=r"share.jsonl:1: p must be 0, 0.5 or 1 \(Eq. 1\), got 0.7 \(a soft p\* in "
                                         r"\(0, 1\) needs --label soft\)"):
        train_grpo.load_labels([share])
    assert train_grpo.load_labels([share], label="soft")[0]["p"] == 0.7
    # labels that are not their votes' (the demo's control shuffles p across pairs): soft would train on the votes
    shuffled = write_votes(tmp_path, [(3, 1)], ps=[0.0], name="shuffled.jsonl")
    assert train_grpo.load_labels([shuffled])[0]["p"] == 0.0
    with pytest.raises(ValueError, match=r"shuffled.jsonl:1: p 0.0 is neither Eq. 1 of its votes 3:1"):
        train_grpo.load_labels([shuffled], label="soft")
    # a label file without votes: soft takes its p as given, hard still wants Eq. 1's values
    (tmp_path / "given.jsonl").write_text(json.dumps(dict(a="img0.png", b="img1.png", p=0.6)) + "\n")
    assert train_grpo.load_labels([str(tmp_path / "given.jsonl")], label="soft")[0]["p"] == 0.6


def test_min_margin_keeps_exactly_the_pairs_at_or_above_it(tmp_path, capsys):
    votes = [(3, 1), (2, 2), (4, 0), (5, 3), (1, 0)]  # margins 0.5, 0, 1, 0.25, 1
    path = write_votes(tmp_path, votes)
    every = train_grpo.load_labels([path])
    kept = train_grpo.load_labels([path], min_margin=0.5)
    assert [p["names"][0] for p in kept] == ["img0.png", "img4.png", "img8.png"]
    assert kept == [p for p in every if p["names"][0] in ("img0.png", "img4.png", "img8.png")]  # nothing else changes
    assert "2 with a vote margin below 0.5" in capsys.readouterr().out
    assert train_grpo.load_labels([path], min_margin=0.0) == every
    (tmp_path / "given.jsonl").write_text(json.dumps(dict(a="img0.png", b="img1.png", p=1)) + "\n")
    with pytest.raises(ValueError, match=r"given.jsonl:1: --min-margin and --min-valid-votes > 1 need the row's votes"):
        train_grpo.load_labels([str(tmp_path / "given.jsonl")], min_margin=0.5)


def test_repeated_pairs_are_merged_and_contradictions_name_both_lines(tmp_path, capsys):
    first = write_votes(tmp_path, [(3, 1), (0, 4)], name="one.jsonl")
    (tmp_path / "two.jsonl").write_text(
        json.dumps(dict(a="img1.png", b="img0.png", wins_a=1, wins_b=3, p=0.0)) + "\n"  # the same label, swapped
        + json.dumps(dict(a="img2.png", b="img3.png", wins_a=0, wins_b=4, p=0.0)) + "\n")  # the same, same order
    pairs = train_grpo.load_labels([first, str(tmp_path / "two.jsonl")])
    assert [(p["names"], p["p"]) for p in pairs] == [(("img0.png", "img1.png"), 1.0), (("img2.png", "img3.png"), 0.0)]
    assert "merged 2 repeated pairs" in capsys.readouterr().out
    (tmp_path / "bad.jsonl").write_text(json.dumps(dict(a="img1.png", b="img0.png", wins_a=3, wins_b=1, p=1.0)) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: pair \('img1.png', 'img0.png'\) has p\* 1.0 but .*one.jsonl:1 "
                                         r"labels the same two images p\* 0.0 in this order: contradictory labels"):
        train_grpo.load_labels([first, str(tmp_path / "bad.jsonl")])
    # soft labels: equal shares merge, different ones contradict
    soft = write_votes(tmp_path, [(3, 1)], name="s1.jsonl")
    write_votes(tmp_path, [(6, 2)], name="s2.jsonl")
    write_votes(tmp_path, [(2, 1)], name="s3.jsonl")
    assert len(train_grpo.load_labels([soft, str(tmp_path / "s2.jsonl")], label="soft")) == 1
    with pytest.raises(ValueError, match="s3.jsonl:1: .*s1.jsonl:1 labels .* contradictory"):
        train_grpo.load_labels([soft, str(tmp_path / "s3.jsonl")], label="soft")
    assert len(train_grpo.load_labels([soft, str(tmp_path / "s3.jsonl")])) == 1  # hard: both are p* = 1


def test_estimates_skip_images_without_valid_scores_and_refuse_contradictions(tmp_path, capsys):
    for j in range(3):
        Image.fromarray(np.zeros((56, 56, 3), np.uint8)).save(tmp_path / f"x{j}.png")
    rows = [dict(image="x0.png", k=4, scores=[3, 3.5, 3, None], estimate=19 / 6, invalid=1, ref="r", distortion="d"),
            dict(image="x1.png", k=4, scores=[None] * 4, estimate=None, invalid=4),
            dict(image="x2.png", k=4, scores=[2, None, None, None], estimate=2.0, invalid=3),
            dict(image="x0.png", k=4, scores=[3, 3.5, 3, None], estimate=19 / 6, invalid=1)]
    path = tmp_path / "est.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = train_grpo.load_estimates([str(path)], group_by=["ref", "distortion"])
    assert [(it["names"], it["estimate"]) for it in items] == [(("x0.png",), 19 / 6), (("x2.png",), 2.0)]
    assert items[0]["group"] == (str(path), "r", "d") and items[1]["group"] == (str(path), 3)
    assert "skipped 1 with fewer than 1 valid scores; merged 1 repeated images" in capsys.readouterr().out
    assert len(train_grpo.load_estimates([str(path)], min_valid_votes=2)) == 1
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:1] + [dict(rows[0], estimate=4.0)]))
    with pytest.raises(ValueError, match=r"est.jsonl:2: image 'x0.png' has estimate 4.0 but .*est.jsonl:1 gives it"):
        train_grpo.load_estimates([str(path)])
    path.write_text(json.dumps(dict(rows[0], estimate=7)) + "\n")
    with pytest.raises(ValueError, match=r"est.jsonl:1: estimate must be a score in \[1, 5\] or null, got 7"):
        train_grpo.load_estimates([str(path)])


# -----------------------------------------------------------------------------
# rewards and advantages against hand computation


def test_fidelity_reward_with_a_soft_label_by_hand():
    scores, g = {"x": [3.0, 4.0, None], "y": [2.0, 4.0, 3.0]}, 1e-6
    r = train_grpo.fidelity_rewards(scores, {"x": [("y", 0.7)], "y": [("x", 0.3)]}, g)
    var_x, var_y = 0.25, 2 / 3
    want = [math.sqrt(0.7 * phi((q - 3.0) / math.sqrt(var_x + var_y + g)))
            + math.sqrt(0.3 * (1 - phi((q - 3.0) / math.sqrt(var_x + var_y + g)))) for q in (3.0, 4.0)]
    np.testing.assert_allclose(r["x"], want + [0.0], atol=1e-12)
    want_y = [math.sqrt(0.3 * phi((q - 3.5) / math.sqrt(var_y + var_x + g)))
              + math.sqrt(0.7 * (1 - phi((q - 3.5) / math.sqrt(var_y + var_x + g)))) for q in (2.0, 4.0, 3.0)]
    np.testing.assert_allclose(r["y"], want_y, atol=1e-12)


def test_regression_reward_by_hand():
    """Q-Insight's rule: 1 if |score - label| < threshold (strictly), else 0; 0 for an invalid answer."""
    scores = {"x": [3.0, 3.25, 3.5, None, 2.75, 2.5, 1.0], "y": [None, None], "z": [4.5, 5.0]}
    targets = {"x": 3.0, "y": 2.0, "z": 4.75}
    r = train_grpo.regression_rewards(scores, targets, 0.35)
    np.testing.assert_array_equal(r["x"], [1, 1, 0, 0, 1, 0, 0])
    np.testing.assert_array_equal(r["y"], [0, 0])
    np.testing.assert_array_equal(r["z"], [1, 1])
    np.testing.assert_array_equal(train_grpo.regression_rewards(scores, targets, 0.5)["x"], [1, 1, 0, 0, 1, 0, 0])
    np.testing.assert_array_equal(train_grpo.regression_rewards(scores, targets, 0.51)["x"], [1, 1, 1, 0, 1, 1, 0])


def test_adv_norm_none_is_the_mean_only_advantage():
    near = [0.5, 0.5, 0.5, 0.5 + 1e-6]  # rewards that differ by 1e-6
    np.testing.assert_allclose(np.abs(train_grpo.advantages(near)).max(), math.sqrt(3), rtol=1e-6)  # Eq. 4: 1.73
    np.testing.assert_allclose(train_grpo.advantages(near, "none"), np.array(near) - np.mean(near), atol=1e-15)
    assert np.abs(train_grpo.advantages(near, "none")).max() < 1e-6
    r = [1.0, 2.0, 3.0, 0.0]
    np.testing.assert_array_equal(train_grpo.advantages(r, "none"), np.array(r) - 1.5)
    np.testing.assert_array_equal(train_grpo.advantages(r, "std"), train_grpo.advantages(r))


# -----------------------------------------------------------------------------
# the flags through the training loop, with rollouts that answer validly


def digit_generate(model, tok, requests, images, n=1, seed=0, **kwargs):
    """policy.generate with valid one-token scores: a seeded digit per rollout, one in five invalid."""
    end = tok.convert_tokens_to_ids("<|im_end|>")
    tokens, texts = [], []
    for s in seed:
        for d in np.random.default_rng(s).integers(0, 6, size=n).tolist():
            text = "x" if d == 0 else str(d)
            tokens.append(tok.encode(text, add_special_tokens=False) + [end])
            texts.append(text)
    return dict(tokens=tokens, texts=texts, stopped=[True] * len(texts), num_tokens=sum(map(len, tokens)))


def train(tmp_path, labels, out, *extra):
    train_grpo.main(["--labels", labels, "--out", str(tmp_path / out), "--k", "4", "--max-new-tokens", "2",
                     "--batch-pairs", "2", "--max-steps", "3", "--lr", "1e-3", "--save-every", "0", *extra])
    metrics = [json.loads(line) for line in open(tmp_path / out / "metrics.jsonl")]
    for m in metrics:
        m.pop("seconds")
    with open(tmp_path / out / "final" / "model.safetensors", "rb") as f:
        return metrics, f.read()


def test_variant_flags_off_change_nothing_and_on_reach_the_loop(tmp_path, monkeypatch):
    monkeypatch.setattr(policy, "generate", digit_generate)
    labels = write_votes(tmp_path, [(3, 1), (2, 2), (4, 0), (5, 3), (1, 0), (6, 2)])
    default = train(tmp_path, labels, "default")
    assert default == train(tmp_path, labels, "off", "--adv-norm", "std", "--label", "hard", "--min-margin", "0")
    assert 0 < default[0][0]["invalid_rate"] < 0.5 and default[0][0]["reward_std"] > 0  # real rewards

    seen = dict(partners=[], adv=[])
    fidelity, adv = train_grpo.fidelity_rewards, train_grpo.advantages
    monkeypatch.setattr(train_grpo, "fidelity_rewards", lambda s, partners, g: seen["partners"].append(partners)
                        or fidelity(s, partners, g))
    monkeypatch.setattr(train_grpo, "advantages", lambda r, norm="std": seen["adv"].append((r, norm, adv(r, norm)))
                        or adv(r, norm))
    on = train(tmp_path, labels, "on", "--adv-norm", "none", "--label", "soft", "--min-margin", "0.4")
    assert on[1] != default[1]
    shares = {0.75, 1.0, 0.0, 0.25}  # soft p* of the pairs with margin >= 0.4, from either side
    assert {p for step in seen["partners"] for ps in step.values() for _, p in ps} <= shares
    images = {x for step in seen["partners"] for x in step}
    assert images <= {str(tmp_path / f"img{i}.png") for i in (0, 1, 4, 5, 8, 9, 10, 11)}  # margins 0.5, 1, 1, 0.5
    assert all(norm == "none" and np.array_equal(a, np.asarray(r) - np.mean(r)) for r, norm, a in seen["adv"])


def test_regression_reward_trains_against_the_estimates(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(policy, "generate", digit_generate)
    rng = np.random.default_rng(1)
    rows = []
    for j in range(6):
        Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(tmp_path / f"y{j}.png")
        rows.append(dict(i=j, image=f"y{j}.png", k=4, scores=[], estimate=1.0 + 0.75 * j, invalid=0))
    (tmp_path / "est.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls = []
    real = train_grpo.regression_rewards
    monkeypatch.setattr(train_grpo, "regression_rewards", lambda s, t, th: calls.append((s, t, th, real(s, t, th)))
                        or real(s, t, th))
    metrics, _ = train(tmp_path, str(tmp_path / "est.jsonl"), "reg", "--reward", "regression", "--batch-images", "3",
                       "--epochs", "2")
    estimates = {str(tmp_path / r["image"]): r["estimate"] for r in rows}
    assert len(calls) == 3
    for (scores, targets, threshold, rewards), m in zip(calls, metrics):
        assert len(targets) == 3 and threshold == 0.35 and all(estimates[x] == t for x, t in targets.items())
        flat = np.concatenate([rewards[x] for x in scores])
        assert m["reward_mean"] == pytest.approx(flat.mean())
        assert m["invalid_rate"] == pytest.approx(np.mean([s is None for x in scores for s in scores[x]]))
    assert any(m["reward_mean"] > 0 for m in metrics)
    with pytest.raises(SystemExit):
        train_grpo.parse_args(["--labels", "x", "--out", str(tmp_path / "y"), "--reward", "regression", "--label",
                               "soft"])
    assert "--reward regression trains on estimates" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# toy/ablation.sh: the plumbing at DEMO_SCALE=test (figures meaningless)


def test_ablation_script_writes_every_row(tmp_path):
    """One K of the three (the others run the same code), to keep the suite short: still ten processes start here."""
    env = dict(os.environ, DEMO_SCALE="test", ABLATION_OUT=str(tmp_path / "abl"), PYTHON=sys.executable,
               OMP_NUM_THREADS="1", KS="4")
    run = subprocess.run(["bash", os.path.join(ROOT, "toy", "ablation.sh")], env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for name in ("base", "k4", "estimate"):
        assert os.path.isfile(tmp_path / "abl" / "eval" / name / "report.json"), name
    rows = common.read_jsonl(tmp_path / "abl" / "estimate" / "estimates.jsonl")
    assert len(rows) == 11 * 26 and all(r["k"] == 16 for r in rows)  # 11 photographs x 1 crop x (1 + 5 x 5)
    assert {r["k"] for r in common.read_jsonl(tmp_path / "abl" / "k4" / "votes.jsonl")} == {4}
    with open(tmp_path / "abl" / "report.json") as f:
        res = json.load(f)
    assert list(res["rows"]) == ["base", "k4", "estimate"]
    assert "estimates" in res["rows"]["estimate"] and "votes" in res["rows"]["k4"]
    for name in ("round 0 (base)", "EvoQuality, K = 4", "EvoEstimate, K = 16"):
        assert any(line.startswith(name) for line in run.stdout.splitlines()), name
    last = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(last) >= {"seconds_wall", "srcc_base", "srcc_k4", "plcc_estimate"}
