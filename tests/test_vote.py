import copy
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

import common
import vote

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BRIGHTNESS = [40, 75, 110, 145, 180, 215]  # img0 darkest ... img5 brightest (the original)


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory):
    """Six 56x56 gradients (4 visual tokens each): variants 'dark' at levels 5..1 of one original (level 0)."""
    root = tmp_path_factory.mktemp("pool")
    rows = []
    for j, v in enumerate(BRIGHTNESS):
        x = np.clip(np.linspace(0, 60, 56)[None, :, None] + v, 0, 255).astype(np.uint8)
        Image.fromarray(np.broadcast_to(x, (56, 56, 3)).copy()).save(root / f"img{j}.png")
        original = j == len(BRIGHTNESS) - 1
        rows.append(dict(image=f"img{j}.png", ref="r0", distortion=None if original else "dark",
                         level=len(BRIGHTNESS) - 1 - j, mos=float(v), source="authentic" if original else "synthetic"))
    common.write_jsonl_atomic(str(root / "manifest.jsonl"), rows)
    return root


@pytest.fixture(scope="module")
def tiny():
    return common.load_model("tiny", "cpu", "float32")


@pytest.fixture
def cached_model(monkeypatch, tiny):
    monkeypatch.setattr(common, "load_model", lambda *args, **kwargs: tiny)
    return tiny


def run(cmd):
    """A CLI run in a subprocess, one thread like torchrun's workers, so 1 and 2 processes compute alike."""
    done = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


# -----------------------------------------------------------------------------
# Eq. 1, vote counting, order mapping

def test_eq1_majority_and_ties():
    assert vote.preference(20, 12) == 1.0
    assert vote.preference(16, 16) == 0.5
    assert vote.preference(0, 0) == 0.5  # every answer invalid: no preference
    assert vote.preference(3, 29) == 0.0


def test_tally_maps_the_swapped_order_back_and_counts_invalid():
    # (first shown, second shown, invalid): in order ab a is first, in order ba b is first
    votes = vote.tally((3, 1, 2), (0, 4, 1))
    assert votes == dict(wins_a=7, wins_b=1, invalid=3, first_wins=3)


def test_orders_split_k_evenly(pool_dir, tmp_path, monkeypatch, cached_model):
    assert {vote.order_counts(32, 0, i) for i in range(50)} == {(16, 16)}
    odd = [vote.order_counts(5, 0, i) for i in range(50)]
    assert set(odd) == {(3, 2), (2, 3)}  # the odd query's order varies per pair
    # and the sampler is asked for exactly these counts: (a, b) shown in that order order_counts()[0] times
    asked = {}

    def recording(model, tokenizer, requests, images, n=1, seed=0, **kwargs):
        asked.update({tuple(keys): count for (_, keys), count in zip(requests, n)})
        return brighter_stub(model, tokenizer, requests, images, n=n, seed=seed, **kwargs)

    monkeypatch.setattr(common, "sample", recording)
    vote.main(["--manifest", str(pool_dir / "manifest.jsonl"), "--pairs", "all", "--k", "5", "--seed", "3",
               "--out", str(tmp_path / "v.jsonl")])
    rows = common.read_jsonl(tmp_path / "v.jsonl")
    assert len(asked) == 2 * len(rows) == 30
    for r in rows:
        assert (asked[(r["a"], r["b"])], asked[(r["b"], r["a"])]) == vote.order_counts(5, 3, r["i"])
    assert len({asked[(r["a"], r["b"])] for r in rows}) == 2


def test_odd_k_order_is_balanced_independent_across_pairs_and_differs_by_seed():
    """Which order gets the odd query behaves as a fair coin per (seed, pair): half the pairs, runs as short as a
    coin's (the CRC's low bit ran in blocks of ~8-10 pairs), and seeds 0/1, 2/3 agreeing on half the pairs (the
    CRC made them equal)."""
    n = 2000
    extra = {seed: np.array([vote.order_counts(5, seed, i)[0] == 3 for i in range(n)]) for seed in range(4)}
    for seed, x in extra.items():
        assert stats.binomtest(int(x.sum()), n).pvalue > 1e-3, seed
        runs = 1 + np.count_nonzero(x[1:] != x[:-1])  # Wald-Wolfowitz: (n + 1) / 2 expected, variance (n - 1) / 4
        assert abs(runs - (n + 1) / 2) < 4 * math.sqrt((n - 1) / 4), (seed, runs)
    for s, t in ((0, 1), (2, 3), (0, 2)):
        assert stats.binomtest(int((extra[s] == extra[t]).sum()), n).pvalue > 1e-3, (s, t)


def brighter_stub(model, tokenizer, requests, images, n=1, seed=0, **kwargs):
    """A sampler that always names the brighter image shown, and answers every third row unparsably."""
    texts = []
    for (ids, keys), count in zip(requests, n):
        first, second = (images[k][0].mean().item() for k in keys)
        texts += ["no idea" if t % 3 == 2 else f"<think>...</think> \\boxed{{{0 if first > second else 1}}}"
                  for t in range(count)]
    return dict(texts=texts, tokens=[[]] * len(texts), stopped=[True] * len(texts), num_tokens=0)


def test_brighter_preferring_sampler_gives_p_by_brightness_whatever_the_order(pool_dir, tmp_path, monkeypatch,
                                                                             cached_model, capsys):
    monkeypatch.setattr(common, "sample", brighter_stub)
    out = tmp_path / "v.jsonl"
    vote.main(["--manifest", str(pool_dir / "manifest.jsonl"), "--pairs", "all", "--k", "5", "--batch-pairs", "4",
               "--out", str(out)])
    rows = common.read_jsonl(out)
    assert len(rows) == 15
    assert {r["mos_a"] > r["mos_b"] for r in rows} == {True, False}  # the brighter image is `a` in some pairs only
    for r in rows:
        a_brighter = r["mos_a"] > r["mos_b"]
        assert r["p"] == (1.0 if a_brighter else 0.0)
        assert (r["wins_a"], r["wins_b"], r["invalid"]) == ((4, 0, 1) if a_brighter else (0, 4, 1))
    printed = capsys.readouterr().out
    assert "agrees with level (same ref and distortion type, lower level better) on 100.0% of 15 pairs" in printed


# -----------------------------------------------------------------------------
# pair sampling

def make_pool(refs=4, variants=3):
    pool = []
    for r in range(refs):
        pool.append(dict(image=f"r{r}.png", ref=f"r{r}", distortion=None, level=0, source="authentic"))
        pool += [dict(image=f"r{r}_{d}.png", ref=f"r{r}", distortion=f"d{d % 2}", level=1 + d, source="synthetic")
                 for d in range(variants)]
    return pool


def test_random_pairs_are_distinct_seeded_and_cover_all():
    pool = make_pool()
    pairs = vote.draw_pairs(pool, "random", 50, seed=3)
    assert len(pairs) == 50 and all(a != b for a, b in pairs)
    assert len({frozenset(p) for p in pairs}) == 50
    assert pairs == vote.draw_pairs(pool, "random", 50, seed=3)
    assert pairs != vote.draw_pairs(pool, "random", 50, seed=4)
    assert len({a < b for a, b in pairs}) == 2  # which image is `a` is random
    every = vote.draw_pairs(pool, "random", "all", seed=0)
    assert {frozenset(p) for p in every} == {frozenset((u, v)) for u in range(16) for v in range(u)}


def test_same_ref_pairs_share_a_ref_and_group_by_keeps_one_distortion_type():
    pool = make_pool()
    pairs = vote.draw_pairs(pool, "same-ref", "all", seed=0)
    assert len(pairs) == 4 * math.comb(4, 2) and all(pool[a]["ref"] == pool[b]["ref"] for a, b in pairs)
    typed = vote.draw_pairs(pool, "same-ref", "all", seed=0, group_by=["ref", "distortion"])
    # per ref: d0 has 2 variants + the original (3 pairs), d1 has 1 + the original (1 pair)
    assert len(typed) == 4 * 4
    for a, b in typed:
        da, db = pool[a]["distortion"], pool[b]["distortion"]
        assert pool[a]["ref"] == pool[b]["ref"] and (da == db or None in (da, db))


def test_asking_for_more_pairs_than_exist_says_how_many():
    with pytest.raises(ValueError, match="only 24 distinct pairs exist among 16 images in mode same-ref"):
        vote.draw_pairs(make_pool(), "same-ref", 25, seed=0)


def test_source_filter_keeps_only_that_source(pool_dir, tmp_path, monkeypatch, cached_model):
    monkeypatch.setattr(common, "sample", brighter_stub)
    with pytest.raises(ValueError, match="only 0 distinct pairs exist among 1 images"):  # one original only
        vote.main(["--manifest", str(pool_dir / "manifest.jsonl"), "--source", "authentic", "--pairs", "all",
                   "--out", str(tmp_path / "v.jsonl")])
    vote.main(["--manifest", str(pool_dir / "manifest.jsonl"), "--source", "synthetic", "--pairs", "all", "--k", "2",
               "--out", str(tmp_path / "v.jsonl")])
    rows = common.read_jsonl(tmp_path / "v.jsonl")
    assert len(rows) == 10 and "img5.png" not in {r["a"] for r in rows} | {r["b"] for r in rows}


# -----------------------------------------------------------------------------
# --no-think: exact one-token probabilities against sampled one-token answers

def test_no_think_exact_probabilities_match_sampled_one_token_answers(pool_dir, tiny):
    model, tokenizer, image_cfg = tiny
    model = copy.deepcopy(model)
    prompts = common.load_prompts()
    images = {k: common.preprocess_image(common.load_image(pool_dir / k), image_cfg) for k in ("img1.png", "img4.png")}
    requests = [(common.encode_prompt(tokenizer, prompts, "compare", [images[k][1] for k in keys], think=False), keys)
                for keys in (["img1.png", "img4.png"], ["img4.png", "img1.png"])]
    label_ids = vote.label_tokens(tokenizer, prompts["compare_labels"])
    assert len(label_ids[0]) == 2  # "0" and " 0": both are a bare answer "0"
    # steer the random head so that, in order ab, "0" / " 0" / "1" / anything else get 30% / 10% / 25% / 35%
    seen = []
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(inp[0][0, -1]))
    logits = common.prefill(model, requests[:1], images)[0][0]
    hook.remove()
    h, steered = seen[0], label_ids[0] + label_ids[1][:1]
    others = logits[[t for t in range(len(logits)) if t not in label_ids[0] + label_ids[1]]].logsumexp(0)
    for token, share in zip(steered, (0.30, 0.10, 0.25)):
        model.lm_head.weight.data[token] = (math.log(share / 0.35) + others) * h / h.dot(h)
    exact = vote.label_probs(model, tokenizer, requests, images, label_ids, temperature=1.0).numpy()
    assert abs(exact[0, 0] - 0.4) < 0.02 and abs(exact[0, 1] - 0.25) < 0.02  # the test is not vacuous

    counts = np.zeros((2, 3))
    for call in range(5):  # 5 x 1000 one-token answers per order, through the real sampler
        out = common.sample(model, tokenizer, requests, images, n=1000, max_new_tokens=1, temperature=1.0,
                            seed=[call, 100 + call])
        for r in range(2):
            for text in out["texts"][r * 1000:(r + 1) * 1000]:  # a bare-label answer: its stripped text is a label
                counts[r, prompts["compare_labels"].index(text.strip()) if text.strip() in ("0", "1") else 2] += 1
    for r in range(2):
        expected = np.array([exact[r, 0], exact[r, 1], 1 - exact[r].sum()]) * counts[r].sum()
        assert stats.chisquare(counts[r], expected).pvalue > 1e-3

    # and the K votes vote.py draws from them land on the right image: a = img1 shown first in order ab
    args = vote.parse_args(["--manifest", str(pool_dir / "manifest.jsonl"), "--no-think", "--k", "20000"])
    pool = vote.read_manifest(pool_dir / "manifest.jsonl")
    row = vote.vote_batch(model, tokenizer, prompts, image_cfg, str(pool_dir), pool, [(1, 4)], [0], args, label_ids)[0]
    expect_a = (exact[0, 0] + exact[1, 1]) / 2
    assert abs(row["wins_a"] / 20000 - expect_a) < 4 * math.sqrt(expect_a * (1 - expect_a) / 20000)
    assert row["wins_a"] + row["wins_b"] + row["invalid"] == 20000


# -----------------------------------------------------------------------------
# end to end on the tiny model

def test_tiny_end_to_end_think_and_no_think(answering, tmp_path):
    """The toy base model (tests/conftest.py) answers A / B: the votes recorded are its parsed answers, mapped back to
    a and b, and the exact --no-think votes are draws from the label probabilities they record."""
    labels = common.load_prompts(answering["prompts"])["compare_labels"]
    flags = ["--model", answering["model"], "--prompts", answering["prompts"], "--mode", "same-ref", "--pairs", "all",
             "--manifest", str(answering["pool"] / "manifest.jsonl"), "--save-text", "--seed", "1"]
    vote.main(flags + ["--k", "3", "--max-new-tokens", "4", "--out", str(tmp_path / "think.jsonl")])
    rows = common.read_jsonl(tmp_path / "think.jsonl")
    assert [r["i"] for r in rows] == list(range(30))  # 2 refs x C(6, 2) pairs
    for r in rows:
        ab = [common.parse_compare(t, labels) for t in r["texts"]["ab"]]  # a shown first
        ba = [common.parse_compare(t, labels) for t in r["texts"]["ba"]]
        assert (r["wins_a"], r["wins_b"], r["invalid"]) == (ab.count(0) + ba.count(1), ab.count(1) + ba.count(0),
                                                            ab.count(None) + ba.count(None))
        assert r["first_wins"] == ab.count(0) + ba.count(0) and r["k"] == len(ab) + len(ba) == 3
        assert r["p"] == vote.preference(r["wins_a"], r["wins_b"])
        assert {"ref_a", "distortion_b", "level_a", "mos_b"} <= set(r)
    assert sum(r["invalid"] for r in rows) < 0.25 * 90  # real answers (measured 9%), not None against None
    assert {r["p"] for r in rows} == {0.0, 0.5, 1.0}
    assert not os.path.exists(tmp_path / "think.jsonl.part")

    vote.main(flags + ["--k", "32", "--no-think", "--out", str(tmp_path / "exact.jsonl")])
    rows = common.read_jsonl(tmp_path / "exact.jsonl")
    assert len(rows) == 30 and all(r["wins_a"] + r["wins_b"] + r["invalid"] == 32 for r in rows)
    ab, ba = (np.array([r["probs"][order] for r in rows]) for order in ("ab", "ba"))
    assert ((ab >= 0) & (ab <= 1)).all() and ab.sum(1).mean() > 0.8 and ba.sum(1).mean() > 0.8  # mostly valid
    # 16 votes per order: wins_a is a draw of label 0 in order ab plus label 1 in order ba
    mean_a = 16 * (ab[:, 0] + ba[:, 1])
    var_a = 16 * (ab[:, 0] * (1 - ab[:, 0]) + ba[:, 1] * (1 - ba[:, 1]))
    wins_a = np.array([r["wins_a"] for r in rows])
    assert abs((wins_a - mean_a).sum()) < 4 * math.sqrt(var_a.sum())
    invalid = np.array([r["invalid"] for r in rows])
    assert abs((invalid - 16 * (2 - ab.sum(1) - ba.sum(1))).sum()) < 4 * math.sqrt(32 * len(rows))


# -----------------------------------------------------------------------------
# resume and torchrun give the clean single-process file

SLOW = ["--pairs", "all", "--k", "4", "--max-new-tokens", "32", "--batch-pairs", "1", "--save-text", "--seed", "7"]


@pytest.fixture(scope="module")
def clean_run(pool_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "v.jsonl"
    run([sys.executable, os.path.join(ROOT, "vote.py"), "--manifest", str(pool_dir / "manifest.jsonl"), *SLOW,
         "--out", str(out)])
    return out.read_bytes()


def test_killed_run_resumes_to_the_clean_file(pool_dir, tmp_path, clean_run):
    out = tmp_path / "v.jsonl"
    cmd = [sys.executable, os.path.join(ROOT, "vote.py"), "--manifest", str(pool_dir / "manifest.jsonl"), *SLOW,
           "--out", str(out)]
    proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    part = tmp_path / "v.jsonl.part"
    deadline = time.time() + 60
    while not (part.exists() and part.read_bytes().count(b"\n") >= 3) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and 3 <= part.read_bytes().count(b"\n") < 15  # killed part way
    with open(part, "a") as f:
        f.write('{"i": 14, "a": "img')  # as if killed in the middle of an append
    run(cmd)
    assert out.read_bytes() == clean_run
    assert not part.exists()


def test_two_process_gloo_run_matches_one_process(pool_dir, tmp_path, clean_run):
    out = tmp_path / "v.jsonl"
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         os.path.join(ROOT, "vote.py"), "--manifest", str(pool_dir / "manifest.jsonl"), *SLOW, "--out", str(out)])
    assert out.read_bytes() == clean_run
    assert sorted(os.listdir(tmp_path)) == ["v.jsonl", "v.jsonl.args.json"]


# -----------------------------------------------------------------------------
# bad input

def test_missing_image_names_the_manifest_line(pool_dir, tmp_path):
    lines = (pool_dir / "manifest.jsonl").read_text().splitlines()
    lines[2] = lines[2].replace("img2.png", "../gone.png")
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    for j in (0, 1, 3, 4, 5):
        os.symlink(pool_dir / f"img{j}.png", tmp_path / f"img{j}.png")
    with pytest.raises(ValueError, match=r"manifest.jsonl:3: image '../gone.png' not found"):
        vote.main(["--manifest", str(tmp_path / "manifest.jsonl"), "--pairs", "all",
                   "--out", str(tmp_path / "v.jsonl")])


@pytest.mark.parametrize("field,value,message", [
    ("level", "3", "level must be a number or null, got '3'"),
    ("level", True, "level must be a number or null, got True"),
    ("mos", "high", "mos must be a number or null, got 'high'"),
    ("mos", float("nan"), "mos must be a number or null, got nan"),
    ("ref", 5, "ref must be a string or null, got 5"),
    ("distortion", ["blur"], r"distortion must be a string or null, got \['blur'\]"),
])
def test_manifest_field_types_are_checked_with_file_and_line(tmp_path, field, value, message):
    """A level of "3" used to pass, get its votes cast, then end in a TypeError in the summary."""
    rows = [dict(image="a.png", ref="r", level=1, mos=2.5), dict(image="b.png", ref="r", level=2) | {field: value}]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"manifest\.jsonl:2: " + message):
        vote.read_manifest(tmp_path / "manifest.jsonl")


@pytest.mark.parametrize("flags,message", [
    (["--temperature", "-1"], "--temperature must be at least 0, got -1.0"),  # sampled the inverted distribution
    (["--temperature", "nan"], "--temperature must be at least 0, got nan"),
    (["--top-p", "0"], r"--top-p must be in \(0, 1\], got 0.0"),
    (["--top-k", "-3"], "--top-k must be at least 0, got -3"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be positive"),
    (["--seed", "-1"], "--seed must be at least 0"),
    (["--out", "MANIFEST"], "is also an input"),
    (["--out", "MANIFEST/v.jsonl"], r"manifest\.jsonl is a file, not a folder"),
    (["--out", "/proc/votes.jsonl"], r"cannot write in /proc"),
])
def test_bad_flags_are_refused_before_any_work(pool_dir, flags, message, capsys):
    manifest = str(pool_dir / "manifest.jsonl")
    with pytest.raises(SystemExit):
        vote.parse_args(["--manifest", manifest] + [f.replace("MANIFEST", manifest) for f in flags])
    assert re.search(message, capsys.readouterr().err)


def test_malformed_manifest_line_is_named(tmp_path):
    (tmp_path / "manifest.jsonl").write_text('{"image": "a.png"}\n\n{"image": "b.png"\n')
    with pytest.raises(ValueError, match=r"manifest.jsonl:3: malformed JSON line"):
        vote.main(["--manifest", str(tmp_path / "manifest.jsonl"), "--out", str(tmp_path / "v.jsonl")])


def test_pairs_file_is_voted_in_its_order_and_must_name_manifest_images(pool_dir, tmp_path, monkeypatch, cached_model):
    monkeypatch.setattr(common, "sample", brighter_stub)
    common.write_jsonl_atomic(str(tmp_path / "pairs.jsonl"), [dict(a="img3.png", b="img0.png"),
                                                              dict(a="img1.png", b="img5.png")])
    vote.main(["--manifest", str(pool_dir / "manifest.jsonl"), "--pairs-file", str(tmp_path / "pairs.jsonl"),
               "--k", "2", "--out", str(tmp_path / "given.jsonl")])
    rows = common.read_jsonl(tmp_path / "given.jsonl")
    assert [(r["a"], r["b"], r["p"]) for r in rows] == [("img3.png", "img0.png", 1.0), ("img1.png", "img5.png", 0.0)]
    common.write_jsonl_atomic(str(tmp_path / "pairs.jsonl"), [dict(a="img0.png", b="img1.png"),
                                                              dict(a="img0.png", b="nope.png")])
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: pair \('img0.png', 'nope.png'\): 'nope.png' is not in the manifest"):
        vote.main(["--manifest", str(pool_dir / "manifest.jsonl"), "--pairs-file", str(tmp_path / "pairs.jsonl"),
                   "--out", str(tmp_path / "v.jsonl")])


def test_rerun_with_other_arguments_refuses_to_mix(pool_dir, tmp_path, monkeypatch, cached_model):
    monkeypatch.setattr(common, "sample", brighter_stub)
    base = ["--manifest", str(pool_dir / "manifest.jsonl"), "--pairs", "4", "--k", "2",
            "--out", str(tmp_path / "v.jsonl")]
    vote.main(base)
    with pytest.raises(ValueError, match=r"came from other arguments \(--k 2 -> 4\)"):
        vote.main(base + ["--k", "4"])


def test_a_checkpoints_prompts_are_used_and_recorded_as_resolved(pool_dir, tmp_path, monkeypatch, cached_model, capsys):
    """Given a checkpoint with a prompts.json and no flags, the votes ask it that way; args.json records the prompts as
    resolved, so the same prompts spelled out on the command line resume the run, and another suffix refuses."""
    ckpt, out, asked = tmp_path / "ckpt", tmp_path / "v.jsonl", []
    ckpt.mkdir()
    common.save_prompts(str(ckpt), dict(common.PROMPTS, compare="<image><image> Which is better, A or B?",
                                        compare_labels=["A", "B"]), True)

    def stub(model, tokenizer, requests, *args, **kwargs):
        asked.extend(tokenizer.decode(ids) for ids, _ in requests)
        return brighter_stub(model, tokenizer, requests, *args, **kwargs)

    monkeypatch.setattr(common, "sample", stub)
    argv = ["--model", str(ckpt), "--manifest", str(pool_dir / "manifest.jsonl"), "--pairs", "4", "--k", "2",
            "--out", str(out)]
    vote.main(argv)
    assert len(asked) == 8 and all("Which is better, A or B? You FIRST think" in text for text in asked)
    assert f"prompts: the checkpoint's {ckpt}/prompts.json; reasoning suffix: on" in capsys.readouterr().out
    record = json.loads((tmp_path / "v.jsonl.args.json").read_text())
    assert record["prompts"]["compare_labels"] == ["A", "B"] and record["no_think"] is False
    vote.main(argv + ["--prompts", str(ckpt / "prompts.json"), "--think"])  # the same, spelled out: nothing to redo
    assert len(asked) == 8
    with pytest.raises(ValueError, match=r"came from other arguments \(--no-think False -> True\)"):
        vote.main(argv + ["--no-think"])


def test_each_batch_is_one_prefill_with_each_image_encoded_once(pool_dir, tmp_path, monkeypatch, cached_model):
    model = cached_model[0]
    prefills, encoded = [], []
    real_prefill, real_features = common.prefill, model.model.get_image_features
    monkeypatch.setattr(common, "prefill", lambda m, requests, *a, **kw: prefills.append(len(requests))
                        or real_prefill(m, requests, *a, **kw))
    monkeypatch.setattr(model.model, "get_image_features", lambda pixels, grid: encoded.append(len(grid))
                        or real_features(pixels, grid))
    vote.main(["--manifest", str(pool_dir / "manifest.jsonl"), "--pairs", "all", "--k", "6", "--max-new-tokens", "2",
               "--batch-pairs", "8", "--out", str(tmp_path / "v.jsonl")])
    assert prefills == [16, 14]  # 15 pairs in batches of 8 and 7, one request per order: not one per query
    rows = common.read_jsonl(tmp_path / "v.jsonl")
    distinct = [len({r[side] for r in rows[s:s + 8] for side in "ab"}) for s in (0, 8)]
    assert encoded == distinct  # each image encoded once per batch however many of its pairs it is in
