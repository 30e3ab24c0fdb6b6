#!/usr/bin/env bash
# The CPU demo. For now a smoke run: the built-in tiny model scores one generated image with the paper's prompt.
set -euo pipefail
cd "$(dirname "$0")"
python - <<'PY'
import numpy as np
from PIL import Image
import common

model, tok, cfg = common.load_model("tiny", "cpu", "float32")
img = Image.fromarray(np.uint8(np.linspace(0, 255, 112 * 112 * 3).reshape(112, 112, 3)))
images = {"img": common.preprocess_image(img, cfg)}
ids = common.encode_prompt(tok, common.PROMPTS, "score", [images["img"][1]])
out = common.sample(model, tok, [(ids, ["img"])], images, n=4, max_new_tokens=32, temperature=1.0, seed=0)
for text in out["texts"]:
    print(repr(text), "->", common.parse_score(text))
PY
