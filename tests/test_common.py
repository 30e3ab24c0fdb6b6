import argparse
import copy
import io
import json
import os
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import common


@pytest.fixture(scope="module")
def tiny():
    return common.load_model("tiny", "cpu", "float32")


def photo(h, w, seed=0):
    """A smooth colour image with an edge and some texture: closer to a photograph than noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([x, y, 1 - x * y], -1) * 200 + rng.normal(0, 8, (h, w, 3))
    img[h // 3:, : w // 2] += 40
    return Image.fromarray(np.uint8(np.clip(img, 0, 255)))


def make_images(cfg, sizes):
    return {k: common.preprocess_image(photo(h, w, i), cfg) for i, (k, (h, w)) in enumerate(sizes.items())}


# -----------------------------------------------------------------------------
# prompts and parsing

def test_prompts_are_table1_verbatim():
    assert common.PROMPTS["compare"].startswith("<image><image> You are performing an image quality assessment task.")
    assert common.PROMPTS["compare"].endswith("0 if the first image is better, or 1 if the second image is better.")
    assert "rounded to two decimal places, with 1 representing very poor quality and 5 representing excellent quality." \
        in common.PROMPTS["score"]
    assert common.PROMPTS["suffix"].endswith("The final answer MUST BE put in boxed{ }.")
    assert common.prompt_text(common.PROMPTS, "score", think=False) == common.PROMPTS["score"]
    assert common.prompt_text(common.PROMPTS, "score").endswith(common.PROMPTS["suffix"])


def test_chat_expands_image_placeholders(tiny):
    _, tok, _ = tiny
    text = common.chat(common.PROMPTS, "compare", [(1, 4, 6), (1, 2, 2)])
    assert text.count("<|image_pad|>") == 6 + 1
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "<|vision_start|><|image_pad|>")
    assert text.endswith("boxed{ }.<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(text, add_special_tokens=False)
    assert ids.count(tok.convert_tokens_to_ids("<|image_pad|>")) == 7
    with pytest.raises(ValueError, match="2 <image> slots but 1 images"):
        common.chat(common.PROMPTS, "compare", [(1, 2, 2)])


def test_prompts_file_overrides_and_parser_follows(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"compare_labels": ["A", "B"], "suffix": "Answer in boxed{}."}))
    prompts = common.load_prompts(str(path))
    assert prompts["suffix"] == "Answer in boxed{}." and prompts["score"] == common.PROMPTS["score"]
    assert common.parse_compare("boxed{B}", prompts["compare_labels"]) == 1
    assert common.parse_compare("boxed{1}", prompts["compare_labels"]) is None
    path.write_text(json.dumps({"colour": "x"}))
    with pytest.raises(ValueError, match="unknown prompt keys"):
        common.load_prompts(str(path))
    path.write_text("{not json")
    with pytest.raises(ValueError, match="p.json"):
        common.load_prompts(str(path))


def test_a_checkpoint_carries_its_prompts_and_flags_on_the_command_line_win(tmp_path):
    ckpt, toy = tmp_path / "ckpt", tmp_path / "toy.json"
    ckpt.mkdir()
    toy.write_text(json.dumps({"compare_labels": ["A", "B"]}))
    # no checkpoint file: the paper's prompts with the reasoning suffix
    assert common.resolve_prompts(str(ckpt)) == (common.PROMPTS, True, "prompts: the paper's Table 1; reasoning "
                                                 "suffix: on, the paper's default")
    assert common.resolve_prompts("tiny")[:2] == (common.PROMPTS, True)
    saved = dict(common.load_prompts(str(toy)), score="Rate it.")
    common.save_prompts(str(ckpt), saved, False)
    assert json.loads((ckpt / "prompts.json").read_text()) == dict(saved, think=False)  # a --prompts file, + think
    prompts, think, source = common.resolve_prompts(str(ckpt))
    assert (prompts, think) == (saved, False)
    assert source == f"prompts: the checkpoint's {ckpt}/prompts.json; reasoning suffix: off, from the same file"
    # --prompts wins for the prompts; the suffix still follows the checkpoint unless --think / --no-think
    prompts, think, source = common.resolve_prompts(str(ckpt), str(toy))
    assert (prompts["score"], prompts["compare_labels"], think) == (common.PROMPTS["score"], ["A", "B"], False)
    assert source == f"prompts: --prompts {toy}; reasoning suffix: off, from the checkpoint's {ckpt}/prompts.json"
    prompts, think, source = common.resolve_prompts(str(ckpt), None, True)
    assert (prompts, think) == (saved, True) and source.endswith("reasoning suffix: on, from --think")
    (ckpt / "prompts.json").write_text(json.dumps({"think": "no"}))
    with pytest.raises(ValueError, match="prompts.json: think must be true or false"):
        common.resolve_prompts(str(ckpt))


def test_bad_input_ends_in_one_line_and_a_library_error_keeps_its_traceback(tmp_path, capsys):
    def ours():
        common.read_jsonl(str(tmp_path / "absent.jsonl"))

    with pytest.raises(SystemExit) as e:
        common.run_main(ours)
    assert str(e.value).endswith(f"error: {tmp_path}/absent.jsonl: No such file or directory")
    with pytest.raises(SystemExit, match=r"error: .*bad\.jsonl:1: malformed JSON line"):
        (tmp_path / "bad.jsonl").write_text("{\n")
        common.run_main(lambda: common.read_jsonl(str(tmp_path / "bad.jsonl")))
    with pytest.raises(json.JSONDecodeError):  # raised inside the json module: a bug, not bad input
        common.run_main(lambda: json.loads("{"))


@pytest.mark.parametrize("text,expected", [
    ("<think>the first is sharper</think> \\boxed{0}", 0),
    ("boxed{1}", 1),
    ("\\boxed{0} no wait \\boxed{ 1 }", 1),  # the last box counts
    ("\\boxed{2}", None),
    ("\\boxed{}", None),
    ("0", 0),  # a bare answer (prompts without the suffix)
    (" 1\n", 1),
    ("I think 0", None),
    ("", None),
])
def test_parse_compare(text, expected):
    assert common.parse_compare(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("<think>sharp, well lit</think> \\boxed{3.75}", 3.75),
    ("boxed{5}", 5.0),
    ("\\boxed{1.00}", 1.0),
    ("\\boxed{2} then \\boxed{4.5}", 4.5),
    ("\\boxed{5.01}", None),
    ("\\boxed{0.99}", None),
    ("\\boxed{three}", None),
    ("\\boxed{nan}", None),
    ("\\boxed{inf}", None),
    ("3.5", 3.5),  # a bare answer (prompts without the suffix)
    ("it is 3.5", None),
    ("\\boxed{4} 3", 4.0),
])
def test_parse_score(text, expected):
    assert common.parse_score(text) == expected


# -----------------------------------------------------------------------------
# images

@pytest.mark.parametrize("size", [(224, 224), (97, 333), (40, 30), (600, 400)])
def test_preprocess_matches_transformers_image_processor(size):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cfg = dict(common.IMAGE_CFG, min_pixels=56 * 56, max_pixels=280 * 280)
    img = photo(*size)
    ours, grid = common.preprocess_image(img, cfg)
    ref = Qwen2VLImageProcessorPil(min_pixels=cfg["min_pixels"], max_pixels=cfg["max_pixels"])(
        images=[img], return_tensors="pt")
    assert list(grid) == ref["image_grid_thw"][0].tolist()
    assert ours.shape == ref["pixel_values"].shape
    torch.testing.assert_close(ours, ref["pixel_values"].float(), atol=1e-5, rtol=1e-5)


def save(img, path, **kw):
    img.save(path, **kw)
    return str(path)


def test_load_image_converts_every_mode_to_rgb(tmp_path):
    base = photo(30, 40)
    cases = {
        "l.png": base.convert("L"), "la.png": base.convert("LA"), "p.png": base.convert("P"),
        "rgba.png": base.convert("RGBA"), "cmyk.jpg": base.convert("CMYK"),
        "i16.png": Image.fromarray((np.asarray(base.convert("L"), np.uint16) * 257)),
    }
    for name, img in cases.items():
        out = common.load_image(save(img, tmp_path / name))
        assert out.mode == "RGB" and out.size == (40, 30), name
    grey = np.asarray(common.load_image(str(tmp_path / "i16.png")))[..., 0]
    assert abs(int(grey.mean()) - int(np.asarray(base.convert("L")).mean())) <= 1  # scaled, not clipped to 255


def test_load_image_applies_exif_orientation(tmp_path):
    img = photo(30, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    out = common.load_image(save(img, tmp_path / "o.jpg", exif=exif))
    assert out.size == (30, 40)


def test_bad_image_files_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="missing.png"):
        common.load_image(str(tmp_path / "missing.png"))
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="text.png"):
        common.load_image(str(tmp_path / "text.png"))
    buf = io.BytesIO()
    photo(64, 64).save(buf, "PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[:200])
    with pytest.raises(ValueError, match="cut.png"):
        common.load_image(str(tmp_path / "cut.png"))


def test_decompression_bomb_is_an_error_or_a_warning_naming_the_file(tmp_path, monkeypatch):
    path = save(photo(56, 56), tmp_path / "big.png")  # 3,136 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # over 2x the limit: PIL raises DecompressionBombError
    for read in (common.load_image, common.check_image):
        with pytest.raises(ValueError, match=r"big\.png: cannot read image: Image size \(3136 pixels\) exceeds"):
            read(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # between 1x and 2x: PIL only warns, without the file
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert common.load_image(path).size == (56, 56)
    assert [str(w.message).startswith(f"{path}: Image size (3136 pixels) exceeds limit") for w in caught] == [True]
    assert caught[0].category is Image.DecompressionBombWarning


def test_check_image_reads_the_header_only(tmp_path):
    buf = io.BytesIO()
    photo(64, 64).save(buf, "PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])  # header intact, pixels cut
    assert common.check_image(str(tmp_path / "cut.png")) == (64, 64)
    with pytest.raises(ValueError, match=r"cut\.png: cannot read image"):  # what a full decode finds
        common.load_image(str(tmp_path / "cut.png"))
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"text\.png: cannot read image"):
        common.check_image(str(tmp_path / "text.png"))
    with pytest.raises(ValueError, match=r"gone\.png: cannot read image"):
        common.check_image(str(tmp_path / "gone.png"))


# -----------------------------------------------------------------------------
# model loading and checkpoints

def test_tiny_is_deterministic_and_tokenizer_covers_prompts(tiny):
    model, tok, _ = tiny
    model2, _, _ = common.load_model("tiny")
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name
    for t in common.SPECIAL_TOKENS:
        assert tok.convert_ids_to_tokens(tok.encode(t, add_special_tokens=False)) == [t]
    for text in [common.prompt_text(common.PROMPTS, "compare"), common.prompt_text(common.PROMPTS, "score"),
                 "<think> the left one is blurry </think> \\boxed{3.25}", "boxed{0}", "0123456789"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert [tok.decode([i]) for i in tok.encode("2.75", add_special_tokens=False)] == ["2", ".", "7", "5"]
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")


def test_bad_model_spec_says_what_was_expected(tmp_path):
    with pytest.raises(ValueError, match="no such directory.*expected 'tiny'"):
        common.load_model(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type is 'bert', expected 'qwen2_5_vl'"):
        common.load_model(str(tmp_path))


def test_broken_or_nan_weights_name_the_checkpoint(tiny, tmp_path):
    model, tok, cfg = tiny
    good = str(tmp_path / "good")
    common.save_checkpoint(model, tok, cfg, good)
    weights = open(os.path.join(good, "model.safetensors"), "rb").read()
    for name, data in (("truncated", weights[:len(weights) // 2]), ("garbage", b"not safetensors at all" * 8)):
        bad = tmp_path / name
        common.save_checkpoint(model, tok, cfg, str(bad))
        (bad / "model.safetensors").write_bytes(data)
        with pytest.raises(ValueError, match=f"model '{bad}': cannot load its weights: .*header"):
            common.load_model(str(bad))
    nan = common.load_model(good)[0]
    with torch.no_grad():
        nan.lm_head.weight[3, 5] = float("nan")  # one element of one tensor
        nan.model.visual.blocks[0].mlp.down_proj.weight[0, 0] = float("inf")
    common.save_checkpoint(nan, tok, cfg, str(tmp_path / "nan"))
    with pytest.raises(ValueError, match=f"model '{tmp_path / 'nan'}': 2 of 57 weight tensors hold NaN or inf, e.g. "
                                         r"model\.visual\.blocks\.0\.mlp\.down_proj\.weight, lm_head\.weight"):
        common.load_model(str(tmp_path / "nan"))


def test_hub_id_goes_to_the_hub_not_the_disk():
    """org/name is a hub id: offline it fails on the download, not as a missing directory."""
    import subprocess
    import sys
    code = "import common\ntry:\n    common.load_model('Qwen/Qwen2.5-VL-7B-Instruct')\nexcept ValueError as e:\n    print(e)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(common.__file__),
                         env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=120).stdout
    assert "cannot load a config" in out and "no such directory" not in out


def test_checkpoint_round_trip(tiny, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model, tok, cfg = tiny
    out = str(tmp_path / "ckpt")
    common.save_checkpoint(model, tok, dict(cfg, max_pixels=112 * 112), out)
    common.save_checkpoint(model, tok, dict(cfg, max_pixels=112 * 112), out)  # overwrite in place
    assert not any(p.endswith((".tmp", ".old")) for p in os.listdir(tmp_path))
    m2, tok2, cfg2 = common.load_model(out)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
    assert cfg2["max_pixels"] == 112 * 112 and tok2.encode("boxed{2}") == tok.encode("boxed{2}")
    images = make_images(cfg, {"x": (56, 84)})
    ids = torch.tensor([common.encode_prompt(tok, common.PROMPTS, "score", [images["x"][1]])])
    kw = dict(input_ids=ids, pixel_values=images["x"][0], image_grid_thw=torch.tensor([images["x"][1]]),
              mm_token_type_ids=(ids == model.config.image_token_id).int())
    with torch.no_grad():
        ref = model(**kw).logits
        torch.testing.assert_close(m2(**kw).logits, ref)
        torch.testing.assert_close(hf(**kw).logits, ref)


# -----------------------------------------------------------------------------
# positions and the sampler

def requests_for(tok, images):
    P = common.PROMPTS
    return [
        (common.encode_prompt(tok, P, "compare", [images["a"][1], images["b"][1]]), ["a", "b"]),
        (common.encode_prompt(tok, P, "score", [images["c"][1]]), ["c"]),
        (common.encode_prompt(tok, P, "compare", [images["c"][1], images["a"][1]], think=False), ["c", "a"]),
    ]


@pytest.fixture(scope="module")
def batch(tiny):
    _, tok, cfg = tiny
    images = make_images(cfg, {"a": (112, 112), "b": (56, 140), "c": (84, 56)})
    return images, requests_for(tok, images)


def hf_inputs(model, ids, keys, images):
    ids = torch.tensor([ids])
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                pixel_values=torch.cat([images[k][0] for k in keys]),
                image_grid_thw=torch.tensor([images[k][1] for k in keys]),
                mm_token_type_ids=(ids == model.config.image_token_id).int())


def test_rope_positions_match_transformers(tiny, batch):
    model, _, _ = tiny
    images, requests = batch
    for ids, keys in requests:
        kw = hf_inputs(model, ids, keys, images)
        ref, _ = model.model.get_rope_index(kw["input_ids"], kw["mm_token_type_ids"], kw["image_grid_thw"])
        ours, nxt = common.rope_positions(ids, [images[k][1] for k in keys], model.config.image_token_id)
        assert torch.equal(ours, ref[:, 0]) and nxt == int(ref.max()) + 1


def test_greedy_matches_transformers_generate(tiny, batch):
    model, tok, _ = tiny
    images, requests = batch
    out = common.sample(model, tok, requests, images, n=1, max_new_tokens=24, temperature=0)
    for (ids, keys), ours in zip(requests, out["tokens"]):
        gen = model.generate(**hf_inputs(model, ids, keys, images), do_sample=False, max_new_tokens=24)
        ref = gen[0, len(ids):].tolist()
        ref = ref[:ref.index(tok.eos_token_id) + 1] if tok.eos_token_id in ref else ref
        assert ours == ref


def test_overflowing_logits_stop_the_sampler_with_a_named_cause(tiny, batch):
    """Finite weights that diverged (load_model refuses only NaN / inf ones): inf logits, which argmax would read
    as token 0 and multinomial refuse deep inside torch."""
    import copy
    model, tok, _ = tiny
    images, requests = batch
    big = copy.deepcopy(model)
    with torch.no_grad():
        big.lm_head.weight.mul_(1e38)
    for shared, temperature in ((True, 0), (True, 1.0), (False, 1.0)):
        with pytest.raises(FloatingPointError, match="next-token logits hold NaN or inf"):
            common.sample(big, tok, requests, images, n=2, max_new_tokens=3, temperature=temperature,
                          shared_prefix=shared)


def test_cached_decode_logits_equal_full_forward(tiny, batch, monkeypatch):
    """Every step's logits, from the padded, cached batch, against a fresh no-cache forward (fp32, 1e-4)."""
    model, tok, _ = tiny
    images, requests = batch
    seen = []
    real = common.next_token
    monkeypatch.setattr(common, "next_token", lambda logits, *a: seen.append(logits.clone()) or real(logits, *a))
    out = common.sample(model, tok, requests, images, n=1, max_new_tokens=6, temperature=1.0, seed=3)
    for r, ((ids, keys), gen) in enumerate(zip(requests, out["tokens"])):
        full = torch.tensor([ids + gen])
        pos, nxt = common.rope_positions(ids, [images[k][1] for k in keys], model.config.image_token_id)
        pos = torch.cat([pos, (nxt + torch.arange(len(gen))).expand(3, -1)], 1)[:, None]
        with torch.no_grad():
            emb = common.encode_images(model, images, keys)
            slots = torch.zeros_like(full, dtype=torch.bool)
            slots[0, :len(ids)] = torch.tensor(ids) == model.config.image_token_id
            x = common.embed(model, full, [emb[k] for k in keys], slots)
            logits = model(inputs_embeds=x, position_ids=pos, use_cache=False).logits[0]
        for t in range(len(gen)):
            torch.testing.assert_close(seen[t][r], logits[len(ids) - 1 + t], atol=1e-4, rtol=1e-4)


def test_sampling_is_reproducible_and_seeded(tiny, batch):
    model, tok, _ = tiny
    images, requests = batch
    kw = dict(n=3, max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50)
    a = common.sample(model, tok, requests, images, seed=7, **kw)
    b = common.sample(model, tok, requests, images, seed=7, **kw)
    c = common.sample(model, tok, requests, images, seed=8, **kw)
    assert a["tokens"] == b["tokens"] and a["tokens"] != c["tokens"]
    assert len(a["tokens"]) == 9 and a["num_tokens"] == sum(map(len, a["tokens"]))


def test_n_from_one_prefill_equals_n_prefilled_copies(tiny, batch):
    model, tok, _ = tiny
    images, requests = batch
    kw = dict(max_new_tokens=10, temperature=1.0, seed=11)
    shared = common.sample(model, tok, requests, images, n=4, **kw)
    copies = common.sample(model, tok, [r for r in requests for _ in range(4)], images, n=1, **kw)
    assert shared["tokens"] == copies["tokens"]
    # per-request seeds: a request's samples do not depend on what else is in the batch
    alone = common.sample(model, tok, requests[1:2], images, n=[3], seed=[5], max_new_tokens=10)
    mixed = common.sample(model, tok, requests, images, n=[2, 3, 1], seed=[9, 5, 4], max_new_tokens=10)
    assert mixed["tokens"][2:5] == alone["tokens"]


def test_top_k_one_is_greedy(tiny, batch):
    model, tok, _ = tiny
    images, requests = batch
    greedy = common.sample(model, tok, requests, images, max_new_tokens=8, temperature=0)
    topk = common.sample(model, tok, requests, images, max_new_tokens=8, temperature=1.5, top_k=1, seed=1)
    nucleus = common.sample(model, tok, requests, images, max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=2)
    assert greedy["tokens"] == topk["tokens"] == nucleus["tokens"]


def test_stops_at_end_token_and_max_new_tokens(tiny, batch):
    model, tok, _ = tiny
    images, requests = batch
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    stops = set(common.stop_ids(tok))

    def quarter(module, inputs, out):  # <|im_end|> at probability 1/4 at every step, whatever the random weights say
        out = out.clone()
        out[..., im_end] = -float("inf")
        out[..., im_end] = out.logsumexp(-1) - np.log(3)
        return out

    hook = model.lm_head.register_forward_hook(quarter)
    try:
        out = common.sample(model, tok, requests, images, n=4, max_new_tokens=5, temperature=1.0, seed=0)
    finally:
        hook.remove()
    ended = [t for t, s in zip(out["tokens"], out["stopped"]) if s]
    cut = [t for t, s in zip(out["tokens"], out["stopped"]) if not s]
    assert len({len(t) for t in ended}) >= 2 and cut  # rows stopped at several lengths, and some ran to the limit
    for t in ended:  # a row ends at its first stop token, which it keeps
        assert t[-1] in stops and not stops & set(t[:-1])
    for t in cut:  # a row that never stopped has exactly max_new_tokens tokens
        assert len(t) == 5 and not stops & set(t)
    assert out["texts"] == tok.batch_decode(out["tokens"], skip_special_tokens=True)
    assert out["num_tokens"] == sum(map(len, out["tokens"]))
    # force a stop: bias the output layer so that <|im_end|> wins everywhere
    bias = torch.zeros(model.config.text_config.vocab_size)
    bias[im_end] = 100.0
    model.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    try:
        out = common.sample(model, tok, requests, images, n=2, max_new_tokens=50, temperature=1.0, seed=0)
    finally:
        model.lm_head._forward_hooks.clear()
    assert out["tokens"] == [[im_end]] * 6 and all(out["stopped"]) and out["texts"] == [""] * 6


# -----------------------------------------------------------------------------
# the shared-prefix decode (one copy of a prompt's KV cache for its n rows) against the old path (shared_prefix=False:
# the prompt copied to each row, decoded through the model's own forward)

def logged_sample(model, *a, **kw):
    """sample's result and the logits each of its tokens was drawn from."""
    seen, real = [], common.next_token
    common.next_token = lambda logits, *b: seen.append(logits.clone()) or real(logits, *b)
    try:
        return common.sample(model, *a, **kw), seen
    finally:
        common.next_token = real


def wide_model(tok):
    """Qwen2.5-VL-7B's attention layout (28 query heads in 4 kv heads of 7, head_dim 128, rope theta 1e6, M-RoPE
    sections 16/24/24) at 2 layers, with a narrow MLP and vision tower and the tiny tokenizer's vocabulary."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tok.convert_tokens_to_ids(t) for t in common.SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=28 * 128, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=4096,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24]),
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], initializer_range=0.02),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=28 * 128,
                           window_size=112, fullatt_block_indexes=[0], initializer_range=0.3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False, initializer_range=0.02)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2_5_VLForConditionalGeneration(config)
    return model.eval()


@pytest.mark.parametrize("shape", ["tiny", "wide"])
def test_shared_prefix_logits_equal_old_path(tiny, batch, shape):
    """The first 8 decode steps' logits (and the prefill's) of every row, in float64 where 1e-5 is far above rounding
    (in fp32 they differ by up to 4e-5 on the tiny model's logits of ~10, each path ~1e-4 from float64): three
    left-padded prompts, images of three sizes, n = 1, 3, 16 rows, sampled so that a request's rows differ."""
    model, tok, _ = tiny
    model = (copy.deepcopy(model) if shape == "tiny" else wide_model(tok)).double()
    images, requests = batch
    images = {k: (pixels.double(), grid) for k, (pixels, grid) in images.items()}
    assert len({len(ids) for ids, _ in requests}) == 3  # left padding on two of them
    kw = dict(n=[1, 3, 16], max_new_tokens=9, temperature=1.0, seed=[1, 2, 3])
    new, seen_new = logged_sample(model, tok, requests, images, **kw)
    old, seen_old = logged_sample(model, tok, requests, images, shared_prefix=False, **kw)
    assert new["tokens"] == old["tokens"] and len(seen_new) == len(seen_old) == 9
    assert len(set(map(tuple, new["tokens"][4:]))) > 1  # the 16 rows of one request went different ways
    worst = max((a - b).abs().max().item() for a, b in zip(seen_new, seen_old))
    print(f"{shape}: largest logit difference over 9 steps x 20 rows {worst:.2e}")
    assert worst <= 1e-5


def test_shared_prefix_samples_equal_old_path(tiny, batch):
    """fp32, top-p / top-k, per-request seeds: the same probabilities to ~1e-6 and the same tokens."""
    model, tok, _ = tiny
    images, requests = batch
    kw = dict(n=[2, 3, 1], max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=[4, 5, 6])
    new, seen_new = logged_sample(model, tok, requests, images, **kw)
    old, seen_old = logged_sample(model, tok, requests, images, shared_prefix=False, **kw)
    assert new["tokens"] == old["tokens"] and new["texts"] == old["texts"] and new["stopped"] == old["stopped"]
    for a, b in zip(seen_new, seen_old):
        torch.testing.assert_close(common.token_probs(a, 1.0, 0.9, 50), common.token_probs(b, 1.0, 0.9, 50),
                                   atol=2e-6, rtol=0)


def test_shared_prefix_greedy_equals_old_path_with_an_empty_request(tiny, batch):
    model, tok, _ = tiny
    images, requests = batch
    kw = dict(n=[2, 0, 3], max_new_tokens=20, temperature=0)
    new = common.sample(model, tok, requests, images, **kw)
    assert new["tokens"] == common.sample(model, tok, requests, images, shared_prefix=False, **kw)["tokens"]
    assert len(new["tokens"]) == 5


def test_kv_cache_holds_the_prompt_once(tiny, batch):
    """n rows of one prompt: prompt + n x room (room: every token fed back, all but the last), where the old path
    holds n x (prompt + room)."""
    model, tok, _ = tiny
    images, requests = batch
    tc = model.config.text_config
    per_token = 2 * tc.num_hidden_layers * tc.num_key_value_heads * (tc.hidden_size // tc.num_attention_heads) * 4
    (ids, keys), M = requests[0], 9
    for n in (1, 4, 16):
        kw = dict(n=n, max_new_tokens=M, temperature=0)
        new = common.sample(model, tok, [(ids, keys)], images, **kw)["kv_bytes"]
        old = common.sample(model, tok, [(ids, keys)], images, shared_prefix=False, **kw)["kv_bytes"]
        assert new == per_token * (len(ids) + n * (M - 1)) and old == per_token * n * (len(ids) + M)


def test_shared_prefix_refuses_sliding_window(tiny, batch):
    model, tok, _ = tiny
    images, requests = batch
    attn = model.model.language_model.layers[1].self_attn
    attn.sliding_window = 16
    try:
        with pytest.raises(ValueError, match="sliding-window attention.*shared_prefix=False"):
            common.sample(model, tok, requests, images, max_new_tokens=2)
    finally:
        attn.sliding_window = None


# -----------------------------------------------------------------------------
# files and helpers

def test_read_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2\n')
    with pytest.raises(ValueError, match=r"x.jsonl:3: malformed JSON"):
        common.read_jsonl(str(path))
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2: expected a JSON object"):
        common.read_jsonl(str(path))


def test_append_and_partial_read_drop_a_torn_line(tmp_path):
    path = str(tmp_path / "log.jsonl")
    common.append_jsonl(path, [{"i": 0}, {"i": 1}])
    with open(path, "a") as f:
        f.write('{"i": 2, "x"')  # a write cut by a kill
    assert common.read_partial_jsonl(path) == [{"i": 0}, {"i": 1}]
    assert common.read_partial_jsonl(str(tmp_path / "none.jsonl")) == []


def test_atomic_write_and_stable_seed(tmp_path):
    path = str(tmp_path / "out.jsonl")
    common.write_jsonl_atomic(path, [{"a": 1}])
    assert common.read_jsonl(path) == [{"a": 1}] and os.listdir(tmp_path) == ["out.jsonl"]
    assert common.stable_seed(0, "img.png", 3) == common.stable_seed(0, "img.png", 3) != common.stable_seed(1, "img.png", 3)


def test_shard_splits_without_overlap():
    items = list(range(10))
    parts = [common.shard(items, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == items and max(map(len, parts)) - min(map(len, parts)) <= 1


# -----------------------------------------------------------------------------
# command lines: shared flag checks and --out

def sampling_parser():
    p = argparse.ArgumentParser(prog="stage")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--limit", type=int, default=None)
    return p


@pytest.mark.parametrize("argv,training,message", [
    (["--temperature", "-1"], False, "--temperature must be at least 0, got -1.0"),
    (["--temperature", "nan"], False, "--temperature must be at least 0, got nan"),
    (["--temperature", "inf"], False, "--temperature must be at least 0, got inf"),
    (["--temperature", "0"], True, "--temperature must be positive for training"),
    (["--temperature", "nan"], True, "--temperature must be positive for training"),
    (["--top-p", "0"], False, r"--top-p must be in \(0, 1\], got 0.0"),
    (["--top-p", "1.5"], False, r"--top-p must be in \(0, 1\], got 1.5"),
    (["--top-p", "nan"], False, r"--top-p must be in \(0, 1\], got nan"),
    (["--top-k", "-3"], False, "--top-k must be at least 0, got -3"),
    (["--max-new-tokens", "0"], False, "--max-new-tokens must be positive, got 0"),
    (["--limit", "-1"], False, "--limit must be positive, got -1"),
])
def test_flag_checks_name_the_flag(argv, training, message, capsys):
    p = sampling_parser()
    args = p.parse_args(argv)
    with pytest.raises(SystemExit) as e:
        common.check_sampling(p, args, training)
        common.check_numbers(p, args, positive=("limit",))
    assert e.value.code == 2 and re.search(message, capsys.readouterr().err)


def test_flag_checks_pass_the_defaults_and_the_edges():
    p = sampling_parser()
    for argv in ([], ["--temperature", "0", "--top-p", "1", "--top-k", "0"], ["--top-p", "1e-9", "--limit", "1"]):
        args = p.parse_args(argv)
        common.check_sampling(p, args)
        common.check_numbers(p, args, positive=("limit",))


def test_check_out_refuses_before_any_work_and_leaves_nothing(tmp_path, capsys):
    p = argparse.ArgumentParser(prog="stage")
    (tmp_path / "labels.jsonl").write_text("{}\n")
    (tmp_path / "model").mkdir()
    cases = [
        (str(tmp_path / "labels.jsonl" / "run"), False, r"labels\.jsonl is a file, not a folder"),
        (str(tmp_path / "labels.jsonl"), False, r"is also an input \(.*labels\.jsonl\)"),
        (str(tmp_path / "model"), True, r"is also an input \(.*model\)"),
        (str(tmp_path / "labels.jsonl"), True, r"labels\.jsonl is a file; expected a folder"),
        (str(tmp_path), False, "is a folder; expected a file name"),
        ("/proc/evoquality/run", True, r"cannot write in /proc \("),
    ]
    for out, directory, message in cases:
        inputs = [str(tmp_path / "labels.jsonl"), str(tmp_path / "model")] if "also" in message else []
        with pytest.raises(SystemExit):
            common.check_out(p, out, inputs=inputs, directory=directory)
        assert re.search(message, capsys.readouterr().err), (out, message)
    common.check_out(p, str(tmp_path / "new" / "deeper" / "votes.jsonl"))  # folders to be made: fine
    common.check_out(p, str(tmp_path / "run"), directory=True)
    assert sorted(os.listdir(tmp_path)) == ["labels.jsonl", "model"]  # the probes are gone, nothing was made


def test_changed_args_lists_each_difference(tmp_path):
    path = str(tmp_path / "args.json")
    common.write_atomic(path, json.dumps(dict(k=2, seed=0, old=True)))
    assert common.changed_args(path, dict(k=4, seed=0, new="x")) == ["--k 2 -> 4", "--new None -> 'x'",
                                                                      "--old True -> None"]
    assert common.changed_args(path, dict(k=2, seed=0, old=True)) == []
