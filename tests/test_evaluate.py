import json
import os
import re

import numpy as np
import pytest
import scipy.stats
from PIL import Image

import evaluate

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")
PYIQA = os.path.join(SHARED, "pyiqa-meta")
BIQ = os.path.join(SHARED, "biq2021-mini")


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def make_images(dirpath, n, size=56):
    rng = np.random.default_rng(0)
    os.makedirs(dirpath, exist_ok=True)
    names = []
    for i in range(n):
        names.append(f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(os.path.join(dirpath, names[-1]))
    return names


def manifest(tmp_path, n):
    names = make_images(tmp_path / "images", n)
    return write(tmp_path / "set.jsonl", "".join(json.dumps({"image": f"images/{name}", "mos": 10.0 * i}) + "\n"
                                                 for i, name in enumerate(names)))


# --- metrics

def test_pearson_and_spearman_equal_scipy_with_ties():
    rng = np.random.default_rng(1)
    for _ in range(5):
        x = np.round(rng.normal(size=200), 1)  # rounding makes ties
        y = x + rng.normal(size=200)
        y[::7] = y[0]
        assert evaluate.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0], abs=1e-12)
        assert evaluate.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y)[0], abs=1e-12)


def test_logistic_fit_recovers_a_known_monotone_curve():
    rng = np.random.default_rng(2)
    true = np.array([80.0, 10.0, 3.0, 0.4])
    x = rng.uniform(1, 5, 400)
    y = evaluate.logistic4(x, *true) + rng.normal(0, 0.5, 400)
    params = evaluate.fit_logistic(x, y)
    params[3] = abs(params[3])
    assert np.allclose(params, true, rtol=0.05)
    out = evaluate.correlate(x, y, "logistic")
    assert out["plcc_method"] == "logistic" and out["plcc"] > 0.999
    assert out["plcc"] > evaluate.correlate(x, y, "raw")["plcc"]  # the mapping straightens the curve


def test_failed_logistic_fit_falls_back_to_raw_pearson_and_says_so(monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("Optimal parameters not found")
    monkeypatch.setattr(evaluate, "curve_fit", fail)
    x, y = np.arange(10.0), np.arange(10.0) ** 2
    out = evaluate.correlate(x, y, "logistic")
    assert out["plcc"] == pytest.approx(scipy.stats.pearsonr(x, y)[0])
    assert out["plcc_method"].startswith("raw (logistic fit failed: Optimal parameters not found")


def test_correlation_is_undefined_for_too_few_or_constant_scores():
    assert evaluate.correlate([1, 2], [1, 2])["plcc"] is None
    assert evaluate.correlate([3, 3, 3, 3], [1, 2, 3, 4])["srcc"] is None


# --- scoring

def test_image_score_is_the_mean_of_valid_scores_and_none_when_all_invalid():
    out = evaluate.aggregate(["<think>ok</think> \\boxed{4.00}", "no answer", "boxed{2}", "\\boxed{7}"])
    assert out["scores"] == [4.0, None, 2.0, None]
    assert out["score"] == 3.0 and out["std"] == 1.0
    assert evaluate.aggregate(["\\boxed{3.5}"]) == dict(scores=[3.5], score=3.5, std=None)
    assert evaluate.aggregate(["nothing", "\\boxed{}"])["score"] is None


# --- datasets

def test_no_reference_csv_matches_columns_case_insensitively_and_filters_split(tmp_path):
    make_images(tmp_path, 3)
    path = write(tmp_path / "spaq.csv", "Image name,MOS,Official_Split\nimg0.png,48.5,train\nimg1.png,62,test\n"
                                        "img2.png,20,TEST\nimg1.png,61,test\n")
    ds = evaluate.load_dataset("spaq", path, split="test")
    assert [(r["line"], r["image"], r["mos"]) for r in ds["rows"]] == [(3, "img1.png", 62.0), (4, "img2.png", 20.0),
                                                                      (5, "img1.png", 61.0)]  # a repeat stays a row
    assert ds["rows"][0]["path"] == os.path.join(str(tmp_path), "img1.png") and not ds["flipped"]
    with pytest.raises(ValueError, match=r"no rows of split 'val'.*\['TEST', 'test', 'train'\]"):
        evaluate.load_dataset("spaq", path, split="val")


def test_numeric_split_codes_are_pyiqa_train_val_test(tmp_path):
    make_images(tmp_path, 4)
    path = write(tmp_path / "koniq.csv", "img_name,mos,std,split\nimg0.png,70,1,0\nimg1.png,60,1,2\n"
                                         "img2.png,50,1,1\nimg3.png,40,1,2\n")
    assert [r["image"] for r in evaluate.load_dataset("k", path, split="test")["rows"]] == ["img1.png", "img3.png"]
    assert len(evaluate.load_dataset("k", path)["rows"]) == 4
    assert len(evaluate.load_dataset("k", path, split="test", limit=1)["rows"]) == 1


def test_full_reference_csv_scores_the_distorted_image_and_flips_dmos(tmp_path):
    make_images(tmp_path / "dst", 2)
    path = write(tmp_path / "csiq.csv", "ref_name,dist_name,DMOS\nref.png,img0.png,0.06\nref.png,img1.png,0.2\n")
    ds = evaluate.load_dataset("csiq", path, root=str(tmp_path / "dst"), split="test")
    assert ds["flipped"] and ds["score_column"] == "dmos"
    assert [(r["image"], r["mos"]) for r in ds["rows"]] == [("img0.png", -0.06), ("img1.png", -0.2)]
    assert "no split column" in ds["split"]


def test_jsonl_manifest_paths_are_relative_to_the_manifest(tmp_path):
    ds = evaluate.load_dataset("set", manifest(tmp_path, 3))
    assert [r["path"] for r in ds["rows"]] == [os.path.join(str(tmp_path), f"images/img{i}.png") for i in range(3)]
    assert [r["mos"] for r in ds["rows"]] == [0.0, 10.0, 20.0] and not ds["flipped"]


@pytest.mark.parametrize("name,text,error", [
    ("a.csv", "img_name,mos\nimg0.png,3\nimg1.png,high\n", r"a\.csv:3: mos 'high' is not a number"),
    ("b.csv", "img_name,mos\nimg0.png,3\n\nimg1.png\n", r"b\.csv:4: 1 fields, the header has 2"),
    ("c.csv", "name,quality\nimg0.png,3\n", r"c\.csv: header .* needs an image column"),
    ("d.jsonl", '{"image": "img0.png", "mos": 3}\n{"image": "img1.png"}\n', r"d\.jsonl:2: no 'mos' field"),
    ("f.csv", "img_name,mos\nimg0.png,3\nimg1.png,3,1\n", r"f\.csv:3: 3 fields, the header has 2"),  # decimal comma
    ("g.jsonl", '{"image": "img0.png", "mos": true}\n', r"g\.jsonl:1: mos True is not a number"),
    ("h.jsonl", '{"image": "img0.png", "mos": "3"}\n', r"h\.jsonl:1: mos '3' is not a number"),
    ("e.jsonl", '{"image": "img0.png", "mos": 3}\n{"image": \n', r"e\.jsonl:2: malformed JSON line"),
])
def test_a_malformed_row_fails_with_its_file_and_line(tmp_path, name, text, error):
    make_images(tmp_path, 2)
    with pytest.raises(ValueError, match=error):
        evaluate.load_dataset("x", write(tmp_path / name, text))


def test_missing_images_fail_listing_them_unless_skipped(tmp_path):
    make_images(tmp_path, 2)
    path = write(tmp_path / "l.csv", "img_name,mos\nimg0.png,1\ngone1.png,2\nimg1.png,3\ngone2.png,4\n")
    with pytest.raises(ValueError, match=r"2 of 4 image files are missing, e\.g\. \[.*gone1\.png.*gone2\.png"):
        evaluate.load_dataset("l", path)
    ds = evaluate.load_dataset("l", path, skip_missing=True)
    assert [r["image"] for r in ds["rows"]] == ["img0.png", "img1.png"] and ds["missing"] == 2


def test_unreadable_images_fail_at_load_unless_skipped_and_are_listed(tmp_path):
    make_images(tmp_path, 3)
    write(tmp_path / "img1.png", "not an image")
    labels = write(tmp_path / "l.csv", "img_name,mos\nimg0.png,1\nimg1.png,2\nimg2.png,4\n")
    with pytest.raises(ValueError, match=r"l: 1 of 3 image files cannot be read, e\.g\. \S*img1\.png: cannot read"):
        evaluate.load_dataset("l", labels)
    path = write(tmp_path / "m.csv", "img_name,mos\nimg0.png,1\nimg1.png,2\ngone.png,3\nimg2.png,4\n")
    ds = evaluate.load_dataset("l", path, skip_missing=True)
    assert [r["image"] for r in ds["rows"]] == ["img0.png", "img2.png"] and ds["missing"] == 1
    assert [(os.path.basename(s["path"]), s["reason"].split(": ")[-2:][0]) for s in ds["skipped"]] == [
        ("gone.png", "missing"), ("img1.png", "cannot read image")]


def test_an_image_that_fails_to_decode_is_skipped_counted_and_listed(tmp_path, capsys):
    """Its header reads (load_dataset's check passes), its pixels do not: --skip-missing skips it at scoring time."""
    data = manifest(tmp_path, 4)
    png = (tmp_path / "images" / "img2.png").read_bytes()
    (tmp_path / "images" / "img2.png").write_bytes(png[:len(png) // 3])
    argv = [f"set={data}", "--samples", "1", "--max-new-tokens", "1", "--out", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=r"img2\.png: cannot read image.*\(set, line 3\); pass --skip-missing"):
        evaluate.main(argv)
    evaluate.main(argv + ["--skip-missing"])
    rows = evaluate.read_jsonl(tmp_path / "out" / "scores.jsonl")
    assert [r["line"] for r in rows] == [1, 2, 3, 4] and "cannot read image" in rows[2]["unreadable"]
    assert rows[2]["scores"] == [] and all("unreadable" not in r and len(r["scores"]) == 1 for r in rows[:2] + rows[3:])
    d = json.loads((tmp_path / "out" / "report.json").read_text())["datasets"]["set"]
    assert (d["unreadable"], d["missing"], d["n"] + d["invalid"]) == (1, 0, 3)
    assert [s["path"] for s in d["skipped"]] == [str(tmp_path / "images" / "img2.png")]
    assert "set: skipped 0 missing and 1 unreadable image files: " in capsys.readouterr().out


@pytest.mark.parametrize("flags,message", [
    (["--limit", "-1"], "--limit must be positive, got -1"),  # dropped the last row
    (["--limit", "0"], "--limit must be positive, got 0"),
    (["--temperature", "-1"], "--temperature must be at least 0"),
    (["--top-p", "0"], r"--top-p must be in \(0, 1\]"),
    (["--top-k", "-3"], "--top-k must be at least 0"),
    (["--lower-better", "set", "--higher-better", "set"], r"both name \['set'\]"),
    (["--out", "DATA"], r"is also an input \(.*set\.jsonl\)"),
    (["--out", "DATA/run"], r"set\.jsonl is a file, not a folder"),
    (["--out", "/proc/eval"], "cannot write in /proc"),
])
def test_bad_flags_are_refused_before_any_work(tmp_path, flags, message, capsys):
    data = manifest(tmp_path, 2)
    with pytest.raises(SystemExit):
        evaluate.parse_args([f"set={data}"] + [f.replace("DATA", data) for f in flags])
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.skipif(not os.path.isdir(PYIQA), reason="../shared/data/pyiqa-meta is absent")
def test_every_real_pyiqa_label_file_loads_with_its_direction():
    lower = {"meta_info_CSIQDataset.csv", "meta_info_LIVEMDDataset.csv", "meta_info_LIVEIQADataset.csv"}
    # decided by content: the distortion level in the image names against the score (KADID-10k's 'dmos' is a MOS)
    by_content = {"meta_info_CSIQDataset.csv", "meta_info_KADID10kDataset.csv", "meta_info_LIVEMDDataset.csv",
                  "meta_info_TID2008Dataset.csv", "meta_info_TID2013Dataset.csv"}
    files = sorted(f for f in os.listdir(PYIQA) if f.endswith(".csv"))
    assert files
    for name in files:
        records, column, split_col = evaluate.read_csv_labels(os.path.join(PYIQA, name))
        assert len(records) > 100, name
        flipped, why = evaluate.score_direction(records, column)  # no file name goes in: a renamed copy is the same
        assert flipped == (name in lower), (name, why)
        assert why.startswith("content") == (name in by_content), (name, why)
        assert why.startswith("LIVE IQA's layout") == (name == "meta_info_LIVEIQADataset.csv"), (name, why)
    koniq, _, split_col = evaluate.read_csv_labels(os.path.join(PYIQA, "meta_info_KonIQ10kDataset.csv"))
    assert split_col == "split" and sum(evaluate.SPLIT_CODES.get(r[3]) == "test" for r in koniq) == 2015


def fr_csv(path, column, rising):
    """A full-reference label file, KADID-style names (<ref>_<type>_<level>): scores rise or fall with the level."""
    rows = [f"I{r:02d}.png,I{r:02d}_{t:02d}_{lv:02d}.png,{(lv if rising else 6 - lv) + 0.1 * r:.2f}"
            for r in range(1, 4) for t in range(1, 3) for lv in range(1, 6)]
    return write(path, f"ref_name,dist_name,{column}\n" + "\n".join(rows) + "\n")


def test_score_direction_comes_from_the_content_not_the_name(tmp_path):
    for column, rising, flipped in (("dmos", False, False), ("dmos", True, True), ("mos", True, True),
                                    ("mos", False, False)):
        records, col, _ = evaluate.read_csv_labels(fr_csv(tmp_path / "meta_info_KADID10kDataset.csv", column, rising))
        lower, why = evaluate.score_direction(records, col)
        assert lower == flipped and why.startswith(f"content: the scores {'rise' if rising else 'fall'}"), why
        assert evaluate.score_direction(records, col, override=not flipped) == (not flipped, "--lower-better"
                                                                                 if not flipped else "--higher-better")
    # LIVE IQA's layout decides where its names carry no level, whatever the file is called
    live = write(tmp_path / "renamed.csv", "ref_name,dist_name,mos\n" + "".join(
        f"refimgs/r{i}.bmp,{folder}/img{i}.bmp,{30 + i}\n" for i, folder in enumerate(["jp2k", "wn", "gblur"] * 9)))
    records, col, _ = evaluate.read_csv_labels(live)
    assert evaluate.score_direction(records, col)[0] is True
    # no evidence at all: the column name, and the reason says it is only that
    records, col, _ = evaluate.read_csv_labels(write(tmp_path / "nr.csv", "img_name,dmos\na.png,1\nb.png,2\n"))
    lower, why = evaluate.score_direction(records, col)
    assert lower and why.startswith("the column name 'dmos' alone (no distortion levels")


def test_direction_is_printed_per_dataset_and_the_flags_override_it(tmp_path, monkeypatch, capsys):
    make_images(tmp_path / "kadid", 30)
    kadid = fr_csv(tmp_path / "k.csv", "dmos", rising=False)  # a MOS in a 'dmos' column
    root = tmp_path / "kadid"
    for r in range(1, 4):  # the images the file names, as copies of the made ones
        for t in range(1, 3):
            for lv in range(1, 6):
                os.link(root / f"img{(r - 1) * 10 + (t - 1) * 5 + lv - 1}.png", root / f"I{r:02d}_{t:02d}_{lv:02d}.png")
    stub_scoring(monkeypatch, [])
    evaluate.main([f"kadid={kadid}", "--root", str(root), "--out", str(tmp_path / "o1")])
    out = capsys.readouterr().out
    assert "kadid: 30 images, 'dmos' is higher-is-better (content: the scores fall" in out
    report = json.loads((tmp_path / "o1" / "report.json").read_text())["datasets"]["kadid"]
    assert not report["flipped"] and report["direction"].startswith("content")
    evaluate.main([f"kadid={kadid}", "--root", str(root), "--lower-better", "kadid", "--out", str(tmp_path / "o2")])
    assert "kadid: 30 images, 'dmos' is lower-is-better (--lower-better): flipped to mos = -dmos" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"--lower-better / --higher-better name \['koniq'\], not datasets"):
        evaluate.main([f"kadid={kadid}", "--root", str(root), "--higher-better", "koniq", "--out", str(tmp_path / "o3")])


@pytest.mark.skipif(not os.path.isdir(BIQ), reason="../shared/data/biq2021-mini is absent")
def test_real_photos_with_mos_load():
    ds = evaluate.load_dataset("biq", os.path.join(BIQ, "labels.csv"), root=os.path.join(BIQ, "images"))
    assert len(ds["rows"]) == 300 and all(0 <= r["mos"] <= 1 for r in ds["rows"])


# --- the run: resume, merge, report (scoring stubbed), then the tiny model end to end

def stub_scoring(monkeypatch, calls):
    """score_batch without a model: each image gets two valid scores that follow its MOS, one invalid."""
    def score_batch(model, tokenizer, image_cfg, prompts, rows, args):
        calls.extend(r["line"] for r in rows)
        return [r | evaluate.aggregate([f"\\boxed{{{1 + r['mos'] / 20 + d:.2f}}}" for d in (0.0, 0.5)] + ["?"])
                for r in rows]
    monkeypatch.setattr(evaluate, "score_batch", score_batch)
    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: (None, None, None))


def test_resume_scores_only_unfinished_images_and_merges_in_order(tmp_path, monkeypatch, capsys):
    data, out = manifest(tmp_path, 6), tmp_path / "out"
    argv = [f"set={data}", "--out", str(out), "--batch-images", "2", "--samples", "3"]
    calls = []
    stub_scoring(monkeypatch, calls)
    evaluate.main(argv)
    rows = evaluate.read_jsonl(out / "scores.jsonl")
    assert calls == [1, 2, 3, 4, 5, 6] and [r["line"] for r in rows] == calls
    # a killed run: two rows merged, two in another rank's part file, two never written (one torn mid-line in
    # the part file this run appends to: the new rows must not glue onto it)
    evaluate.write_jsonl_atomic(out / "scores.jsonl", rows[:2])
    write(out / "scores.rank1.jsonl", "".join(json.dumps(r) + "\n" for r in rows[4:6]))
    write(out / "scores.rank0.jsonl", json.dumps(rows[2])[:30])
    calls.clear()
    evaluate.main(argv)
    assert sorted(calls) == [3, 4]
    assert evaluate.read_jsonl(out / "scores.jsonl") == rows
    assert sorted(os.listdir(out)) == ["report.json", "run.json", "scores.jsonl"]
    calls.clear()
    evaluate.main(argv)  # nothing left to do: no model, same report
    assert calls == [] and "6 already scored" in capsys.readouterr().out
    with pytest.raises(ValueError, match="other settings \\(samples\\)"):
        evaluate.main(argv[:-1] + ["4"])


def test_report_table_and_baseline_relative_change(tmp_path, monkeypatch, capsys):
    data, out = manifest(tmp_path, 6), tmp_path / "out"
    stub_scoring(monkeypatch, [])
    baseline = dict(datasets={"set": dict(plcc=0.5, srcc=0.8)}, wavg=dict(plcc=0.5, srcc=0.8))
    write(tmp_path / "base.json", json.dumps(baseline))
    evaluate.main([f"set={data}", "--out", str(out), "--plcc", "raw", "--baseline", str(tmp_path / "base.json")])
    report = json.loads((out / "report.json").read_text())
    d = report["datasets"]["set"]
    assert (d["n"], d["invalid"], d["plcc_method"]) == (6, 0, "raw")
    assert d["plcc"] == pytest.approx(1.0) and d["srcc"] == pytest.approx(1.0) and d["spread"] == pytest.approx(0.25)
    assert report["wavg"]["plcc"] == pytest.approx(1.0)
    assert report["baseline"]["set"]["plcc"] == pytest.approx(100.0)  # 1.0 over 0.5
    assert report["baseline"]["WAVG"]["srcc"] == pytest.approx(25.0)  # 1.0 over 0.8
    printed = capsys.readouterr().out
    assert "1.000 (+100.0%)" in printed and "1.000 (+25.0%)" in printed and "raw Pearson" in printed
    assert json.loads(printed.strip().splitlines()[-1])["set"]["n"] == 6


def test_baseline_near_zero_gives_no_relative_change(tmp_path, monkeypatch, capsys):
    """A relative change against |baseline| < 0.05 is noise blown up (0.0001 -> +251757%): n/a, in the table too."""
    data, out = manifest(tmp_path, 6), tmp_path / "out"
    stub_scoring(monkeypatch, [])
    baseline = dict(datasets={"set": dict(plcc=0.05, srcc=-0.0004)}, wavg=dict(plcc=0.5, srcc=0.049))
    write(tmp_path / "base.json", json.dumps(baseline))
    evaluate.main([f"set={data}", "--out", str(out), "--plcc", "raw", "--baseline", str(tmp_path / "base.json")])
    report = json.loads((out / "report.json").read_text())
    assert report["baseline"]["set"] == dict(plcc=pytest.approx(1900.0), srcc=None)  # 1.0 over 0.05: still one
    assert report["baseline"]["WAVG"] == dict(plcc=pytest.approx(100.0), srcc=None)
    table = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert table["set"].split()[2:6] == ["1.000", "(+1900.0%)", "1.000", "(n/a)"]
    assert table["WAVG"].split()[2:6] == ["1.000", "(+100.0%)", "1.000", "(n/a)"]
    assert "n/a: no figure, or |baseline| < 0.05" in table["PLCC"]


def test_datasets_are_named_after_their_file_and_roots_go_by_name(tmp_path, monkeypatch, capsys):
    first = manifest(tmp_path / "a", 3)
    make_images(tmp_path / "elsewhere", 3)
    second = write(tmp_path / "b.csv", "img_name,dmos\nimg0.png,3\nimg1.png,2\nimg2.png,1\n")
    stub_scoring(monkeypatch, [])
    evaluate.main([first, "--data", f"b={second}", "--root", f"b={tmp_path / 'elsewhere'}",
                   "--out", str(tmp_path / "o")])
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert list(report["datasets"]) == ["set", "b"] and report["wavg"]["n"] == 6
    assert report["datasets"]["set"]["plcc_method"].startswith("raw (logistic fit failed")  # 3 points, 4 parameters
    assert report["datasets"]["b"]["flipped"] and report["datasets"]["b"]["srcc"] == pytest.approx(1.0)
    assert "b: 'dmos' is lower-is-better" in capsys.readouterr().out
    with pytest.raises(ValueError, match="match"):
        evaluate.main([first, "--root", f"c={tmp_path}", "--out", str(tmp_path / "o")])


def test_tiny_model_end_to_end_is_batching_independent(answering, tmp_path):
    """The toy base model (tests/conftest.py) answers a digit 1-5 (the built-in tiny model's answers were all invalid,
    so this compared None with None): real scores, whose mean, report and batch independence can fail."""
    data = str(answering["pool"] / "manifest.jsonl")  # 12 images, mos = 5 - level
    texts = []
    for batch in ("5", "12"):
        out = tmp_path / f"out{batch}"
        evaluate.main([f"set={data}", "--model", answering["model"], "--prompts", answering["prompts"], "--no-think",
                       "--samples", "4", "--max-new-tokens", "3", "--save-text", "--batch-images", batch,
                       "--out", str(out)])
        rows = evaluate.read_jsonl(out / "scores.jsonl")
        assert [r["line"] for r in rows] == list(range(1, 13))
        for r in rows:  # the image's score is the mean of its valid parsed scores, or None
            assert r["scores"] == [evaluate.parse_score(t) for t in r["texts"]] and len(r["scores"]) == 4
            valid = [s for s in r["scores"] if s is not None]
            assert r["score"] == (np.mean(valid) if valid else None)
        assert sum(s is not None for r in rows for s in r["scores"]) >= 0.75 * 48  # measured 90%: real answers
        report = json.loads((out / "report.json").read_text())["datasets"]["set"]
        scored = [r for r in rows if r["score"] is not None]
        assert report["invalid"] == 12 - len(scored) and report["n"] == len(scored) >= 10
        assert report["srcc"] == pytest.approx(evaluate.spearman([r["score"] for r in scored],
                                                                 [r["mos"] for r in scored]))
        texts.append([r["texts"] for r in rows])
    assert texts[0] == texts[1]  # per-image seeds: the samples do not depend on the batch


def test_two_torchrun_ranks_write_the_same_file_as_one_process(tmp_path):
    import subprocess
    import sys
    data, root = manifest(tmp_path, 5), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    flags = [f"set={data}", "--samples", "2", "--max-new-tokens", "8", "--save-text"]
    evaluate.main(flags + ["--out", str(tmp_path / "one")])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "evaluate.py", *flags, "--batch-images", "2", "--out", str(tmp_path / "two")],
                   cwd=root, env=env, check=True, capture_output=True, timeout=120)
    assert sorted(os.listdir(tmp_path / "two")) == ["report.json", "run.json", "scores.jsonl"]
    assert (tmp_path / "one" / "scores.jsonl").read_text() == (tmp_path / "two" / "scores.jsonl").read_text()
