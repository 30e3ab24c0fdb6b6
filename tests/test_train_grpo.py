import functools
import inspect
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import common
import policy
import train_grpo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """2 shared cores: one intra-op thread is faster for the tiny model and leaves a core to others."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def phi(t):
    return 0.5 * (1 + math.erf(t / math.sqrt(2)))


def write_labels(d, n_pairs=4, ps=(1.0, 0.0, 0.5, 1.0)):
    rng = np.random.default_rng(0)
    for i in range(2 * n_pairs):
        Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(d / f"img{i}.png")
    rows = [dict(i=j, a=f"img{2 * j}.png", b=f"img{2 * j + 1}.png", wins_a=3, wins_b=1, invalid=0, k=4, p=ps[j % len(ps)])
            for j in range(n_pairs)]
    (d / "votes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "votes.jsonl"


def vowel_reward(texts, partners, gamma):
    """A text reward the tiny (random) model can move: the share of vowels; every rollout counts as valid."""
    r = {x: np.array([sum(ch in "aeiou" for ch in t) / max(len(t), 1) for t in ts]) for x, ts in texts.items()}
    return r, {x: [3.0] * len(ts) for x, ts in texts.items()}


# the CLI runs in a subprocess (torchrun for 2 ranks) with the reward replaced the same way
PATCH = f"""
import sys
sys.path.insert(0, {ROOT!r})
import numpy as np
import train_grpo

{inspect.getsource(vowel_reward)}
train_grpo.rollout_rewards = vowel_reward
train_grpo.main()
"""


# -----------------------------------------------------------------------------
# reward (Eq. 2-3) and advantage (Eq. 4) against values computed by hand


def test_fidelity_rewards_by_hand():
    g = 1e-6
    scores = {"x": [3.0, 4.0, None, 2.0], "y": [3.0, 3.0, 5.0, None], "z": [None, 2.5, None, None],
              "w": [None] * 4, "v": [3.0, 3.5, None, 4.0]}
    partners = {"x": [("y", 1.0), ("z", 0.5)], "y": [("x", 0.0), ("w", 1.0)], "z": [("x", 0.5)],
                "w": [("y", 0.0)], "v": [("w", 1.0)]}
    r = train_grpo.fidelity_rewards(scores, partners, g)
    var_x, mu_y, var_y = 2 / 3, 11 / 3, 8 / 9  # valid scores only; population variance
    fx = []
    for q in (3.0, 4.0, 2.0):
        f_y = math.sqrt(phi((q - mu_y) / math.sqrt(var_x + var_y + g)))  # p* = 1
        pz = phi((q - 2.5) / math.sqrt(var_x + 0 + g))  # z has one valid score: variance 0; p* = 0.5 (tie)
        f_z = math.sqrt(0.5 * pz) + math.sqrt(0.5 * (1 - pz))
        fx.append((f_y + f_z) / 2)
    np.testing.assert_allclose(r["x"], [fx[0], fx[1], 0.0, fx[2]], atol=1e-12)  # invalid rollout: reward 0
    # y's partner w has no valid score and is skipped: the mean is over x alone (p* = 0)
    fy = [math.sqrt(1 - phi((q - 3.0) / math.sqrt(var_y + var_x + g))) for q in (3.0, 3.0, 5.0)]
    np.testing.assert_allclose(r["y"], fy + [0.0], atol=1e-12)
    # z: its own single valid score has variance 0
    pz = phi((2.5 - 3.0) / math.sqrt(0 + var_x + g))
    np.testing.assert_allclose(r["z"], [0, math.sqrt(0.5 * pz) + math.sqrt(0.5 * (1 - pz)), 0, 0], atol=1e-12)
    np.testing.assert_array_equal(r["w"], 0.0)  # no valid score of its own
    np.testing.assert_array_equal(r["v"], 0.0)  # every partner skipped
    np.testing.assert_array_equal(train_grpo.advantages(r["v"]), 0.0)


def test_partners_swap_the_preference():
    pairs = [dict(a="x", b="y", p=1.0), dict(a="x", b="z", p=0.5)]
    assert train_grpo.partners_of(pairs) == {"x": [("y", 1.0), ("z", 0.5)], "y": [("x", 0.0)], "z": [("x", 0.5)]}


def test_advantages_by_hand():
    r = [1.0, 2.0, 3.0, 0.0]  # the 0 is an invalid rollout: part of the group
    np.testing.assert_allclose(train_grpo.advantages(r), (np.array(r) - 1.5) / math.sqrt(1.25))
    for flat in ([0.7] * 4, [0.0] * 4, [0.1 + 0.2] * 3):
        a = train_grpo.advantages(flat)
        assert np.all(a == 0) and not np.isnan(a).any()


def test_groups_stay_whole_and_ranks_split_the_global_batch(tmp_path):
    write_labels(tmp_path, n_pairs=6)
    rows = [dict(a=f"img{i}.png", b=f"img{j}.png", p=1, ref_a=r, ref_b=r)
            for i, j, r in ((0, 1, "r0"), (0, 2, "r0"), (1, 2, "r0"), (3, 4, "r1"), (5, 6, "r2"), (6, 7, "r2"))]
    rows.append(dict(a="img8.png", b="img9.png", p=0.5))  # no reference: a group of its own
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    units = train_grpo.make_units(train_grpo.load_labels([str(tmp_path / "g.jsonl")]), by_groups=True)
    assert sorted(map(len, units)) == [1, 1, 2, 3]
    for step in range(2):
        one = train_grpo.step_pairs(units, 2, 1, 0, seed=0, step=step)
        two = [train_grpo.step_pairs(units, 1, 2, r, seed=0, step=step) for r in range(2)]
        assert sorted(map(id, one)) == sorted(id(p) for share in two for p in share)
        for share in two:  # a rank gets whole groups
            assert len({p["group"] for p in share}) == 1


def test_group_by_reference_and_type_puts_the_original_with_its_partners_type(tmp_path):
    write_labels(tmp_path, n_pairs=6)
    pair = lambda i, j, ta, tb, ref="r0": dict(a=f"img{i}.png", b=f"img{j}.png", p=1, ref_a=ref, ref_b=ref,
                                               distortion_a=ta, distortion_b=tb)
    rows = [pair(0, 1, None, "blur"), pair(1, 2, "blur", "blur"), pair(0, 3, None, "noise"), pair(3, 4, "noise", None),
            pair(1, 3, "blur", "noise"), pair(5, 6, "blur", "blur", ref="r1"), pair(0, 7, None, None)]
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = str(tmp_path / "g.jsonl")
    groups = [p["group"][1:] for p in train_grpo.load_labels([path], group_by=["ref", "distortion"])]
    assert groups[:4] == [("r0", "blur"), ("r0", "blur"), ("r0", "noise"), ("r0", "noise")]
    assert groups[4] == (5,)  # two types: a group of its own (its row number)
    assert groups[5:] == [("r1", "blur"), ("r0", None)]
    units = train_grpo.make_units(train_grpo.load_labels([path], group_by=["ref", "distortion"]), by_groups=True)
    assert sorted(map(len, units)) == [1, 1, 1, 2, 2]
    # the default: one group per reference, as before
    assert sorted(map(len, train_grpo.make_units(train_grpo.load_labels([path]), by_groups=True))) == [1, 6]


# -----------------------------------------------------------------------------
# log-probs and the loss


@pytest.fixture(scope="module")
def tiny():
    return common.load_model("tiny", "cpu", "float32")


def test_completion_logprobs_match_transformers_positions(tiny):
    model, tok, cfg = tiny
    rng = np.random.default_rng(1)
    images = {k: common.preprocess_image(Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)), cfg)
              for k, (h, w) in {"sq": (56, 56), "wide": (56, 112)}.items()}
    prompts = common.load_prompts()
    rows = [(common.encode_prompt(tok, prompts, "score", [images[k][1]]), k, comp)
            for k, comp in (("sq", [10, 11, 12, 13, 14]), ("wide", [20, 21]))]
    with torch.no_grad():
        logp, mask = policy.completion_logprobs(model, rows, images, temperature=0.7)
        for b, (prompt, key, comp) in enumerate(rows):
            ids = torch.tensor([prompt + comp])
            # transformers computes the 3-D positions itself when given mm_token_type_ids
            ref = model(input_ids=ids, pixel_values=images[key][0], image_grid_thw=torch.tensor([images[key][1]]),
                        mm_token_type_ids=(ids == model.config.image_token_id).int()).logits[0]
            want = torch.log_softmax(ref / 0.7, -1)[len(prompt) - 1:-1].gather(1, torch.tensor(comp)[:, None])[:, 0]
            torch.testing.assert_close(logp[b, :len(comp)], want, atol=1e-5, rtol=0)
            assert mask[b].sum() == len(comp) and logp[b, len(comp):].abs().sum() == 0


def test_grpo_loss_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    old = torch.log(torch.tensor([[0.25, 0.5], [0.25, 0.5]]))  # token 0: ratio 2
    ref = logp + torch.tensor([[0.0, 0.0], [math.log(2), 0.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    loss, kl, clip = train_grpo.grpo_loss(logp, old, ref, torch.tensor([1.0, -1.0]), mask, clip_eps=0.2, beta=0.1)
    k3 = 2 - math.log(2) - 1
    # row 0: only token 0 counts, min(2 * 1, 1.2 * 1) = 1.2; row 1: min(-2, -1.2) = -2 then ratio 1 -> -1
    want = -1.2 + ((2 + 0.1 * k3) + 1) / 2
    assert loss.item() == pytest.approx(want, abs=1e-6)
    torch.testing.assert_close(kl, torch.tensor([0.0, k3 / 2]))
    torch.testing.assert_close(clip, torch.tensor([1.0, 0.5]))


def _logp(model, rows, images):
    with torch.no_grad():
        lp, mask = policy.completion_logprobs(model, rows, images, 1.0)
    return (lp.sum(1) / mask.sum(1)).tolist()


def _setup_rows(tiny):
    model, tok, cfg = tiny
    img = Image.fromarray(np.random.default_rng(2).integers(0, 255, (56, 56, 3), dtype=np.uint8))
    images = {"a": common.preprocess_image(img, cfg)}
    prompt = common.encode_prompt(tok, common.load_prompts(), "score", [images["a"][1]])
    return [(prompt, "a", [30, 31, 32]), (prompt, "a", [40, 41])], images


def test_one_step_raises_positive_and_lowers_negative_advantage(tiny):
    rows, images = _setup_rows(tiny)
    model, _, _ = common.load_model("tiny", "cpu", "float32")
    before = _logp(model, rows, images)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    logp, mask = policy.completion_logprobs(model, rows, images, 1.0)
    loss, _, _ = train_grpo.grpo_loss(logp, logp.detach(), logp.detach(), torch.tensor([1.0, -1.0]), mask, 0.2, 0.05)
    (loss / 2).backward()
    opt.step()
    after = _logp(model, rows, images)
    assert after[0] > before[0] + 1e-3 and after[1] < before[1] - 1e-3


def test_kl_pulls_a_drifted_policy_back(tiny):
    rows, images = _setup_rows(tiny)
    ref = tiny[0]
    model, _, _ = common.load_model("tiny", "cpu", "float32")
    with torch.no_grad():
        model.lm_head.weight.add_(0.1 * torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(0)))
    ref_lp, _ = policy.completion_logprobs(ref, rows, images, 1.0)
    ref_lp = ref_lp.detach()

    def kl():
        lp, mask = policy.completion_logprobs(model, rows, images, 1.0)
        return train_grpo.grpo_loss(lp, lp.detach(), ref_lp, torch.zeros(2), mask, 0.2, 0.05)

    before = kl()[1].sum().item()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    kl()[0].backward()  # zero advantages: only the beta * KL term moves the weights
    opt.step()
    after = kl()[1].sum().item()
    assert before > 0.01 and after < 0.9 * before, (before, after)


# -----------------------------------------------------------------------------
# the shared-prefix path equals the plain path (the oracle), float32


def _prefix_rows(tok, cfg):
    """2 images of different sizes (prompts of 2 lengths), K=3 completions each of lengths 7, 1 and 4, one ending
    on a sampled <|image_pad|> (train_grpo cuts a completion there), and per-token loss weights."""
    rng = np.random.default_rng(1)
    images = {k: common.preprocess_image(Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)), cfg)
              for k, (h, w) in {"sq": (56, 56), "wide": (56, 112)}.items()}
    g = torch.Generator().manual_seed(0)
    img_tok = tok.convert_tokens_to_ids("<|image_pad|>")
    rows = []
    for k in ("sq", "wide"):
        prompt = common.encode_prompt(tok, common.load_prompts(), "score", [images[k][1]])
        for n in (7, 1, 4):
            rows.append((prompt, k, torch.randint(0, 256, (n,), generator=g).tolist()))
    rows[5] = (rows[5][0], rows[5][1], rows[5][2][:3] + [img_tok])
    return rows, images, torch.randn(len(rows), 7, generator=g)


def _logp_and_grads(model, fn, rows, images, w):
    model.zero_grad(set_to_none=True)
    lp, mask = fn(model, rows, images, 0.7)
    (lp * w).sum().backward()
    return lp.detach(), mask, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(plain, shared):
    """log-probs within 1e-5 (they span -17..0; measured 7.6e-6), every parameter's gradient within 1e-5 of its
    norm (measured 1.7e-6, vision tower included)."""
    torch.testing.assert_close(shared[0], plain[0], atol=1e-5, rtol=1e-6)
    assert torch.equal(shared[1], plain[1])
    assert shared[2].keys() == plain[2].keys() and len(plain[2]) == 57  # every parameter gets a gradient
    for n, g in plain[2].items():
        assert (shared[2][n] - g).norm() <= 1e-5 * g.norm(), n


def test_shared_prefix_matches_plain_path(tiny):
    model, tok, cfg = common.load_model("tiny", "cpu", "float32")
    rows, images, w = _prefix_rows(tok, cfg)
    plain = _logp_and_grads(model, policy.completion_logprobs, rows, images, w)
    _assert_same(plain, _logp_and_grads(model, policy.shared_prefix_logprobs, rows, images, w))
    # one image's rows alone (one prompt, no prompt padding), and rows interleaving the images
    for order in ([0, 1, 2], [3, 0, 4, 1]):
        sub = [rows[i] for i in order]
        _assert_same(_logp_and_grads(model, policy.completion_logprobs, sub, images, w[order]),
                     _logp_and_grads(model, policy.shared_prefix_logprobs, sub, images, w[order]))


def test_shared_prefix_matches_plain_path_under_checkpointing(tiny):
    model, tok, cfg = common.load_model("tiny", "cpu", "float32")
    rows, images, w = _prefix_rows(tok, cfg)
    plain = _logp_and_grads(model, policy.completion_logprobs, rows, images, w)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # checkpointing only acts in training mode
    calls, layer = [], model.model.language_model.layers[0]
    func = layer._gradient_checkpointing_func  # partial(checkpoint, use_reentrant=False): count its calls
    layer._gradient_checkpointing_func = functools.partial(lambda *a, **k: calls.append(1) or func.func(*a, **k),
                                                           **func.keywords)
    _assert_same(plain, _logp_and_grads(model, policy.shared_prefix_logprobs, rows, images, w))
    assert len(calls) == 2  # the layer was checkpointed in both forwards
    # reentrant checkpointing would run the prompt forward without a graph: wrong gradients, silently
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="use_reentrant=False"):
        policy.shared_prefix_logprobs(model, rows, images, 0.7)


FSDP_GRADS = f"""
import json, sys
sys.path.insert(0, {ROOT!r})
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import torch
import common, policy, train_grpo
from test_train_grpo import _prefix_rows

rank, world, device = common.dist_setup()
model, _, tok, cfg, _ = policy.load("tiny", device, grad_checkpointing=True)
rows, images, w = _prefix_rows(tok, cfg)
mine = [i for i, r in enumerate(rows) if r[1] == ("sq", "wide")[rank]]  # a rank per image: prompt lengths differ
lp, _ = policy.shared_prefix_logprobs(model, [rows[i] for i in mine], images, 0.7)
(lp * w[mine]).sum().backward()  # FSDP averages the ranks' gradients
grads = {{n: p.grad.full_tensor() for n, p in model.named_parameters()}}
if rank == 0:
    plain = common.load_model("tiny", "cpu", "float32")[0]
    lp, _ = policy.completion_logprobs(plain, rows, images, 0.7)
    ((lp * w).sum() / world).backward()
    err = {{n: ((grads[n] - p.grad).norm() / p.grad.norm()).item() for n, p in plain.named_parameters()}}
    print("RESULT", json.dumps(dict(max_rel=max(err.values()), worst=max(err, key=err.get), n=len(err))))
common.dist_exit()
"""


def test_shared_prefix_gradients_under_fsdp(tmp_path):
    """2 gloo ranks, FSDP2 per layer, activation checkpointing on: the sharded shared-prefix gradients (each rank
    one image's rows) against the plain path's on one process over all rows."""
    script = tmp_path / "fsdp_grads.py"
    script.write_text(FSDP_GRADS)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
                       env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout.split("RESULT ")[1])
    assert result["n"] == 57 and result["max_rel"] < 1e-5, result  # measured 3.4e-6


# -----------------------------------------------------------------------------
# bad input fails before any training


@pytest.mark.parametrize("case,message", [
    ("missing", "image 'b' not found"),
    ("corrupt", r"votes\.jsonl:5: image 'b': .*bad\.png: cannot read image"),  # failed when its pair was drawn
    ("malformed", "malformed JSON line"),
    ("p", "p must be 0, 0.5 or 1"),
    ("no p", r"votes\.jsonl:5: no label 'p'"),
    ("k", "--k must be at least 2"),
])
def test_bad_input_is_a_clear_error(tmp_path, case, message):
    labels = write_labels(tmp_path)
    text = labels.read_text()
    if case == "missing":
        labels.write_text(text + json.dumps(dict(a="img0.png", b="nope.png", p=1)) + "\n")
    elif case == "corrupt":
        (tmp_path / "bad.png").write_bytes((tmp_path / "img0.png").read_bytes()[:20])  # its header cut
        labels.write_text(text + json.dumps(dict(a="img0.png", b="bad.png", p=1)) + "\n")
    elif case == "malformed":
        labels.write_text(text + "{not json\n")
    elif case == "p":
        labels.write_text(text + json.dumps(dict(a="img0.png", b="img1.png", p=0.7)) + "\n")
    elif case == "no p":
        labels.write_text(text + json.dumps(dict(a="img0.png", b="img1.png")) + "\n")
    argv = ["--labels", str(labels), "--out", str(tmp_path / "run"), "--k", "1" if case == "k" else "4"]
    with pytest.raises((ValueError, SystemExit), match=message):
        train_grpo.main(argv)
    assert not (tmp_path / "run").exists()  # failed before anything was written


@pytest.mark.parametrize("flags,message", [
    (["--temperature", "0"], "--temperature must be positive for training"),  # gave a NaN checkpoint, exit 0
    (["--temperature", "-1"], "--temperature must be positive for training"),
    (["--temperature", "nan"], "--temperature must be positive for training"),
    (["--top-p", "0"], r"--top-p must be in \(0, 1\]"),
    (["--top-k", "-3"], "--top-k must be at least 0"),
    (["--clip-eps", "-1"], "--clip-eps must be positive, got -1.0"),
    (["--save-every", "-1"], "--save-every must be at least 0, got -1"),  # saved every step
    (["--max-steps", "-1"], "--max-steps must be at least 0, got -1"),  # crashed at the end
    (["--gamma", "nan"], "--gamma must be positive, got nan"),
    (["--beta", "nan"], "--beta must be at least 0, got nan"),
    (["--grad-clip", "nan"], "--grad-clip must be positive, got nan"),
    (["--lr", "inf"], "--lr must be positive, got inf"),
    (["--seed", "-1"], "--seed must be at least 0"),
    (["--out", "LABELS"], "is also an input"),
    (["--out", "LABELS/run"], r"votes\.jsonl is a file, not a folder"),
    (["--out", "/proc/run"], "cannot write in /proc"),
])
def test_bad_flags_are_refused_before_any_work(tmp_path, flags, message, capsys):
    labels = str(write_labels(tmp_path))
    with pytest.raises(SystemExit):
        train_grpo.parse_args(["--labels", labels, "--out", str(tmp_path / "run")]
                              + [f.replace("LABELS", labels) for f in flags])
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("what", ["loss", "grad_norm", "logits"])
def test_a_non_finite_loss_or_gradient_stops_the_run_before_it_is_saved(tmp_path, monkeypatch, what):
    labels = write_labels(tmp_path)
    calls = []
    if what == "logits":  # the first step left finite weights whose logits overflow: the second step's rollouts
        real = policy.generate

        def overflow(model, *a, **k):
            calls.append(1)
            if len(calls) == 2:
                with torch.no_grad():
                    model.lm_head.weight.mul_(1e38)
            return real(model, *a, **k)
        monkeypatch.setattr(policy, "generate", overflow)
        message = "step 2, rollouts: the model's next-token logits hold NaN or inf"
    else:
        message = f"step 2: {what} (nan|inf) is not finite; stopped before the optimizer step"
    if what == "loss":  # the second step's loss is NaN
        real = train_grpo.grpo_loss
        monkeypatch.setattr(train_grpo, "grpo_loss", lambda *a: calls.append(1) or (
            real(*a) if len(calls) == 1 else (torch.tensor(float("nan")),) + real(*a)[1:]))
    elif what == "grad_norm":  # the second step's gradient norm is inf
        real = torch.nn.utils.clip_grad_norm_
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: calls.append(1) or (
            real(*a, **k) if len(calls) == 1 else torch.tensor(float("inf"))))
    with pytest.raises(FloatingPointError, match=message):
        train_grpo.main(["--labels", str(labels), "--out", str(tmp_path / "run"), "--k", "2", "--max-new-tokens", "2",
                         "--batch-pairs", "1", "--save-every", "1", "--micro-batch", "4", "--lr", "1e-3"])
    assert sorted(os.listdir(tmp_path / "run")) == ["metrics.jsonl", "step_1"]  # step 1 saved, nothing after it
    assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")] == [1]
    final = common.load_model(str(tmp_path / "run" / "step_1"))[0]  # loads: its weights are finite
    assert all(torch.isfinite(p).all() for p in final.parameters())


# -----------------------------------------------------------------------------
# the loop learns, checkpoints round-trip, FSDP matches one process, resume matches an uninterrupted run


def test_loop_learns_a_text_reward(tmp_path, monkeypatch):
    monkeypatch.setattr(train_grpo, "rollout_rewards", vowel_reward)
    labels = write_labels(tmp_path)
    train_grpo.main(["--labels", str(labels), "--out", str(tmp_path / "run"), "--k", "8", "--max-new-tokens", "8",
                     "--batch-pairs", "1", "--lr", "1e-2", "--beta", "0", "--epochs", "10", "--max-steps", "30",
                     "--save-every", "0"])
    r = [json.loads(line)["reward_mean"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(r) == 30 and np.mean(r[-5:]) > np.mean(r[:5]) + 0.1, r


def test_the_fidelity_reward_moves_the_scores_toward_the_pseudo_labels(answering, tmp_path):
    """
    The real reward (Eq. 2-3), not a stand-in, through train_grpo.main: the toy base model (tests/conftest.py) answers
    the score prompt with a digit; on labels "A better than B", where A's expected score is below B's at the start,
    40 steps make A's expected score exceed B's. Measured: 2.766 / 2.770 -> 2.722 / 2.487 and 2.766 / 2.770 ->
    2.591 / 2.481 (with 30 steps the second margin is only 0.03).
    """
    from conftest import expected_scores

    prompts = common.load_prompts(answering["prompts"])
    model, tok, cfg = common.load_model(answering["model"])
    keys = [f"r{r}_{level}.png" for r in (0, 1) for level in (0, 5)]
    images = {k: common.preprocess_image(common.load_image(answering["pool"] / k), cfg) for k in keys}
    before = expected_scores(model, tok, prompts, images, keys)
    pairs = [tuple(sorted(keys[i:i + 2], key=before.get)) for i in (0, 2)]  # (A, B): A scores lower now
    assert all(before[a] <= before[b] for a, b in pairs)
    labels = tmp_path / "votes.jsonl"
    labels.write_text("".join(json.dumps(dict(i=i, a=a, b=b, p=1.0)) + "\n" for i, (a, b) in enumerate(pairs)))
    train_grpo.main(["--model", answering["model"], "--labels", str(labels), "--image-root", str(answering["pool"]),
                     "--prompts", answering["prompts"], "--no-think", "--out", str(tmp_path / "run"), "--k", "8",
                     "--max-new-tokens", "2", "--batch-pairs", "2", "--micro-batch", "64", "--lr", "3e-3",
                     "--beta", "0", "--epochs", "40", "--save-every", "0"])
    model, tok, cfg = common.load_model(str(tmp_path / "run" / "final"))
    after = expected_scores(model, tok, prompts, images, keys)
    assert all(after[a] > after[b] + 0.05 for a, b in pairs), (before, after)


def test_checkpoint_round_trip(tmp_path, tiny):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model, tok, cfg = common.load_model("tiny", "cpu", "float32")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # AdamW's moments exist
    asked = (dict(common.PROMPTS, compare_labels=["A", "B"]), False)
    policy.save(str(tmp_path), 3, model, opt, tok, cfg, "float32", 2, dict(step=3, world=1),
                dict(prompts=asked[0], no_think=True))
    draws = (random.random(), np.random.rand(), torch.rand(1))
    d = str(tmp_path / "step_3")
    assert common.resolve_prompts(d)[:2] == asked  # prompts.json: the next stage asks it as it was trained
    # resume/ brings the master weights, AdamW's state and the RNG back exactly, into a fresh model and optimizer
    fresh = common.load_model("tiny", "cpu", "float32")[0]
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    policy.restore(d, fresh, fresh_opt)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
    for a, b in zip(fresh.parameters(), model.parameters()):
        assert all(torch.equal(fresh_opt.state[a][k], opt.state[b][k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    assert (random.random(), np.random.rand(), torch.rand(1)) == draws
    assert policy.latest_checkpoint(str(tmp_path)) == d
    assert not any(n.startswith(".") for n in os.listdir(tmp_path))  # no partial directory left behind
    ids = torch.tensor([tok.encode("boxed{3.25} <think>")])
    want = model(input_ids=ids).logits
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(d)
    ours, _, cfg2 = common.load_model(d, "cpu", "float32")
    torch.testing.assert_close(hf(input_ids=ids).logits, want, atol=0, rtol=0)
    torch.testing.assert_close(ours(input_ids=ids).logits, want, atol=0, rtol=0)
    assert cfg2 == cfg
    # a checkpoint without its manifest (written last) is never picked up
    os.makedirs(tmp_path / "step_9")
    assert policy.latest_checkpoint(str(tmp_path)) == d


def test_tied_embedding_stays_tied_through_load_and_save(tmp_path):
    """Qwen2.5-VL-3B ties lm_head to the embedding: meta build + fill must keep one tensor, and so must the save."""
    model, tok, cfg = common.load_model("tiny", "cpu", "float32")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    common.save_checkpoint(model, tok, cfg, str(tmp_path / "tied"))
    policy_model, ref, *_ = policy.load(str(tmp_path / "tied"), torch.device("cpu"))
    for m in (policy_model, ref):
        assert m.lm_head.weight is m.model.language_model.embed_tokens.weight
    policy.save(str(tmp_path / "run"), 1, policy_model, torch.optim.AdamW(policy_model.parameters()), tok, cfg,
                "float32", 2, dict(step=1, world=1), dict(prompts=common.PROMPTS, no_think=False))
    saved = common.load_model(str(tmp_path / "run" / "step_1"), "cpu", "float32")[0]
    assert saved.lm_head.weight is saved.model.language_model.embed_tokens.weight
    assert torch.equal(saved.lm_head.weight, model.lm_head.weight)


def _run(tmp_path, out, extra, nproc=1, kill_at=None, inline=False):
    """train_grpo.py with the tests' reward in a subprocess (torchrun for nproc > 1), or `inline`: main() in this
    process, which saves the interpreter's start-up where no process boundary is under test."""
    script = tmp_path / "patched.py"
    script.write_text(PATCH)
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [])
    cmd = launch + [str(script), "--labels", str(tmp_path / "votes.jsonl"), "--out", str(out), "--k", "4",
                    "--max-new-tokens", "6", "--lr", "1e-3", "--epochs", "2", "--micro-batch", "3", "--seed", "1"] + extra
    if inline:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(train_grpo, "rollout_rewards", vowel_reward)
            train_grpo.main(cmd[len(launch) + 1:])
        return
    if kill_at is None:
        p = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        return p.stdout
    p = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (out / kill_at).is_dir() and p.poll() is None:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()


def _weights(run):
    return common.load_model(str(run / "final"), "cpu", "float32")[0].state_dict()


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One process, 2 pairs per step, 4 steps (2 epochs of 4 pairs), 2 updates per batch."""
    d = tmp_path_factory.mktemp("ref")
    write_labels(d)
    _run(d, d / "run", ["--batch-pairs", "2", "--save-every", "1", "--updates-per-batch", "2"])
    return d / "run"


def test_fsdp_on_a_one_rank_group_equals_the_plain_process(tmp_path, reference_run):
    """One CUDA process runs FSDP2 on a 1-rank group (policy.init_single_process); here on gloo, in fp32: the
    weights and metrics equal the plain process's bit for bit."""
    write_labels(tmp_path)
    script = tmp_path / "one_rank.py"
    script.write_text(PATCH.replace("train_grpo.main()", "import torch.distributed as dist\n"
                                    "dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)\n"
                                    "train_grpo.main()"))
    cmd = [sys.executable, str(script), "--labels", str(tmp_path / "votes.jsonl"), "--out", str(tmp_path / "run"),
           "--k", "4", "--max-new-tokens", "6", "--lr", "1e-3", "--epochs", "2", "--micro-batch", "3", "--seed", "1",
           "--batch-pairs", "2", "--save-every", "1", "--updates-per-batch", "2"]
    p = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    want, got = _weights(reference_run), _weights(tmp_path / "run")
    assert all(torch.equal(got[k], want[k]) for k in want)
    m1, m2 = (open(r / "metrics.jsonl").read().splitlines() for r in (reference_run, tmp_path / "run"))
    assert [json.loads(a)["kl"] for a in m1] == [json.loads(b)["kl"] for b in m2]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """The reference run's 4 steps on 2 ranks x 1 pair, a checkpoint every step (--keep 2, the default)."""
    d = tmp_path_factory.mktemp("two")
    write_labels(d)
    _run(d, d / "run", ["--batch-pairs", "1", "--updates-per-batch", "2", "--shared-prefix", "--save-every", "1"], nproc=2)
    return d / "run"


def test_fsdp_two_processes_match_one(two_rank_run, reference_run):
    one, two = _weights(reference_run), _weights(two_rank_run)
    init = common.load_model("tiny", "cpu", "float32")[0].state_dict()
    assert max((one[k] - init[k]).abs().max().item() for k in one) > 1e-3  # the weights did move
    # fp32 throughout (shared-prefix path, the default, in both); the only difference is the order of gradient
    # sums. AdamW divides each gradient element by its own magnitude, so an element whose gradient is near 0 can
    # move by a sizeable part of lr = 1e-3 on a rounding difference: measured 9.3e-6 on the plain path, and on the
    # shared-prefix path 9.2e-5 on 2 of 225,504 weights (patch_embed), every other one under 3e-5. The gradients
    # themselves are compared sharply in test_shared_prefix_gradients_under_fsdp.
    diff = torch.cat([(two[k] - one[k]).abs().flatten() for k in one])
    assert diff.max() < 2e-4 and (diff > 3e-5).sum() <= 10, (diff.max(), (diff > 3e-5).sum())
    m1 = [json.loads(line) for line in open(reference_run / "metrics.jsonl")]
    m2 = [json.loads(line) for line in open(two_rank_run / "metrics.jsonl")]
    for a, b in zip(m1, m2, strict=True):
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-9)
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-4)  # summed in a different order


def test_resume_after_kill_matches_uninterrupted(tmp_path, reference_run):
    write_labels(tmp_path)
    out = tmp_path / "run"
    args = ["--batch-pairs", "2", "--save-every", "1", "--updates-per-batch", "2"]
    _run(tmp_path, out, args, kill_at="step_2")
    assert not (out / "final").exists(), "the run finished before it was killed"
    _run(tmp_path, out, args + ["--resume"])
    one, resumed = _weights(reference_run), _weights(out)
    for k in one:  # the fp32 master weights and AdamW state are restored exactly: bit for bit
        assert torch.equal(resumed[k], one[k]), k
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]


def test_two_ranks_keep_two_checkpoints_each_rank_writing_its_own_shard(two_rank_run):
    assert sorted(os.listdir(two_rank_run)) == ["final", "metrics.jsonl", "step_3", "step_4"]  # --keep 2 of 4 saves
    assert os.readlink(two_rank_run / "final") == "step_4"
    n = sum(p.numel() for p in common.load_model("tiny", "cpu", "float32")[0].parameters())
    shards = [(two_rank_run / "step_4" / "resume" / f"__{r}_0.distcp").stat().st_size for r in range(2)]
    # the fp32 master weights and AdamW's two moments are 12 bytes per parameter, and each rank wrote its half (+ its
    # RNG and a header per tensor: measured 0.61 and 0.65 of 12 bytes x n here, 12.0002 x n on one rank at the real
    # shape): none gathered the whole
    assert sum(shards) > 12 * n and max(shards) < 0.7 * 12 * n, (shards, n)


def test_two_rank_resume_falls_back_past_a_truncated_checkpoint(tmp_path, two_rank_run):
    """The newest checkpoint lost the end of rank 1's shard: --resume says so, resumes from the one before, and
    reaches the uninterrupted run's weights bit for bit."""
    out = tmp_path / "run"
    for d in ("step_3", "step_4"):
        shutil.copytree(two_rank_run / d, out / d)
    shutil.copy(two_rank_run / "metrics.jsonl", out)
    shard = out / "step_4" / "resume" / "__1_0.distcp"
    os.truncate(shard, shard.stat().st_size // 2)
    log = _run(two_rank_run.parent, out, ["--batch-pairs", "1", "--updates-per-batch", "2", "--shared-prefix",
                                          "--save-every", "1", "--resume"], nproc=2)
    assert f"{out / 'step_4'} is incomplete (resume/__1_0.distcp has" in log and "falling back" in log
    assert "from step 3" in log
    want, got = _weights(two_rank_run), _weights(out)
    assert all(torch.equal(got[k], want[k]) for k in want)


def _copy_run(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    return dst


def test_resume_refuses_other_arguments_and_names_them(tmp_path, reference_run):
    run = _copy_run(reference_run, tmp_path / "run")
    base = ["--labels", str(reference_run.parent / "votes.jsonl"), "--out", str(run), "--k", "4", "--max-new-tokens",
            "6", "--lr", "1e-3", "--epochs", "2", "--micro-batch", "3", "--seed", "1", "--batch-pairs", "2",
            "--save-every", "1", "--updates-per-batch", "2", "--resume"]
    with pytest.raises(SystemExit, match=r"came from other arguments \(--k 4 -> 3; --lr 0\.001 -> 5\.0\); resume "
                                         r"with the same ones \(those whose help says so may change\)"):
        train_grpo.main(base + ["--lr", "5", "--k", "3"])
    # those whose help says so may change (checked without running: this is the check main runs first)
    args = train_grpo.parse_args(base + ["--max-steps", "9", "--save-every", "3", "--keep", "5", "--save-dtype",
                                        "bfloat16", "--no-grad-checkpointing"])
    record = train_grpo.resume_record(args, common.resolve_prompts(args.model, args.prompts, args.think)[0])
    assert policy.check_resume(str(run / "step_4"), record, 1)["step"] == 4
    with pytest.raises(SystemExit, match=r"written by 1 rank\(s\), this run has 2: --resume needs the same world size"):
        policy.check_resume(str(run / "step_4"), record, 2)


def test_the_flags_that_may_change_on_resume_say_so(capsys):
    with pytest.raises(SystemExit):
        train_grpo.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert text.count("may change on --resume") == len(train_grpo.MAY_CHANGE_ON_RESUME - {"out", "resume"}) == 5
    assert "run directory (it may move before a --resume)" in text


def test_save_refuses_non_finite_weights(tmp_path):
    model, tok, cfg = common.load_model("tiny", "cpu", "float32")
    with torch.no_grad():
        model.model.language_model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"step 7: the weights are not finite \(model\.language_model\.layers\.1\.mlp\."
                                         r"up_proj\.weight\); refusing to save"):
        policy.save(str(tmp_path), 7, model, torch.optim.AdamW(model.parameters()), tok, cfg, "float32", 2, {}, {})
    assert os.listdir(tmp_path) == []


def test_bf16_master_weights_are_refused_with_the_reason():
    with pytest.raises(SystemExit, match=r"--dtype bfloat16: AdamW needs fp32 master weights.*lr 3e-7.*one step "
                                         r"changes 0\.5% of bf16 weights, 100% of fp32 ones"):
        train_grpo.parse_args(["--labels", "x.jsonl", "--out", "o", "--dtype", "bfloat16"])


class _Loaded(Exception):
    pass


@pytest.mark.parametrize("device,flag,want", [("cpu", [], False), ("cuda", [], True), ("cpu", ["--grad-checkpointing"], True),
                                              ("cuda", ["--no-grad-checkpointing"], False)])
def test_activation_checkpointing_is_on_by_default_on_cuda_only(tmp_path, monkeypatch, capsys, device, flag, want):
    """What main hands to policy.load, and prints (no model is loaded: load is replaced)."""
    labels = write_labels(tmp_path)
    seen = {}

    def load(spec, dev, grad_checkpointing=False, lora=None):
        seen.update(device=dev.type, checkpointing=grad_checkpointing)
        raise _Loaded

    monkeypatch.setattr(common, "dist_setup", lambda: (0, 1, torch.device(device)))
    monkeypatch.setattr(policy, "init_single_process", lambda device, lora: None)
    monkeypatch.setattr(policy, "load", load)
    with pytest.raises(_Loaded):
        train_grpo.main(["--labels", str(labels), "--out", str(tmp_path / "run"), "--k", "2"] + flag)
    assert seen == dict(device=device, checkpointing=want)
    said = capsys.readouterr().out
    assert f"activation checkpointing {'on' if want else 'off'}" + ("" if flag else f" (the default on {device})") in said


def test_loaded_policy_checkpoints_every_layer_and_vision_block():
    model, ref, *_ = policy.load("tiny", torch.device("cpu"), grad_checkpointing=True)
    assert all(m.gradient_checkpointing for m in policy.fsdp_units(model)[:4])  # 2 decoder layers, 2 vision blocks
    assert not any(getattr(m, "gradient_checkpointing", False) for m in ref.modules())
    assert model.training and not ref.training and not any(p.requires_grad for p in ref.parameters())
