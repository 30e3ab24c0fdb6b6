"""The CPU demo (demo.sh, toy/): a seconds-long run makes every file and a well-formed table. The full demo's
figures belong to the README, not to a test."""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "toy"))
import report  # noqa: E402  (toy/report.py)

MODELS = ("base", "round1", "control", "round2")
STEPS = ["prepare", "eval base", "round 1 votes", "round 1 grpo", "eval round 1", "control labels", "control grpo",
         "eval control", "round 2 votes", "round 2 grpo", "eval round 2"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo"))
    env = dict(os.environ, DEMO_SCALE="test", DEMO_OUT=out, PYTHON=sys.executable)
    run = subprocess.run(["bash", os.path.join(ROOT, "demo.sh")], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out, run.stdout, env


def test_demo_writes_every_stage_output(demo):
    out, _, _ = demo
    for path in ["base/config.json", "base/preprocessor_config.json", "heldout.jsonl", "base.json",
                 "pool/train/manifest.jsonl", "pool/heldout/manifest.jsonl", "round1/votes.jsonl",
                 "control/votes.jsonl", "round2/votes.jsonl", "report.md", "report.json", "timings.tsv"]:
        assert os.path.isfile(os.path.join(out, path)), path
    for run in ("round1", "control", "round2"):
        assert os.path.isfile(os.path.join(out, run, "final", "config.json")), run
        assert os.path.isfile(os.path.join(out, run, "metrics.jsonl")), run
    for model in MODELS:
        for name in ("report.json", "scores.jsonl", "compare.jsonl"):
            assert os.path.isfile(os.path.join(out, "eval", model, name)), (model, name)


def test_demo_prints_the_table_and_a_json_line(demo):
    out, stdout, _ = demo
    assert "Self-consistency" in stdout and "Evolution on the held-out pool" in stdout
    for name in ("base", "round 1", "control: random labels", "round 2"):
        assert any(line.startswith(name) for line in stdout.splitlines()), name
    last = json.loads(stdout.strip().splitlines()[-1])
    assert set(last) >= {"gain_round1", "gain_control", "seconds", "seconds_wall"} | {f"srcc_{m}" for m in MODELS}
    assert 0 < last["seconds_wall"]
    with open(os.path.join(out, "report.json")) as f:
        res = json.load(f)
    assert list(res["models"]) == list(MODELS)
    assert set(res["votes"]) == {"round1", "round2"}
    for v in res["votes"].values():
        assert 0 <= v["single"] <= 1 and 0 <= v["majority"] <= 1 and v["k"] == 4 and v["pairs"] > 0
    for m in res["models"].values():
        assert m["n"] + m["invalid"] == 104  # 4 held-out photographs x 1 crop x (1 + 5 types x 5 levels)
        assert 0 <= m["compare"]["argmax"] <= 1
    assert sorted(res["seconds"]) == sorted(STEPS)  # the background steps interleave with the others
    with open(os.path.join(out, "report.md")) as f:
        assert "Evolution on the held-out pool" in f.read()


def test_demo_control_shuffles_the_round1_labels(demo):
    out, _, _ = demo
    rows = [json.loads(line) for line in open(os.path.join(out, "round1", "votes.jsonl"))]
    ctrl = [json.loads(line) for line in open(os.path.join(out, "control", "votes.jsonl"))]
    assert [(r["a"], r["b"]) for r in rows] == [(r["a"], r["b"]) for r in ctrl]
    assert sorted(r["p"] for r in rows) == sorted(r["p"] for r in ctrl)


def test_demo_rerun_skips_finished_steps(demo):
    out, _, env = demo
    run = subprocess.run(["bash", os.path.join(ROOT, "demo.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("done already") == len(STEPS)  # the background steps' lines are copied in at the end


def test_demo_stops_when_the_background_steps_fail(demo, tmp_path):
    """A failure beside the main line (here: the control's votes are unreadable) fails the demo and says where."""
    out, _, env = demo
    copy = tmp_path / "demo"
    shutil.copytree(out, copy, symlinks=True)
    for path in ("control", "eval/control"):
        shutil.rmtree(copy / path)
    (copy / "round1" / "votes.jsonl").write_text("{not json\n")
    run = subprocess.run(["bash", os.path.join(ROOT, "demo.sh")], env=dict(env, DEMO_OUT=str(copy)),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "eval base / control failed" in run.stderr and os.path.isfile(copy / "side.log")


def test_vote_accuracy_counts_votes_ties_and_argmax(tmp_path):
    rows = [  # a better (level 1 < 3): 3 of 4 votes right, majority right; argmax right in both orders
        dict(a="x", b="y", wins_a=3, wins_b=1, invalid=0, k=4, p=1.0, ref_a="r", ref_b="r", distortion_a="blur",
             distortion_b="blur", level_a=1, level_b=3, probs=dict(ab=[0.7, 0.3], ba=[0.4, 0.6])),
        # b better (the original): a tie; argmax wrong in the first order
        dict(a="z", b="o", wins_a=2, wins_b=2, invalid=0, k=4, p=0.5, ref_a="r", ref_b="r", distortion_a="blur",
             distortion_b=None, level_a=2, level_b=0, probs=dict(ab=[0.6, 0.4], ba=[0.9, 0.1])),
        # another crop: no ground truth, left out
        dict(a="x", b="w", wins_a=4, wins_b=0, invalid=0, k=4, p=1.0, ref_a="r", ref_b="s", distortion_a="blur",
             distortion_b="blur", level_a=1, level_b=2),
    ]
    path = tmp_path / "votes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    acc = report.vote_accuracy(str(path))
    assert acc["pairs"] == 2 and acc["k"] == 4
    assert acc["single"] == pytest.approx(5 / 8)
    assert acc["majority"] == pytest.approx(0.5) and acc["ties"] == pytest.approx(0.5)
    assert acc["argmax"] == pytest.approx(3 / 4)
