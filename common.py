"""
What the EvoQuality stages share: model loading (a real Qwen2.5-VL checkpoint or the built-in `tiny`
model), the paper's prompts (Table 1), image preprocessing, the hand-written batched KV-cached sampler,
answer parsing, JSONL / checkpoint I/O, the command-line checks every stage shares and torch.distributed helpers.

    python -c "import common; common.load_model('tiny', 'cpu', 'float32')"

common.py imports no stage; every stage imports it.
"""

import contextlib
import itertools
import json
import math
import os
import re
import shutil
import sys
import tempfile
import warnings
import zlib

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageOps
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

# -----------------------------------------------------------------------------
# prompts (paper Table 1, verbatim; `<image>` marks where an image goes)

PROMPTS = {
    "compare": (
        "<image><image> You are performing an image quality assessment task. Compare the two images and "
        "decide which one has better perceptual quality. Answer strictly with the index of the better image: "
        "0 if the first image is better, or 1 if the second image is better."
    ),
    "score": (
        "<image> You are doing the image quality assessment task. Here is the question: What is your overall "
        "rating on the quality of this picture? The rating should be a float between 1 and 5, rounded to two "
        "decimal places, with 1 representing very poor quality and 5 representing excellent quality."
    ),
    "suffix": (
        "You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
        "The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST BE put in "
        "boxed{ }."
    ),
    "compare_labels": ["0", "1"],  # answer naming the first / the second image
}
SYSTEM_PROMPT = "You are a helpful assistant."  # Qwen2.5-VL's chat template default


PROMPTS_FILE = "prompts.json"  # in a checkpoint directory: how the model was asked in training (save_prompts)


def read_prompts(path=None):
    """
    (prompts, think) from the JSON file `path` (--prompts): the paper's prompts with any of the keys of PROMPTS
    overridden, and the file's "think" (true / false: the reasoning suffix on or off), None when it has none.
    """
    prompts = dict(PROMPTS)
    if path is None:
        return prompts, None
    try:
        with open(path) as f:
            override = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read prompts JSON: {e}") from e
    if not isinstance(override, dict):
        raise ValueError(f"{path}: expected a JSON object of prompts, got {type(override).__name__}")
    unknown = set(override) - set(PROMPTS) - {"think"}
    if unknown:
        raise ValueError(f"{path}: unknown prompt keys {sorted(unknown)}; expected some of {sorted(PROMPTS) + ['think']}")
    labels = override.get("compare_labels", prompts["compare_labels"])
    if not (isinstance(labels, list) and len(labels) == 2 and all(isinstance(s, str) and s for s in labels)
            and labels[0] != labels[1]):
        raise ValueError(f"{path}: compare_labels must be two different non-empty strings, got {labels!r}")
    think = override.pop("think", None)
    if think is not None and not isinstance(think, bool):
        raise ValueError(f"{path}: think must be true or false, got {think!r}")
    prompts.update(override)
    return prompts, think


def load_prompts(path=None):
    """The paper's prompts, with any of the keys of PROMPTS overridden by the JSON file `path` (--prompts)."""
    return read_prompts(path)[0]


def save_prompts(out_dir, prompts, think):
    """
    <out_dir>/prompts.json: every prompt a checkpoint was trained with and whether the reasoning suffix was on
    ("think"), a file --prompts reads, so that each stage given the checkpoint asks it as it was taught.
    """
    write_atomic(os.path.join(out_dir, PROMPTS_FILE), json.dumps(dict(prompts, think=think), indent=1) + "\n")


def resolve_prompts(model, path=None, think=None):
    """
    (prompts, think, source) for a stage that asks `model`: --prompts `path` and --think / --no-think `think` win;
    then the checkpoint's own prompts.json (a `model` directory written by train_grpo.py or toy/prepare.py);
    else the paper's Table 1 with the reasoning suffix. `source` says which, in a line for the stage to print.
    """
    saved = os.path.join(model, PROMPTS_FILE) if model != "tiny" and os.path.isdir(model) else None
    files = ([(path, f"--prompts {path}")] if path else []) + \
            ([(saved, f"the checkpoint's {saved}")] if saved and os.path.isfile(saved) else [])
    asked = [(read_prompts(f), name) for f, name in files]  # [((prompts, think or None), where)]
    prompts, where = (asked[0][0][0], asked[0][1]) if asked else (dict(PROMPTS), "the paper's Table 1")
    if think is not None:
        think_from = "from --think" if think else "from --no-think"
    else:  # the first file that says, else the paper
        think, think_from = next(((t, "from the same file" if name == where else f"from {name}")
                                  for (_, t), name in asked if t is not None), (True, "the paper's default"))
    return prompts, think, f"prompts: {where}; reasoning suffix: {'on' if think else 'off'}, {think_from}"


def prompt_text(prompts, task, think=True):
    """The user text of `task` ('compare' or 'score'), with the reasoning suffix when `think`."""
    return prompts[task] + (" " + prompts["suffix"] if think else "")


def chat(prompts, task, grids, think=True):
    """
    Qwen2.5-VL's chat format for one user turn, ready for the assistant's answer. Each `<image>` in the
    prompt becomes <|vision_start|> + one <|image_pad|> per visual token + <|vision_end|>, as the official
    processor expands it; `grids` are the images' (t, h, w) patch grids in prompt order.
    """
    parts = prompt_text(prompts, task, think).split("<image>")
    if len(parts) - 1 != len(grids):
        raise ValueError(f"prompt '{task}' has {len(parts) - 1} <image> slots but {len(grids)} images were given")
    text = parts[0].strip()
    for grid, part in zip(grids, parts[1:]):
        n = int(np.prod(grid)) // 4  # 2x2 patches merge into one visual token
        text += "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>" + part.strip()
    return (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
            f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")


# -----------------------------------------------------------------------------
# answer parsing: the last \boxed{...} (the backslash is optional: the suffix itself says "boxed{ }") or
# <answer>...</answer> block, whichever comes last: VisualQuality-R1 and Q-Insight answer in <answer> tags, so a
# round stacked on them (paper Table 4) parses its own answers. Without the reasoning suffix (--no-think) nothing
# asks for a box, so there a bare answer is the whole completion.

# an <answer> block holds no other <answer>: of nested blocks the innermost counts, an unclosed one counts for nothing
ANSWER = re.compile(r"boxed\{([^{}]*)\}|<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)


def answer(text):
    found = list(ANSWER.finditer(text))
    if not found:
        return text.strip()
    box, block = found[-1].groups()
    return box.strip() if box is not None else answer(block)  # a box inside the block is the answer


def parse_compare(text, labels=("0", "1")):
    """0 if the answer names the first image, 1 the second, None if invalid (the caller counts it)."""
    a = answer(text)
    return labels.index(a) if a in labels else None


def parse_score(text):
    """A float in [1, 5], or None if invalid. Never a substitute value."""
    a = answer(text)
    if not re.fullmatch(r"[+-]?(\d+(\.\d*)?|\.\d+)", a):
        return None
    score = float(a)
    return score if 1.0 <= score <= 5.0 else None


# -----------------------------------------------------------------------------
# images: Qwen2.5-VL's resize rule and patch layout, without the torchvision-based processor

IMAGE_CFG = {  # Qwen2.5-VL's preprocessor_config.json defaults
    "min_pixels": 56 * 56,
    "max_pixels": 28 * 28 * 1280,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}


@contextlib.contextmanager
def image_errors(path):
    """
    What PIL raises on a bad file, as one ValueError naming it. Its decompression-bomb check raises past
    2 x Image.MAX_IMAGE_PIXELS and only warns (without the file's name) between 1x and 2x: a 100-megapixel
    photograph is legitimate, so the warning stays a warning, but names the file.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", Image.DecompressionBombWarning)
        try:
            yield
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise ValueError(f"{path}: cannot read image: {e}") from e
    for w in caught:
        warnings.warn(f"{path}: {w.message}", w.category, stacklevel=3)


def load_image(path):
    """Any PIL-readable file as 8-bit RGB, EXIF orientation applied. Errors name the file."""
    with image_errors(path):
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)  # a loaded copy
        if im.mode.startswith("I"):  # 16-bit grey: convert("RGB") would clip at 255 rather than rescale
            im = Image.fromarray((np.asarray(im, dtype=np.float64) / 257).clip(0, 255).round().astype(np.uint8))
        if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:  # composite on white, not black
            im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
        return im.convert("RGB")


def check_image(path):
    """
    (width, height) from the file's header, nothing decoded: a missing, non-image, header-corrupt or bomb file
    fails here, naming it, before a run starts. 0.07 ms a file (a 512x512 JPEG takes 2.4 ms to decode, a
    1024x768 PNG 28 ms): 20,000 images in about a second. A file cut short after its header passes.
    """
    with image_errors(path), Image.open(path) as im:
        return im.size


def smart_resize(height, width, factor, min_pixels, max_pixels):
    """Qwen2.5-VL's rule: both sides multiples of `factor`, area within [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} is over 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def preprocess_image(image, cfg):
    """PIL RGB image -> (pixel_values [h*w, 3*T*P*P] float32, grid (1, h, w)) in the vision tower's order."""
    p, m, t = cfg["patch_size"], cfg["merge_size"], cfg["temporal_patch_size"]
    h, w = smart_resize(image.height, image.width, p * m, cfg["min_pixels"], cfg["max_pixels"])
    x = np.asarray(image.resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0
    x = (x - np.array(cfg["image_mean"], np.float32)) / np.array(cfg["image_std"], np.float32)
    gh, gw = h // p, w // p
    # (H, W, C) -> merge windows of m x m patches stay contiguous, each patch flattened as (C, T, P, P)
    x = x.reshape(gh // m, m, p, gw // m, m, p, 3).transpose(0, 3, 1, 4, 6, 2, 5)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))  # a still image fills T frames
    return torch.from_numpy(np.ascontiguousarray(x).reshape(gh * gw, 3 * t * p * p)), (1, gh, gw)


# -----------------------------------------------------------------------------
# the tiny model: Qwen2.5-VL's architecture at toy size, with a byte-level BPE tokenizer built in code

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, vision_depth=2, vision_hidden=32, merges=400)
# Wider than a real model's 0.02: with near-uniform attention a wrong rope position or mask would barely move the
# logits, and the equivalence tests against transformers' generate could not see it.
INIT_STD = 0.3


def tiny_tokenizer():
    """Byte-level BPE (Qwen's pre-tokenizer: single digits) whose merges are learned from our own prompts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    corpus = [prompt_text(PROMPTS, "compare"), prompt_text(PROMPTS, "score"), SYSTEM_PROMPT,
              "<think> </think> \\boxed{0} \\boxed{1} \\boxed{3.25} user assistant system"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=256 + TINY["merges"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=[])
    bpe.train_from_iterator(corpus, trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    tok = Qwen2Tokenizer(vocab=state["vocab"], merges=merges)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
    return tok


def tiny_model(tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = TINY["hidden"] // TINY["heads"]
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=TINY["hidden"], intermediate_size=TINY["ffn"],
                         num_hidden_layers=TINY["layers"], num_attention_heads=TINY["heads"],
                         num_key_value_heads=TINY["kv_heads"], max_position_embeddings=4096,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                              mrope_section=[head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]),
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], initializer_range=INIT_STD),
        vision_config=dict(depth=TINY["vision_depth"], hidden_size=TINY["vision_hidden"],
                           intermediate_size=2 * TINY["vision_hidden"], num_heads=2, out_hidden_size=TINY["hidden"],
                           window_size=112, fullatt_block_indexes=[TINY["vision_depth"] - 1],
                           initializer_range=INIT_STD),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        initializer_range=INIT_STD,
    )
    with torch.random.fork_rng(devices=[]):  # same weights every time, global RNG untouched
        torch.manual_seed(0)
        model = Qwen2_5_VLForConditionalGeneration(config)
    return model


def load_model(spec, device="cpu", dtype=None, attn="sdpa"):
    """
    (model, tokenizer, image_cfg) for `spec`: 'tiny', a local checkpoint directory (e.g. one written by
    train_grpo.py) or a hub id of a Qwen2.5-VL checkpoint. dtype defaults to bf16 on CUDA, fp32 on CPU; "auto"
    keeps the checkpoint's own, memory-mapped (its pages are read as its tensors are used). On the "meta" device
    no weight is read: the model has its shapes only (policy.py fills such a model on each rank from one read).
    """
    from transformers import AutoConfig, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    device = torch.device(device)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    image_cfg = dict(IMAGE_CFG)
    if spec == "tiny":
        tokenizer = tiny_tokenizer()
        with torch.device("meta") if device.type == "meta" else contextlib.nullcontext():
            model = tiny_model(tokenizer)
        model.to(dtype=None if dtype == "auto" else dtype)
        model.config._attn_implementation = attn
        image_cfg.update(min_pixels=56 * 56, max_pixels=224 * 224)
    else:
        looks_local = spec.startswith((".", "/", "~")) or spec.count("/") != 1 or os.path.exists(spec)  # hub: org/name
        if looks_local and not os.path.isdir(spec):
            raise ValueError(f"model '{spec}': no such directory; expected 'tiny', a Qwen2.5-VL checkpoint "
                             f"directory or a hub id like Qwen/Qwen2.5-VL-7B-Instruct")
        try:
            config = AutoConfig.from_pretrained(spec)
        except (OSError, ValueError) as e:
            raise ValueError(f"model '{spec}': cannot load a config ({e}); expected 'tiny', a Qwen2.5-VL "
                             f"checkpoint directory or a hub id like Qwen/Qwen2.5-VL-7B-Instruct") from e
        if config.model_type != "qwen2_5_vl":
            raise ValueError(f"model '{spec}': config model_type is '{config.model_type}', expected 'qwen2_5_vl'")
        from safetensors import SafetensorError

        if device.type == "meta":
            with torch.device("meta"):
                model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=attn)
        else:
            try:
                model = Qwen2_5_VLForConditionalGeneration.from_pretrained(spec, dtype=dtype, attn_implementation=attn)
            except (OSError, ValueError, SafetensorError) as e:  # a truncated or garbage model.safetensors among them
                raise ValueError(f"model '{spec}': cannot load its weights: {e}") from e
        tokenizer = AutoTokenizer.from_pretrained(spec)
        with contextlib.suppress(OSError, json.JSONDecodeError):  # checkpoints carry their own pixel limits
            from transformers.utils import cached_file
            with open(cached_file(spec, "preprocessor_config.json")) as f:
                pre = json.load(f)
            image_cfg.update({k: pre[k] for k in IMAGE_CFG if k in pre})
            image_cfg.update({k: pre["size"][s] for k, s in (("min_pixels", "shortest_edge"),
                                                            ("max_pixels", "longest_edge")) if s in pre.get("size", {})})
    # from_pretrained has built the weights in `dtype` and kept the rotary inv_freq buffers in fp32 (a .to(dtype)
    # would round them to bf16 and shift every rotary phase by up to 0.4%): move, don't cast
    model.to(device=device).eval()
    check_finite_weights(model, spec)
    return model, tokenizer, image_cfg


def check_finite_weights(model, spec):
    """
    NaN or inf weights (a run that diverged) would otherwise surface as a sampler error naming no model. One sum
    per tensor, one sync: 0.11 (fp32) to 0.24 (bf16) s per GB on one CPU thread, ~4 s for 7B in bf16, less than
    reading it; on a GPU one pass at memory bandwidth. A finite tensor's sum cannot overflow fp32 / bf16 at any real
    weight scale.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.device.type != "meta"]
    if not named:
        return
    sums = [p.detach().sum(dtype=torch.float32 if p.dtype == torch.float16 else None).float() for _, p in named]
    finite = torch.stack(sums).isfinite().tolist()  # fp16 sums in fp32: 65,504 is a reachable sum
    bad = [n for (n, _), ok in zip(named, finite) if not ok]
    if bad:
        raise ValueError(f"model '{spec}': {len(bad)} of {len(named)} weight tensors hold NaN or inf, e.g. "
                         f"{', '.join(bad[:3])}: the checkpoint of a diverged run?")


def save_checkpoint(model, tokenizer, image_cfg, out_dir):
    """A Hugging Face model directory (config, safetensors, tokenizer, pixel limits), written atomically."""
    tmp = out_dir.rstrip("/") + ".tmp"
    if os.path.isdir(tmp):
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    pre = {k: image_cfg[k] for k in IMAGE_CFG} | {"size": {"shortest_edge": image_cfg["min_pixels"],
                                                            "longest_edge": image_cfg["max_pixels"]}}
    with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
        json.dump(pre, f, indent=2)
    if os.path.isdir(out_dir):  # replace an older save of the same step
        os.rename(out_dir, out_dir.rstrip("/") + ".old")
        shutil.rmtree(out_dir.rstrip("/") + ".old")
    os.rename(tmp, out_dir)


# -----------------------------------------------------------------------------
# model inputs: token ids, explicit 3-D (M-RoPE) positions, image embeddings

def encode_prompt(tokenizer, prompts, task, grids, think=True):
    """Token ids of one chat prompt with its images' placeholders expanded."""
    return tokenizer.encode(chat(prompts, task, grids, think=think), add_special_tokens=False)


def rope_positions(ids, grids, image_token_id, merge_size=2):
    """
    Qwen2.5-VL's 3-D positions (3, len) of one unpadded prompt: text tokens advance all three axes
    together; an image's tokens take (t, row, col) offsets from the position where the image starts, and the
    text after it resumes at that start + max(rows, cols). Also returns the next free position.
    """
    pos = torch.empty(3, len(ids), dtype=torch.long)
    i, start, grids = 0, 0, iter(grids)
    for is_img, run in itertools.groupby(torch.as_tensor(ids).eq(image_token_id).tolist()):
        n = len(list(run))
        if is_img:  # <|vision_start|> / <|vision_end|> wrap every image, so a run is one image
            t, h, w = next(grids)
            h, w = h // merge_size, w // merge_size
            if n != t * h * w:
                raise ValueError(f"{n} image tokens where a {t}x{h * merge_size}x{w * merge_size} grid needs {t * h * w}")
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            pos[:, i:i + n] = torch.stack([tt, hh, ww]).reshape(3, n) + start
            start += max(h, w)
        else:
            pos[:, i:i + n] = torch.arange(start, start + n)
            start += n
        i += n
    return pos, start


def encode_images(model, images, keys):
    """Vision-tower embeddings of each distinct key, once however often it appears: {key: (tokens, hidden)}."""
    keys = list(dict.fromkeys(keys))
    if not keys:
        return {}
    device = model.device
    pixels = torch.cat([images[k][0] for k in keys]).to(device=device, dtype=model.model.visual.dtype)
    grid = torch.tensor([images[k][1] for k in keys], device=device)
    out = model.model.get_image_features(pixels, grid)
    return dict(zip(keys, out.pooler_output))


def embed(model, ids, image_embeds, image_mask=None):
    """
    Token embeddings with the image slots replaced by the images' embeddings in order. The slots default
    to every <|image_pad|>; pass `image_mask` when ids hold completions, which may contain that token too.
    """
    x = model.model.get_input_embeddings()(ids)
    if image_embeds:
        mask = ids == model.config.image_token_id if image_mask is None else image_mask
        x = x.masked_scatter(mask.unsqueeze(-1), torch.cat(image_embeds).to(x.dtype))
    return x


def batch_inputs(model, requests, images, image_embeds=None, pad_id=0):
    """
    Left-padded batch of requests [(ids, image_keys)]: inputs_embeds, attention mask, 3-D positions, and
    each row's next free position. Padding positions are 0 (masked anyway).
    """
    device = model.device
    merge = model.config.vision_config.spatial_merge_size
    if image_embeds is None:
        image_embeds = encode_images(model, images, [k for _, keys in requests for k in keys])
    L = max(len(ids) for ids, _ in requests)
    B = len(requests)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    pos = torch.zeros(3, B, L, dtype=torch.long)
    next_pos = torch.zeros(B, dtype=torch.long)
    for b, (row, keys) in enumerate(requests):
        n = len(row)
        ids[b, L - n:] = torch.as_tensor(row)
        mask[b, L - n:] = 1
        pos[:, b, L - n:], next_pos[b] = rope_positions(row, [images[k][1] for k in keys],
                                                        model.config.image_token_id, merge)
    ids = ids.to(device)
    x = embed(model, ids, [image_embeds[k] for _, keys in requests for k in keys])
    return x, mask.to(device), pos.to(device), next_pos.to(device)


# -----------------------------------------------------------------------------
# the sampler: batched prefill, one prefill and one copy of its KV cache shared by the n samples of a prompt,
# KV-cached decode

def stop_ids(tokenizer):
    return sorted({tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")} |
                  ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))


def token_probs(logits, temperature, top_p=1.0, top_k=0):
    """The sampler's next-token distribution: one-hot on the argmax at temperature 0, else softmax(logits / T)
    restricted to the top-k tokens and to the smallest set whose mass reaches top_p."""
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -float("inf"))
    return logits.softmax(-1)


def next_token(logits, temperature, top_p, top_k, generators, counts):
    """Greedy at temperature 0, else a draw from token_probs. generators[i] draws for the next counts[i] rows, so
    a request's samples depend on its own seed only."""
    if not logits.isfinite().all():  # weights that diverged in training, or overflow: argmax and multinomial would
        # return garbage or fail deep inside torch without naming the cause. A host sync, the second per token (before
        # multinomial, which on CUDA would hit a device-side assert): small beside the step's forward
        raise FloatingPointError("the model's next-token logits hold NaN or inf (diverged or overflowing weights)")
    if temperature == 0:
        return logits.argmax(-1)
    probs = token_probs(logits, temperature, top_p, top_k)
    if len(generators) == 1:
        return torch.multinomial(probs, 1, generator=generators[0]).squeeze(-1)
    return torch.cat([torch.multinomial(p, 1, generator=g).squeeze(-1)
                      for p, g in zip(probs.split(counts), generators)])


class DecodeLayer(DynamicLayer):
    """
    One layer's KV cache while decoding: the prompt's keys/values copied to each sample's row, in a buffer with
    room for `room` more tokens that are written in place (DynamicLayer's torch.cat copies the whole cache at every
    token: 80% of a CPU decode's time in bench.py before this).
    """

    def __init__(self, layer, rows, room):
        super().__init__()
        k, v = layer.keys[rows], layer.values[rows]
        self.length = k.shape[-2]
        self.k, self.v = (x.new_empty(*x.shape[:2], self.length + room, x.shape[-1]) for x in (k, v))
        self.k[:, :, :self.length], self.v[:, :, :self.length] = k, v
        self.keys, self.values = k, v
        self.device, self.is_initialized = k.device, True

    def update(self, key_states, value_states, *args, **kwargs):
        n = key_states.shape[-2]
        self.k[:, :, self.length:self.length + n] = key_states
        self.v[:, :, self.length:self.length + n] = value_states
        self.length += n
        self.keys, self.values = self.k[:, :, :self.length], self.v[:, :, :self.length]
        return self.keys, self.values


class PrefixCache:
    """
    The KV cache of a shared-prefix decode: each request's prompt keys/values once, as prefill left them
    ([requests, kv_heads, L, head_dim] per layer, never copied), and each row's own generated tokens in a buffer
    preallocated for `room` tokens and written in place ([rows * kv_heads, room, head_dim]: a step's tokens 0..t are
    then a view that the attention's batched matmul reads in place, not a copy).
    """

    def __init__(self, cache, mask, counts, room):
        self.prompt = [(layer.keys, layer.values) for layer in cache.layers]
        k = self.prompt[0][0]
        B, H, L, D = k.shape
        # the prompt part runs all rows of a request at once, padded to the largest n: row r sits at slot[r]
        self.n = max(counts)
        self.slot = torch.tensor([b * self.n + j for b, c in enumerate(counts) for j in range(c)], device=k.device)
        pad = torch.zeros(B, 1, L, dtype=k.dtype, device=k.device).masked_fill(mask[:, None] == 0, -float("inf"))
        self.pad = pad.repeat_interleave(H, dim=0)  # [B * H, 1, L]: the left padding, for every head and query
        R = sum(counts)
        self.rows = [(k.new_empty(R * H, room, D), v.new_empty(R * H, room, D)) for k, v in self.prompt]

    def nbytes(self):
        return sum(x.nbytes for kv in self.prompt + self.rows for x in kv)


def attention_part(scores, v):
    """Softmax attention over one part of the keys: (softmax(scores) @ v, logsumexp(scores)). The scores come in the
    model's dtype and the softmax runs in fp32 at least, as in transformers' eager attention."""
    s = scores.to(torch.promote_types(scores.dtype, torch.float32))
    lse = s.logsumexp(-1, keepdim=True)
    return torch.bmm((s - lse).exp().to(v.dtype), v).to(s.dtype), lse


def shared_prefix_attention(cache, i, q, k, v, t, scaling):
    """
    Layer i's exact softmax attention of each row over [its request's prompt ; its own tokens 0..t], the two parts
    computed apart and merged by their log-sum-exp (FlashAttention's split-KV merge, cascade / Hydragen attention).
    q [R, kv_heads, G, D] (the G query heads of each kv head), k, v [R, kv_heads, D]: the row's token t, which goes
    into its buffer first. Returns [R, kv_heads, G, D] in fp32 at least.
    """
    (pk, pv), (rk, rv) = cache.prompt[i], cache.rows[i]
    B, H, L, D = pk.shape
    R, _, G, _ = q.shape
    N = cache.n
    rk[:, t], rv[:, t] = k.reshape(R * H, D), v.reshape(R * H, D)
    # the prompt part: a request's rows and query heads are the queries of one matmul against ONE copy of its keys
    qp = q.new_zeros(B * N, H, G, D)
    qp[cache.slot] = q
    qp = qp.view(B, N, H, G, D).transpose(1, 2).reshape(B * H, N * G, D)
    scores = torch.baddbmm(cache.pad, qp, pk.view(B * H, L, D).transpose(1, 2), alpha=scaling)
    o1, lse1 = (x.view(B, H, N, G, -1).transpose(1, 2).reshape(B * N, H, G, -1)[cache.slot]
                for x in attention_part(scores, pv.view(B * H, L, D)))
    # the rows' own part
    scores = torch.bmm(q.reshape(R * H, G, D), rk[:, :t + 1].transpose(1, 2)) * scaling
    o2, lse2 = (x.view(R, H, G, -1) for x in attention_part(scores, rv[:, :t + 1]))
    lse = torch.logaddexp(lse1, lse2)
    return o1 * (lse1 - lse).exp() + o2 * (lse2 - lse).exp()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def decode_step(model, cache, tok, pos, t):
    """
    One token per row (its t-th generated token, at position pos) through the language model's own modules, called
    as modules (so FSDP's unsharded and any wrapped linears are the ones used): embed, per layer RMSNorm, q/k/v,
    rotary, attention over the PrefixCache, o_proj, residual, RMSNorm, MLP, residual; final norm, lm_head.
    Returns the rows' next-token logits [R, vocab] in fp32.
    """
    lm = model.model.language_model
    x = model.model.get_input_embeddings()(tok)  # [R, hidden]
    R = x.shape[0]
    # the model's rotary module at (pos, pos, pos): in decode the three M-RoPE axes are equal, so every section
    # rotates by the same position and this is plain rotary over the whole head_dim
    cos, sin = lm.rotary_emb(x, pos.view(1, R, 1).expand(3, R, 1))  # [R, 1, head_dim]
    for i, layer in enumerate(lm.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q, k, v = (proj(h).view(R, -1, attn.head_dim) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        o = shared_prefix_attention(cache, i, q.view(R, k.shape[1], -1, attn.head_dim), k, v, t, attn.scaling)
        x = x + attn.o_proj(o.to(x.dtype).reshape(R, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(lm.norm(x)).float()


def check_shared_prefix(model):
    """decode_step implements full causal attention with rotary positions only: refuse what it does not."""
    tc = model.config.text_config
    if any(t != "full_attention" for t in getattr(tc, "layer_types", None) or ["full_attention"]) or \
            any(layer.self_attn.sliding_window is not None for layer in model.model.language_model.layers):
        raise ValueError("sample(shared_prefix=True): the model uses sliding-window attention, which the shared-prefix "
                         "decode step does not implement; pass shared_prefix=False")


@torch.no_grad()
def prefill(model, requests, images, pad_id=0):
    """One forward over the left-padded prompts: (last-position logits [B, V], cache, mask, next positions)."""
    x, mask, pos, next_pos = batch_inputs(model, requests, images, pad_id=pad_id)
    cache = DynamicCache(config=model.config.text_config)
    out = model(inputs_embeds=x, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                logits_to_keep=1)
    return out.logits[:, -1].float(), cache, mask, next_pos


@torch.no_grad()
def sample(model, tokenizer, requests, images, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, top_k=0,
           seed=0, shared_prefix=True):
    """
    Complete each request (ids, image_keys) n times; `images` maps a key to (pixel_values, grid).
    n is an int or one count per request. `seed` is one int for the whole call, or one per request, which
    makes a request's samples independent of what else is in the batch (resume, sharding across ranks). The prompt,
    images included, is encoded once per request, and its KV cache is kept once and shared by its n rows
    (decode_step); shared_prefix=False copies it to each of the n rows and decodes through the model's forward (the
    old path, kept as the oracle). Rows come out request by request. Returns dict(tokens: generated ids per row up
    to and including the stop token, texts, stopped: whether each row ended with a stop token, num_tokens: total
    generated tokens, kv_bytes: the bytes the KV cache holds while decoding).
    """
    device = model.device
    counts = torch.as_tensor([n] * len(requests) if isinstance(n, int) else list(n), dtype=torch.long)
    if shared_prefix:
        check_shared_prefix(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids(tokenizer)[0]
    logits, cache, mask, next_pos = prefill(model, requests, images, pad_id=pad)
    rows = torch.repeat_interleave(torch.arange(len(requests)), counts).to(device)
    if shared_prefix:  # room for every token fed back: all but the last
        cache = PrefixCache(cache, mask, counts.tolist(), max(max_new_tokens - 1, 0))
        kv_bytes = cache.nbytes()
    else:
        cache = Cache(layers=[DecodeLayer(layer, rows, max_new_tokens) for layer in cache.layers])
        kv_bytes = sum(layer.k.nbytes + layer.v.nbytes for layer in cache.layers)
    logits, mask, next_pos = logits[rows], mask[rows], next_pos[rows]
    R, L = mask.shape
    seeds = [seed] if isinstance(seed, int) else list(seed)
    if len(seeds) not in (1, len(requests)):
        raise ValueError(f"sample: {len(seeds)} seeds for {len(requests)} requests")
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    counts = counts.tolist() if len(seeds) > 1 else [len(rows)]
    stops = torch.tensor(stop_ids(tokenizer), device=device)
    out = torch.full((R, max_new_tokens), pad, dtype=torch.long, device=device)
    mask = torch.cat([mask, torch.ones(R, max_new_tokens, dtype=mask.dtype, device=device)], dim=1)
    done = torch.zeros(R, dtype=torch.bool, device=device)
    steps = 0
    for t in range(max_new_tokens):
        tok = next_token(logits, temperature, top_p, top_k, generators, counts)
        tok = torch.where(done, pad, tok)
        out[:, t] = tok
        done = done | torch.isin(tok, stops)
        steps = t + 1
        if t + 1 == max_new_tokens or bool(done.all()):  # a sync per token (next_token's check is the other): all stopped?
            break
        if shared_prefix:
            logits = decode_step(model, cache, tok, next_pos + t, t)
        else:
            pos = (next_pos + t).view(1, R, 1).expand(3, R, 1)
            x = model.model.get_input_embeddings()(tok[:, None])
            logits = model(inputs_embeds=x, attention_mask=mask[:, :L + t + 1], position_ids=pos, cache=cache,
                           use_cache=True).logits[:, -1].float()
    out = out[:, :steps].tolist()
    stop_set = set(stop_ids(tokenizer))
    tokens, stopped = [], []
    for row in out:
        end = next((i for i, tk in enumerate(row) if tk in stop_set), None)
        tokens.append(row if end is None else row[:end + 1])
        stopped.append(end is not None)
    texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
    return dict(tokens=tokens, texts=texts, stopped=stopped, num_tokens=sum(len(t) for t in tokens),
                kv_bytes=kv_bytes)


# -----------------------------------------------------------------------------
# files: JSONL with line numbers in errors, incremental append, atomic writes

def read_jsonl_lines(path):
    """[(line number, object)] of a JSONL file, blank lines skipped, so that later errors can name the line."""
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: malformed JSON line: {e.msg}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
            rows.append((i, row))
    return rows


def read_jsonl(path):
    return [row for _, row in read_jsonl_lines(path)]


def append_jsonl(path, rows):
    """Append and flush to disk, so a killed run keeps every finished row."""
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_partial_jsonl(path):
    """Rows of a file that `append_jsonl` may have been writing when killed: a torn last line is dropped."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines[:-1], 1):  # the piece after the last newline is an unfinished write
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: malformed JSON line: {e.msg}") from None
    return rows


def drop_torn_tail(path):
    """Cut the unfinished last line a kill may leave in a file being appended to, before appending again."""
    if os.path.exists(path):
        with open(path, "rb+") as f:
            f.truncate(f.read().rfind(b"\n") + 1)


def write_atomic(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_jsonl_atomic(path, rows):
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def stable_seed(*parts):
    """A seed from strings/ints that is the same in every process and run (unlike Python's hash())."""
    return zlib.crc32("\x1f".join(map(str, parts)).encode())


# -----------------------------------------------------------------------------
# command lines: the range checks every stage's argparse shares, --out checked before any work, and the arguments
# a rerun must repeat

def check_numbers(parser, args, positive=(), nonnegative=()):
    """parser.error naming the flag whose value is out of range. NaN and inf are never in range."""
    for name in (*positive, *nonnegative):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and (value > 0 if name in positive else value >= 0)):
            parser.error(f"--{name.replace('_', '-')} must be {'positive' if name in positive else 'at least 0'}, "
                         f"got {value}")


def check_sampling(parser, args, training=False):
    """
    The sampler's flags: temperature >= 0 (0 is greedy), or > 0 for training, where GRPO needs sampled rollouts
    and the log-probs divide by it; top-p in (0, 1]; top-k >= 0 (0: off); max-new-tokens >= 1.
    """
    if training and not args.temperature > 0:
        parser.error(f"--temperature must be positive for training (GRPO samples its rollouts, and its log-probs "
                     f"divide by the temperature), got {args.temperature}")
    check_numbers(parser, args, positive=("max_new_tokens",), nonnegative=("temperature", "top_k"))
    if not 0 < args.top_p <= 1:  # NaN fails too
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")


def check_out(parser, out, inputs=(), directory=False):
    """
    parser.error unless `out` (a file, or a folder if `directory`) can be written: not one of `inputs`, not under
    a file, and its nearest existing folder takes a new entry. That is probed (a folder made and removed at once):
    os.access says yes to root in /proc, and knows nothing of read-only mounts. Nothing is left behind.
    """
    path = os.path.realpath(out)
    for given in inputs:
        if given and os.path.exists(given) and os.path.realpath(given) == path:
            parser.error(f"--out {out} is also an input ({given}); choose another --out")
    if os.path.exists(path) and os.path.isdir(path) != directory:
        parser.error(f"--out {out} is {'a file' if directory else 'a folder'}; expected "
                     f"{'a folder' if directory else 'a file name'}")
    parent = path if os.path.isdir(path) else os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        parser.error(f"--out {out}: {parent} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".out-check-"))
    except OSError as e:
        parser.error(f"--out {out}: cannot write in {parent} ({e.strerror})")


def changed_args(path, record):
    """How the arguments `record` differ from those saved in the JSON file `path`: ['--k 2 -> 4', ...]."""
    with open(path) as f:
        old = json.load(f)
    return [f"--{k.replace('_', '-')} {old.get(k)!r} -> {record.get(k)!r}"
            for k in sorted(set(old) | set(record)) if old.get(k) != record.get(k)]


# -----------------------------------------------------------------------------
# distributed: torchrun-aware set-up, rank-0 printing, splitting work

def dist_setup():
    """(rank, world_size, device). Under torchrun: a process group (nccl on CUDA, gloo on CPU)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return rank, world, device


def dist_exit():
    """
    A stage's last call. Under torchrun: wait for every rank, tear the process group down, and end the process
    here, skipping interpreter teardown. FSDP's DTensor caches keep the gloo group and its worker threads alive past
    destroy_process_group, and rarely (1 of ~200 2-rank CPU runs here, and once in CI) a rank with all its work
    done then died in teardown with SIGABRT, "terminate called without an active exception". Files are closed.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def shard(items, rank, world):
    """This rank's share of `items`: every world-th item, so shares differ in size by at most one."""
    return items[rank::world]


def run_main(main):
    """
    A script's entry point: bad input ends in one line (the ValueError our code raises naming the file and line, a
    missing or unreadable file), not a traceback. An error raised inside a library keeps its traceback: a bug to debug.
    """
    try:
        main()
    except (ValueError, OSError) as e:
        tb = e.__traceback__
        while tb.tb_next:
            tb = tb.tb_next
        root = os.path.dirname(os.path.abspath(__file__))  # our scripts: the stages, common.py, toy/
        if os.path.dirname(os.path.abspath(tb.tb_frame.f_code.co_filename)) not in (root, os.path.join(root, "toy")):
            raise
        where = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename and e.strerror else e
        sys.exit(f"{os.path.basename(sys.argv[0])}: error: {where}")
