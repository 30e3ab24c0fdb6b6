"""bench.py's memory plan (--stage memory) at a small width: the fit on 1-2 decoder layers and vision blocks predicts
the measurement with 3 of each, and torch's memory tracker sees exactly the shards the arithmetic says. Everything
runs under FakeTensorMode (shapes, no data): tens of seconds of CPU, no memory."""
import contextlib
import io

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException

import bench


@pytest.fixture(scope="module")
def plan():
    # 2 ranks: the tiny tokenizer's 663-token vocabulary is odd, so FSDP2's padding is in the arithmetic
    with contextlib.redirect_stdout(io.StringIO()):
        return bench.main(["--stage", "memory", "--shape", "small", "--world", "2", "--pairs", "1", "--k", "2",
                           "--completion", "4", "--micro-batch", "2", "--image-size", "56x56"])["memory"]


def test_memory_fit_on_one_and_two_layers_predicts_three(plan):
    checked = {c["phase"] for c in plan["check"]}
    assert {"reference log-probs", "policy forward + backward"} <= checked
    assert any(phase.startswith("rollouts") for phase in checked)
    for c in plan["check"]:
        # issue 13's tolerance. The tightest here is the reference's forward (3.5%): FSDP holds a unit's gathered
        # weights until the next unit's gather, a step from 1 to 2 units that a per-layer fit reads as a slope; at the
        # real shapes that phase peaks at the logits instead (bench.py prints its error: 0.00%)
        assert c["error"] <= 0.05, c
    depths = {(d["layers"], d["blocks"]): d["phases"]["policy forward + backward"]["Total"] for d in plan["depths"]}
    assert depths[(3, 3)] > depths[(2, 1)] > depths[(1, 1)]  # the fit has something to predict


def test_memory_tracker_sees_the_shard_arithmetic(plan):
    # at every measured depth and phase: the policy's fp32 shards, AdamW's moments and step counts, FSDP2's padding
    assert plan["shards_agree"]


def test_shape_mode_keeps_bookkeeping_real_and_model_tensors_fake():
    with bench.shape_mode():
        ids = torch.zeros(2, 5, dtype=torch.long)
        ids[0, 2:] = torch.tensor([7, 8, 9])
        assert ids.tolist() == [[0, 0, 7, 8, 9], [0, 0, 0, 0, 0]]  # data-dependent code can read it
        x = torch.nn.Linear(4, 3)(torch.randn(5, 4))
        with pytest.raises(DataDependentOutputException):
            x.tolist()  # the model's tensors have shapes only
        assert x.shape == (5, 3)
