"""The CPU demo (demo.sh, toy/): a run at the test scale (a minute) makes every file, a well-formed table and the
picture. The full demo's figures belong to the README, not to a test."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

import evaluate

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
    # a minute on 2 quiet cores; the timeout only guards against a hang (under heavy load it took 13 minutes)
    run = subprocess.run(["bash", os.path.join(ROOT, "demo.sh")], env=env, capture_output=True, text=True, timeout=2400)
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
        for name in ("report.json", "scores.jsonl", "compare.jsonl", "expected.jsonl"):
            assert os.path.isfile(os.path.join(out, "eval", model, name)), (model, name)
    with Image.open(os.path.join(out, "sheet.png")) as sheet:  # 2 crops x 5 types: rows of 112-pixel crops
        assert sheet.format == "PNG" and sheet.width > 6 * 112 and sheet.height > 10 * 112
        assert sheet.mode == "P"  # 256 colours: the README's copy stays small


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
        table = f.read()
    assert "Evolution on the held-out pool" in table
    for t in ("contrast_weaken_scale", "contrast_weaken_stretch", "noise_gaussian_rgb"):  # type names whole
        assert f"\n{t} " in table, t


def test_demo_control_shuffles_the_round1_labels(demo):
    out, _, _ = demo
    rows = [json.loads(line) for line in open(os.path.join(out, "round1", "votes.jsonl"))]
    ctrl = [json.loads(line) for line in open(os.path.join(out, "control", "votes.jsonl"))]
    assert [(r["a"], r["b"]) for r in rows] == [(r["a"], r["b"]) for r in ctrl]
    assert sorted(r["p"] for r in rows) == sorted(r["p"] for r in ctrl)


def test_demo_rerun_skips_finished_steps_and_keeps_the_first_wall_time(demo):
    out, _, env = demo
    with open(os.path.join(out, "report.json")) as f:
        first = json.load(f)
    run = subprocess.run(["bash", os.path.join(ROOT, "demo.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("done already") == len(STEPS)  # the background steps' lines are copied in at the end
    with open(os.path.join(out, "report.json")) as f:
        again = json.load(f)
    assert again["seconds_wall"] == first["seconds_wall"] > 0 and again["seconds"] == first["seconds"]
    assert again["models"] == first["models"]  # the expected scores read back from eval/<model>/expected.jsonl
    with open(os.path.join(out, "demo.log")) as f:  # the main line's output, both runs
        log = f.read()
    assert log.count("== demo.sh, DEMO_SCALE=test") == 2 and "== round 1 grpo: grpo" in log
    assert log.count("Evolution on the held-out pool") == 2


def test_demo_refuses_a_folder_made_with_other_settings(demo, tmp_path):
    out, _, env = demo
    log = os.path.getsize(os.path.join(out, "demo.log"))
    run = subprocess.run(["bash", os.path.join(ROOT, "demo.sh")], env=dict(env, DEMO_SCALE="full"),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and run.stdout == ""
    assert f"{out} was made with other settings ({out}/settings.txt); it has\n    scale=test\n" in run.stderr
    assert "  where this run has\n    scale=full\n" in run.stderr
    assert f"To start over: rm -rf {out} && DEMO_SCALE=full DEMO_OUT={out} bash demo.sh" in run.stderr
    assert os.path.getsize(os.path.join(out, "demo.log")) == log  # nothing touched
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "timings.tsv").write_text("prepare\t1.0\n")  # an older demo.sh's folder
    run = subprocess.run(["bash", os.path.join(ROOT, "demo.sh")], env=dict(env, DEMO_OUT=str(tmp_path / "old")),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "holds files but no settings.txt" in run.stderr


def test_demo_scales_have_their_own_default_folders(tmp_path):
    shutil.copy(os.path.join(ROOT, "demo.sh"), tmp_path)  # it runs where it lies: the folders land in tmp_path
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEMO_")}
    for scale, folder in ((None, "runs/demo"), ("test", "runs/demo-test")):
        run = subprocess.run(["bash", str(tmp_path / "demo.sh")], capture_output=True, text=True, timeout=60,
                             env=dict(env, PYTHON="false", **({"DEMO_SCALE": scale} if scale else {})))
        assert run.returncode != 0  # the first step fails at once
        assert f"== demo.sh, DEMO_SCALE={scale or 'full'}, in {folder}," in run.stdout
        with open(tmp_path / folder / "settings.txt") as f:
            assert f.readline() == f"scale={scale or 'full'}\n"


def test_demo_checkpoints_carry_their_prompts(demo):
    out, _, _ = demo
    with open(os.path.join(ROOT, "toy", "prompts.json")) as f:
        toy = json.load(f)
    for ckpt in ("base", "round1/final", "control/final", "round2/final"):
        with open(os.path.join(out, ckpt, "prompts.json")) as f:
            saved = json.load(f)
        assert saved["think"] is False and {k: saved[k] for k in toy} == toy, ckpt


def test_a_demo_checkpoint_evaluated_without_flags_asks_as_it_was_trained(demo, tmp_path, capsys):
    """evaluate.py on round1/final with no --prompts / --no-think gives the figures the demo got with them (without
    its prompts.json, the paper's prompts got 69% invalid answers and SRCC 0.03); a flag on the command line wins."""
    out, _, _ = demo
    argv = ["--model", os.path.join(out, "round1", "final"), "--data", f"heldout={out}/heldout.jsonl", "--samples", "2",
            "--temperature", "1.0", "--max-new-tokens", "2", "--batch-images", "64"]
    evaluate.main(argv + ["--out", str(tmp_path / "plain")])
    assert f"prompts: the checkpoint's {out}/round1/final/prompts.json; reasoning suffix: off, from the same file" \
        in capsys.readouterr().out
    ours, demos = (evaluate.read_jsonl(os.path.join(d, "scores.jsonl")) for d in (tmp_path / "plain", f"{out}/eval/round1"))
    assert [r["scores"] for r in ours] == [r["scores"] for r in demos]
    assert sum(r["score"] is not None for r in ours) > 90  # of 104: real answers, so the comparison can fail
    with open(tmp_path / "plain" / "report.json") as f, open(f"{out}/eval/round1/report.json") as g:
        assert json.load(f)["datasets"] == json.load(g)["datasets"]
    evaluate.main(argv + ["--think", "--limit", "4", "--out", str(tmp_path / "think")])
    with open(tmp_path / "think" / "run.json") as f:
        assert json.load(f)["prompt"].endswith(" You FIRST think about the reasoning process as an internal "
                                               "monologue and then provide the final answer. The reasoning process "
                                               "MUST BE enclosed within <think> </think> tags. The final answer MUST "
                                               "BE put in boxed{ }.")


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


def test_the_toy_scripts_end_in_one_line_without_the_demos_files(tmp_path, monkeypatch):
    """toy/report.py, toy/sheet.py and toy/ablation_report.py, run as scripts on a folder demo.sh has not filled: one
    line naming the missing file, not a traceback."""
    import runpy

    out = str(tmp_path / "nodemo")
    for script, missing in (("report", "heldout.jsonl"), ("sheet", "pool/heldout/manifest.jsonl"),
                            ("ablation_report", "heldout.jsonl"), ("sheet", "eval/*/expected.jsonl: none found")):
        if script == "sheet" and missing.startswith("eval"):  # a world, but no model evaluated yet
            os.makedirs(os.path.join(out, "pool", "heldout"))
            open(os.path.join(out, "pool", "heldout", "manifest.jsonl"), "w").close()
        monkeypatch.setattr(sys, "argv", [f"{script}.py", "--out", out] + (["--world", out] if script[0] == "a" else []))
        with pytest.raises(SystemExit) as e:
            runpy.run_path(os.path.join(ROOT, "toy", f"{script}.py"), run_name="__main__")
        assert str(e.value).startswith(f"{script}.py: error: {out}/{missing}"), e.value
        assert "\n" not in str(e.value)
