"""
The CPU demo's picture: held-out crops (photographs never trained on), each distortion type's five levels from
best to worst, and under every crop the expected score each model gives it (base, round 1, round 2), so that one
sees what the model learned, and what it did not: a score that falls from left to right has learned that type.

    python toy/sheet.py --out runs/demo      # toy/report.py draws it at its end: runs/demo/sheet.png

Reads <out>/pool/heldout/manifest.jsonl (the crops and their levels) and <out>/eval/<model>/expected.jsonl (the
expected score sum_d d * p(d) of each held-out image, written by toy/report.py). The crops (--refs) are the first
of a grey and of a colour held-out photograph, not picked for how they score; the last column is each model's SRCC
on the row (of the original and its five levels against best-to-worst).
"""
import argparse
import os
import sys

from PIL import Image, ImageDraw, ImageFont
from scipy.stats import spearmanr

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

MODELS = [("base", "base", (110, 110, 110)), ("round1", "round 1", (20, 90, 200)),
          ("round2", "round 2", (200, 60, 20))]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="the demo's folder")
    p.add_argument("--refs", default="camera_0,coffee_0",
                   help="held-out crops to show: the first of a grey and a colour photograph (any of "
                        "<photo>_<i> of the held-out pool; each adds ~85 KB)")
    p.add_argument("--zoom", type=int, default=2, help="pixels per crop pixel (nearest neighbour: noise stays visible)")
    p.add_argument("--sheet", default=None, help="where to write it (default: <out>/sheet.png)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    pool = os.path.join(args.out, "pool", "heldout")
    rows = common.read_jsonl(os.path.join(pool, "manifest.jsonl"))
    scores = {}
    for key, _, _ in MODELS:
        path = os.path.join(args.out, "eval", key, "expected.jsonl")
        if os.path.exists(path):
            scores[key] = {r["image"]: r["expected"] for r in common.read_jsonl(path)}
    if not scores:
        raise ValueError(f"{args.out}/eval/*/expected.jsonl: none found; run toy/report.py --out {args.out} first")
    models = [m for m in MODELS if m[0] in scores]
    refs = args.refs.split(",")
    types = sorted({r["distortion"] for r in rows if r["distortion"]})
    image = {(r["ref"], r["distortion"], r["level"]): r["image"] for r in rows}
    missing = [ref for ref in refs if (ref, None, 0) not in image]
    if missing:
        raise ValueError(f"{pool}/manifest.jsonl: no held-out crop {missing[0]!r}; try one of "
                         f"{sorted({r['ref'] for r in rows})[:8]}")

    font, big = ImageFont.load_default(size=12), ImageFont.load_default(size=15)
    side = args.zoom * Image.open(os.path.join(pool, image[refs[0], None, 0])).width
    cell, label, head, line = side + 8, 170, 86, 15
    row_h = side + line + 10
    sheet = Image.new("RGB", (label + 6 * cell + 110, head + len(refs) * (len(types) * row_h + 10)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((8, 6), "Held-out crops (photographs never trained on) and each model's expected score (1-5) of them:",
              fill="black", font=big)
    x = 8
    for _, name, colour in models:  # the legend: one colour per model, in the order of the numbers under a crop
        draw.text((x, 28), name, fill=colour, font=big)
        x += draw.textlength(name, font=big) + 16
    draw.text((8, 48), "left to right: best to worst (the original, then levels 1-5); right: each model's SRCC "
              "on the row", fill="black", font=font)
    for col, title in enumerate(["original"] + [f"level {n}" for n in range(1, 6)] + ["SRCC"]):
        draw.text((label + col * cell, head - 16), title, fill="black", font=font)
    y = head
    for ref in refs:
        for t in types:
            keys = [image[ref, None, 0]] + [image[ref, t, n] for n in range(1, 6)]
            draw.text((8, y + side // 2 - 14), ref, fill="black", font=font)
            draw.text((8, y + side // 2 + 2), t, fill="black", font=font)
            for col, key in enumerate(keys):
                x = label + col * cell
                crop = Image.open(os.path.join(pool, key)).convert("RGB")
                sheet.paste(crop.resize((side, side), Image.NEAREST), (x, y))
                for m, _, colour in models:
                    draw.text((x, y + side + 2), f"{scores[m][key]:.2f}", fill=colour, font=font)
                    x += (side + 4) // 3
            for n, (m, name, colour) in enumerate(models):  # the row's rank agreement with best-to-worst
                s = [scores[m][k] for k in keys]
                rho = spearmanr(s, range(6, 0, -1))[0] if max(s) > min(s) else float("nan")
                draw.text((label + 6 * cell, y + side // 2 - 22 + n * line), "-" if rho != rho else f"{rho:+.2f}",
                          fill=colour, font=font)
            y += row_h
        y += 10
    path = args.sheet or os.path.join(args.out, "sheet.png")
    # 256 colours (median cut, no dithering): a third of the RGB file's bytes (~170 KB for two crops), no banding on
    # the blurred crops, the noise kept as it is
    sheet.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    print(f"wrote {path}: {len(refs)} held-out crops x {len(types)} types x 5 levels, expected scores of "
          + ", ".join(name for _, name, _ in models))


if __name__ == "__main__":
    common.run_main(main)
