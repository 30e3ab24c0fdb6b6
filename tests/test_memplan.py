"""memplan.py's memory plan at a small width: the fit on 1-2 decoder layers and vision blocks predicts the measurement
with 3 of each, and torch's memory tracker sees exactly the shards the arithmetic says. Everything runs under
FakeTensorMode (shapes, no data): seconds of CPU, no memory."""
import math

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException

import bench
import memplan


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    # bench's `small` shape, 2 ranks: the tiny tokenizer's 663-token vocabulary is odd, so FSDP2's padding is in the
    # arithmetic; one pair, K=2, 4 new tokens, 56x56 images: the fewest operations that still run every phase
    spec = str(tmp_path_factory.mktemp("memplan") / "small")
    bench.write_shape("small", spec)
    a = memplan.parse_args(["--model", spec, "--world", "2", "--pairs", "1", "--k", "2", "--completion", "4",
                            "--micro-batch", "2", "--image-size", "56x56"])
    setting = memplan.make_setting(spec, a)
    with memplan.fake_ranks(2):
        return memplan.measure(spec, setting, log=lambda *_: None)


def test_memory_fit_on_one_and_two_layers_predicts_three(measured):
    _, check = memplan.fit_phases(measured, 2, *memplan.DEPTHS[-1])
    assert {c["phase"] for c in check} == {"rollouts, prefill", "rollouts, decode, one prompt copy (issue 12)",
                                           "rollouts, decode, prompt copied per row", "reference log-probs",
                                           "policy forward + backward"}
    for c in check:
        # issue 13's tolerance. The tightest here is the reference's forward (3.5%): FSDP holds a unit's gathered
        # weights until the next unit's gather, a step from 1 to 2 units that a per-layer fit reads as a slope; at the
        # real shapes that phase peaks at the logits instead (bench.py prints its error)
        assert c["error"] <= 0.05, c
    total = {d: m[0]["policy forward + backward"]["Total"] for d, m in measured.items()}
    assert total[(3, 3)] > total[(2, 1)] > total[(1, 1)]  # the fit has something to predict


def test_memory_tracker_sees_the_shard_arithmetic(measured):
    # at every measured depth: the policy's fp32 shards, AdamW's moments and step counts, FSDP2's padding
    assert all("Sharded Param" in m[0]["reference log-probs"] for m in measured.values())
    assert memplan.shards_agree(measured, 2)
    assert not memplan.shards_agree(measured, 3)  # the same shapes sharded 3 ways: other bytes


def test_shape_mode_keeps_bookkeeping_real_and_model_tensors_fake():
    with memplan.shape_mode():
        ids = torch.zeros(2, 5, dtype=torch.long)
        ids[0, 2:] = torch.tensor([7, 8, 9])
        assert ids.tolist() == [[0, 0, 7, 8, 9], [0, 0, 0, 0, 0]]  # data-dependent code can read it
        x = torch.nn.Linear(4, 3)(torch.randn(5, 4))
        with pytest.raises(DataDependentOutputException):
            x.tolist()  # the model's tensors have shapes only
        assert x.shape == (5, 3)


def test_lora_plan_counts_a_frozen_bf16_base_and_fp32_adapters(tmp_path):
    # train_grpo.py --lora 4 at one decoder layer and vision block on 2 fake ranks: torch's MemTracker refuses frozen
    # parameters unless memplan.Tracker stands in; what FSDPMemTracker sees must be the base's bf16 shards and the
    # adapters' fp32 ones with AdamW state for the adapters only, and there is no reference
    spec = str(tmp_path / "small")
    bench.write_shape("small", spec)
    a = memplan.parse_args(["--model", spec, "--world", "2", "--pairs", "1", "--k", "2", "--completion", "4",
                            "--micro-batch", "2", "--image-size", "56x56", "--lora", "4"])
    with memplan.fake_ranks(2):
        m = memplan.measure_depth(memplan.cut_checkpoint(spec, 1, 1, str(tmp_path / "cut")),
                                  memplan.make_setting(spec, a))
    peaks, params, ref_params, _ = m
    trainable = [(s, b) for s, b, t in params if t]
    assert ref_params == [] and all(p["Reference"] == 0 for p in peaks.values())
    assert len(trainable) == 2 * 7 and {b for _, b in trainable} == {4}  # A and B on the 7 linears of the layer
    assert all(s[-1] == 4 or s[0] == 4 for s, _ in trainable)  # rank 4
    assert {b for _, b, t in params if not t} == {2}  # the base in bf16, frozen
    assert memplan.shards_agree({(1, 1): m}, 2) and not memplan.shards_agree({(1, 1): m}, 3)
    # gradients for the adapters only: at most their full fp32 size (the base's would be 166 times it)
    adapters = 4 * sum(s[0] * s[1] for s, _ in trainable)
    assert 0 < peaks["policy forward + backward"]["Gradient"] <= adapters
    assert peaks["reference log-probs"]["Gradient"] == 0


def test_one_gpu_lora_is_a_plain_module_without_a_gathered_copy(tmp_path):
    # one process with LoRA keeps a plain module (policy.init_single_process): the rollouts run on the base as it
    # lies, where FSDP2 on a 1-rank group would hold a second copy of it (its gather of every unit) beside the shards
    spec = str(tmp_path / "small")
    bench.write_shape("small", spec)
    a = memplan.parse_args(["--model", spec, "--world", "1", "--pairs", "1", "--k", "2", "--completion", "4",
                            "--micro-batch", "2", "--image-size", "56x56", "--lora", "4"])
    setting, cut = memplan.make_setting(spec, a), memplan.cut_checkpoint(spec, 1, 1, str(tmp_path / "cut"))
    plain = memplan.measure_depth(cut, setting)
    with memplan.fake_ranks(1):
        fsdp = memplan.measure_depth(cut, setting)
    assert memplan.shards_agree({(1, 1): plain}, 1) and memplan.shards_agree({(1, 1): fsdp}, 1)
    base = sum(math.prod(s) * b for s, b, t in plain[1] if not t)
    key = ("rollouts", True)
    assert fsdp[0][key]["Total"] - plain[0][key]["Total"] >= base  # measured: the base and 61 KB
