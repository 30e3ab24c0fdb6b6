"""A seconds-long smoke run of bench.py: every stage's code path on the tiny model. Speed targets live in
bench.py's output (README, Performance), never in tests."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_quick_runs_every_stage_and_ends_with_json(tmp_path):
    p = subprocess.run([sys.executable, "bench.py", "--shape", "tiny", "--quick"], cwd=ROOT, capture_output=True,
                       text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp_path)))
    assert p.returncode == 0, p.stderr[-3000:]
    assert not [f for f in os.listdir(tmp_path) if f.startswith("bench_")]  # its image folders are gone
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert {"vote", "grpo", "eval", "distort"} <= result.keys()
    assert result["vote"]["speedup"] > 0 and result["eval"]["speedup"] > 0
    grpo = result["grpo"]["x4"]
    assert grpo["plain"]["completion"] == grpo["shared"]["completion"] and grpo["shared"]["saved_mib"] > 0
    assert len(result["distort"]["per_type"]) == 35
