import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

# the stages are plain scripts in the repository root, imported by the tests as modules
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402

TOY_PROMPTS = os.path.join(ROOT, "toy", "prompts.json")
# the files that take a minute or more, slowest first: under `-n 2 --dist loadfile --no-loadscope-reorder` (README)
# they start first and the short files fill in beside them, instead of one worker running a long file alone at the end
SLOW_FIRST = ("test_demo.py", "test_ablations.py", "test_policy.py", "test_bench.py", "test_memplan.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: SLOW_FIRST.index(item.path.name) if item.path.name in SLOW_FIRST else len(SLOW_FIRST))


@pytest.fixture(scope="session")
def answering(tmp_path_factory):
    """
    A model that answers validly, for end-to-end tests whose assertions must be able to fail: the built-in tiny model
    does not (it answers almost everything invalidly). It is toy/prepare.py's base model at a seconds-long size: the
    toy warm-up (60 steps) on a pool of 12 gradients (2 references, the original and 'dark' levels 1-5), so that with
    the toy prompts and --no-think it answers the compare prompt with A / B and the score prompt with a digit 1-5,
    each then <|im_end|>, ~90% of the time (the rest is invalid, as a real model's). Its score digits are drawn
    without a label (the warm-up teaches the format only), so the fidelity reward has something to move.
    dict(model: checkpoint directory, pool: a folder with the images and manifest.jsonl (ref, distortion, level,
    mos = 5 - level), prompts: toy/prompts.json). Read-only: load it (common.load_model) to change it.
    """
    from toy import prepare

    pool = tmp_path_factory.mktemp("answering_pool")
    model, tok, cfg = common.load_model("tiny", "cpu", "float32")
    prepare.reinit(model, 0)
    cfg = dict(cfg, min_pixels=56 * 56, max_pixels=56 * 56)  # 4 visual tokens an image
    rows, images, rng = [], {}, np.random.default_rng(0)
    for ref in ("r0", "r1"):
        colour = rng.uniform(60, 200, 3)
        for level in range(6):
            x = np.clip(np.linspace(0, 60, 56)[None, :, None] + colour - 25 * level, 0, 255).astype(np.uint8)
            name = f"{ref}_{level}.png"
            Image.fromarray(np.broadcast_to(x, (56, 56, 3)).copy()).save(pool / name)
            rows.append(dict(image=name, ref=ref, distortion="dark" if level else None, level=level, mos=5 - level,
                             source="synthetic" if level else "authentic"))
            images[name] = common.preprocess_image(common.load_image(pool / name), cfg)
    common.write_jsonl_atomic(str(pool / "manifest.jsonl"), rows)
    args = prepare.parse_args(["--steps", "60", "--clean-steps", "60", "--groups", "2", "--pairs", "8", "--lr", "3e-3"])
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prepare.warm_up(model, tok, common.load_prompts(TOY_PROMPTS), rows, images, args, log=lambda *a: None)
    finally:
        torch.set_num_threads(n)
    common.save_checkpoint(model, tok, cfg, str(pool / "model"))
    return dict(model=str(pool / "model"), pool=pool, prompts=TOY_PROMPTS)


@torch.no_grad()
def expected_scores(model, tokenizer, prompts, images, keys):
    """{key: sum_d d p(d) / sum_d p(d)}, p(d) the probability that the one-token answer to the score prompt (no
    reasoning suffix) is the digit d = 1..5: exact, from one forward, no sampling noise."""
    requests = [(common.encode_prompt(tokenizer, prompts, "score", [images[k][1]], think=False), [k]) for k in keys]
    p = common.prefill(model, requests, images)[0].softmax(-1)
    p = p[:, [tokenizer.convert_tokens_to_ids(str(d)) for d in range(1, 6)]]
    return dict(zip(keys, (p @ torch.arange(1.0, 6.0) / p.sum(-1)).tolist()))
