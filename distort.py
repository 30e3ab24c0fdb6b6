"""
Stage 1 of EvoQuality: synthetic distortions of unlabelled images (paper Sec. 4.1, "following You et al. 2024").

Each original gets 10 variants, each of a distinct type drawn from 35 and a random severity 1-5. Round 2 of
the evolution votes on pairs of variants of the same original.

    python distort.py --input photos/ --out pool/ --variants 10 --seed 0       # the paper's pool
    python distort.py --input 'photos/**/*.jpg' --out pool/ --workers 8        # a glob; 8 processes
    python distort.py --input koniq.jsonl --out pool/ --max-side 1024          # a manifest; its fields are kept
    python distort.py --input photos/ --out grid/ --variants 35 --all-levels   # KADID-like: every type x level
    python distort.py --input photo.jpg --sheet sheet.png                      # look at the suite: 35 x 5
    python distort.py --bench                                                  # seconds per type, 1024x768

photos/ (or photo.jpg, koniq.jsonl) is your own unlabelled images: the paper's are KonIQ-10k's 10,073 photographs
(koniq10k_1024x768.zip from its authors; no label is used). Without any, toy/prepare.py (demo.sh) cuts a pool from
the photographs that ship inside scikit-image.

Output: `<out>/<ref>.png` (the original, decoded to 8-bit RGB, upright, resized only by --max-side, so every
image of the pool went through the same decoder) and `<out>/<ref>__<type>_<level>.png` per variant, plus
`<out>/manifest.jsonl`, one line per image: image (relative to the manifest), ref, distortion (null for the
original), level (0 for the original), source (authentic | synthetic). The input manifest's other fields
(e.g. mos) go on the original's line only: a score of the original is not a score of its variants.
`ref` is the input's path relative to the input folder (or the common folder of a glob or manifest) without
its extension, or the input manifest's own `ref`. A rerun skips every output already on disk; `<out>/args.json`
records the arguments that shape the pool, and a rerun with other ones (a new --max-side, seed, ...) is refused.
`--out` may not lie inside `--input`, nor hold any input.
"""
import argparse
import glob
import io
import json
import multiprocessing
import os
import time
import zlib

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features
from scipy import ndimage, signal
from tqdm import tqdm

from common import changed_args, check_numbers, check_out, load_image, read_jsonl_lines, write_atomic, write_jsonl_atomic


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # data
    p.add_argument('--input', help='a folder (recursive), a glob, or a .jsonl manifest with an "image" field')
    p.add_argument('--max-side', type=int, default=None,
                   help='resize so the longer side is at most this (default: keep the resolution; the sheet: 256)')
    # distortions
    p.add_argument('--variants', type=int, default=10, help='distinct types per original (paper: 10 of 35)')
    p.add_argument('--types', default=None, help='comma-separated types to draw from (default: all 35)')
    p.add_argument('--all-levels', action='store_true',
                   help='every chosen type at all five levels instead of one random level (KADID-like grid)')
    p.add_argument('--seed', type=int, default=0, help='output is identical for the same seed, whatever --workers')
    # output
    p.add_argument('--out', help='output folder: PNGs plus manifest.jsonl')
    p.add_argument('--workers', type=int, default=os.cpu_count(), help='processes')
    p.add_argument('--sheet', default=None, help='write a labelled contact sheet of the first input (35 x 5) here')
    p.add_argument('--bench', action='store_true', help='print seconds per type on a 1024x768 image and exit')
    args = p.parse_args(argv)
    args.types = args.types.split(',') if args.types else list(DISTORTIONS)
    unknown = sorted(set(args.types) - set(DISTORTIONS))
    if unknown:
        p.error(f'unknown types {unknown}; known: {", ".join(DISTORTIONS)}')
    if not args.bench and not args.input:
        p.error('--input is required')
    if not (args.bench or args.sheet or args.out):
        p.error('--out is required')
    check_numbers(p, args, positive=('max_side', 'workers'), nonnegative=('variants', 'seed'))
    if args.sheet and not args.bench:
        check_out(p, args.sheet, inputs=[args.input])
    elif args.out and not args.bench:
        check_out(p, args.out, inputs=[args.input], directory=True)
        if os.path.isdir(args.input) and not os.path.relpath(os.path.realpath(args.out),
                                                             os.path.realpath(args.input)).startswith('..'):
            p.error(f'--out {args.out} is inside --input {args.input}: a rerun would take its outputs for originals')
    return args


# -----------------------------------------------------------------------------
# distortions: float32 HxWx3 in [0, 1], one severity parameter, a seeded numpy Generator -> float HxWx3
# (clipped once, in distort). The parameters are the published ones; the code is ours.

def _to_uint8(x):
    return np.clip(np.round(x * 255), 0, 255).astype(np.uint8)


def _pil(x):
    return Image.fromarray(_to_uint8(x))


def _arr(im):
    return np.asarray(im.convert('RGB'), dtype=np.float32) / 255


def _roundtrip(x, fmt, **save_args):
    buf = io.BytesIO()
    _pil(x).save(buf, fmt, **save_args)
    return _arr(Image.open(io.BytesIO(buf.getvalue())))


def _gaussian(x, sigma, truncate=4.0):
    return ndimage.gaussian_filter(x, (sigma, sigma, 0), mode='reflect', truncate=truncate)


def _convolve(x, kernel):
    # FFT: the motion kernels reach 81x81, far too wide for a direct convolution within a second
    ry, rx = kernel.shape[0] // 2, kernel.shape[1] // 2
    padded = np.pad(x, ((ry, ry), (rx, rx), (0, 0)), mode='reflect')
    return signal.fftconvolve(padded, kernel[:, :, None].astype(np.float32), mode='valid', axes=(0, 1))


def _jitter(x, shift, rng):
    # Each pixel takes a random neighbour within `shift`: the published version swaps pixels one by one in a
    # Python loop; a single gather gives the same scrambled look without it.
    h, w = x.shape[:2]
    ys = np.clip(np.arange(h)[:, None] + rng.integers(-shift, shift + 1, (h, w)), 0, h - 1)
    xs = np.clip(np.arange(w)[None, :] + rng.integers(-shift, shift + 1, (h, w)), 0, w - 1)
    return x[ys, xs]


def blur_gaussian(x, sigma, rng):
    return _gaussian(x, sigma)


def blur_motion(x, p, rng):
    radius, sigma = p
    # a one-sided Gaussian trail of 2*radius+1 taps: the sharp copy stays brightest, as in a camera shake
    angle = rng.uniform(-np.pi / 2, np.pi / 2)
    steps = np.arange(2 * radius + 1)
    kernel = np.zeros((4 * radius + 1, 4 * radius + 1))
    rows = 2 * radius + np.round(steps * np.sin(angle)).astype(int)
    cols = 2 * radius + np.round(steps * np.cos(angle)).astype(int)
    np.add.at(kernel, (rows, cols), np.exp(-steps ** 2 / (2 * sigma ** 2)))
    return _convolve(x, kernel / kernel.sum())


def blur_glass(x, p, rng):
    sigma, shift, iterations = p
    x = _gaussian(x, sigma)
    for _ in range(iterations):
        x = _jitter(x, shift, rng)
    return _gaussian(x, sigma)


def blur_lens(x, radius, rng):
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    disk = (yy ** 2 + xx ** 2 <= radius ** 2).astype(np.float32)
    return _convolve(x, disk / disk.sum())


def blur_zoom(x, zoom, rng):
    # the mean of centre crops blown back up, zoom 1 .. `zoom` in steps of about 0.01
    im = _pil(x)
    w, h = im.size
    zooms = np.linspace(1, zoom, int(round((zoom - 1) / 0.01)) + 1)
    total = np.zeros_like(x)
    for z in zooms:
        box = (w / 2 * (1 - 1 / z), h / 2 * (1 - 1 / z), w / 2 * (1 + 1 / z), h / 2 * (1 + 1 / z))
        total += _arr(im.resize((w, h), Image.Resampling.BILINEAR, box=box))
    return total / len(zooms)


def blur_jitter(x, shift, rng):
    return _jitter(x, shift, rng)


# BT.601 full range (as JPEG uses): rows give Y, Cb, Cr from R, G, B
YCBCR = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], np.float32)


def _to_ycbcr(x):
    return x @ YCBCR.T


def _from_ycbcr(ycc):
    return ycc @ np.linalg.inv(YCBCR).T.astype(np.float32)


def noise_gaussian_rgb(x, sigma, rng):
    return x + sigma * rng.standard_normal(x.shape, dtype=np.float32)


def noise_gaussian_ycbcr(x, p, rng):
    sigma, chroma = p
    scale = np.array([sigma, sigma * chroma, sigma * chroma], np.float32)
    return _from_ycbcr(_to_ycbcr(x) + scale * rng.standard_normal(x.shape, dtype=np.float32))


def noise_speckle(x, scale, rng):
    return x * (1 + scale * rng.standard_normal(x.shape, dtype=np.float32))


def noise_spatial(x, sigma, rng):
    # the box blur runs over the noisy image, as published: it correlates the noise and softens the image a little
    return ndimage.uniform_filter(x + sigma * rng.standard_normal(x.shape, dtype=np.float32), (3, 3, 1))


def noise_poisson(x, photons, rng):
    return rng.poisson(x * photons).astype(np.float32) / photons


def noise_impulse(x, amount, rng):
    # per channel value, half salt and half pepper
    u = rng.random(x.shape, dtype=np.float32)
    return np.where(u < amount / 2, 0, np.where(u < amount, 1, x))


def jpeg(x, quality, rng):
    return _roundtrip(x, 'JPEG', quality=quality)


def jpeg2000(x, psnr, rng):
    if not features.check('jpg_2000'):
        raise RuntimeError("jpeg2000 needs Pillow built with OpenJPEG (PIL.features.check('jpg_2000') is False "
                           "here); leave it out with --types")
    # OpenJPEG's dB target misses the RGB PSNR by up to ~2 dB; a few secant steps on the request close the gap.
    # The reachable PSNRs come in steps (coding passes), up to ~1.5 dB apart on a 512px image: keep the closest.
    # irreversible: the 9/7 wavelet of lossy JPEG 2000 (Pillow's default is the lossless 5/3).
    request, best = psnr, (np.inf, None)
    for _ in range(3):
        out = _roundtrip(x, 'JPEG2000', quality_mode='dB', quality_layers=[request], irreversible=True)
        got = -10 * float(np.log10(max(np.mean((out - x) ** 2), 1e-10)))
        best = min(best, (abs(got - psnr), out), key=lambda b: b[0])
        if best[0] < 0.3:
            break
        request += psnr - got
    return best[1]


def _set_value(x, value):
    # Scaling R, G and B by V'/V sets the HSV value V = max(R, G, B) and keeps hue and saturation; black,
    # whose hue is undefined, becomes grey.
    v = x.max(axis=2, keepdims=True)
    new = value(v)
    return np.where(v > 0, x * new / np.maximum(v, 1e-6), new)


def value_shift(x, shift, rng):
    return _set_value(x, lambda v: v + shift)


def value_gamma(x, gamma, rng):
    return _set_value(x, lambda v: v ** gamma)


def rgb_shift(x, shift, rng):
    return x + shift


def rgb_gamma(x, gamma, rng):
    return x ** gamma


def contrast_scale(x, factor, rng):
    # about the mean luma, like PIL's ImageEnhance.Contrast
    mean = (x @ YCBCR[0]).mean()
    return mean + factor * (x - mean)


def contrast_stretch(x, c, rng):
    # 1 / (1 + (mean / x)^c) per channel: c > 1 pushes values away from the channel mean, c < 1 pulls them in
    mean = x.mean(axis=(0, 1), keepdims=True)
    return 1 / (1 + (mean / np.maximum(x, 1e-3)) ** c)  # 1e-3: below half a code value, no overflow


def saturation_hsv(x, factor, rng):
    # HSV saturation S = (V - min) / V times `factor`, capped at 1, with hue and value kept: every channel's
    # gap below the max scales by the same factor, at most V / (V - min) which sends the min channel to 0
    v, low = x.max(axis=2, keepdims=True), x.min(axis=2, keepdims=True)
    return v - (v - x) * np.minimum(factor, v / np.maximum(v - low, 1e-6))


def saturation_ycbcr(x, factor, rng):
    ycc = _to_ycbcr(x)
    ycc[..., 1:] = np.clip(ycc[..., 1:] * factor, -0.5, 0.5)
    return _from_ycbcr(ycc)


def oversharpen(x, amount, rng):
    # unsharp mask against a 5x5 Gaussian (sigma 1.1, what OpenCV picks for that size)
    return x + amount * (x - _gaussian(x, 1.1, truncate=2 / 1.1))


def pixelate(x, scale, rng):
    im = _pil(x)
    w, h = im.size
    small = im.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.Resampling.BOX)
    return _arr(small.resize((w, h), Image.Resampling.NEAREST))


def _class_means(channel, labels, n):
    # every pixel becomes the mean of its class: banding without a shift of tone
    sums = np.bincount(labels.ravel(), channel.ravel(), minlength=n)
    counts = np.bincount(labels.ravel(), minlength=n)
    return (sums / np.maximum(counts, 1))[labels].astype(np.float32)


def _otsu_cuts(counts, centres, n):
    # Multi-level Otsu on a histogram by dynamic programming: maximise sum over classes of (sum v)^2 / count,
    # i.e. the between-class variance; score[i, j] is that term for the class made of bins i .. j-1.
    c0, c1 = np.concatenate([[0], np.cumsum(counts)]), np.concatenate([[0], np.cumsum(counts * centres)])
    mass, moment = c0[None, :] - c0[:, None], c1[None, :] - c1[:, None]
    score = np.where(mass > 0, moment ** 2 / np.maximum(mass, 1e-12), 0)
    score[np.tril_indices_from(score)] = -np.inf  # a class needs at least one bin
    best, back = score[0], []
    for _ in range(n - 1):
        total = best[:, None] + score
        back.append(total.argmax(axis=0))
        best = total.max(axis=0)
    cuts, end = [], len(counts)
    for choice in reversed(back):
        end = choice[end]
        cuts.append(end)
    return sorted(cuts)


def quantize_otsu(x, classes, rng):
    out = np.empty_like(x)
    for c in range(3):
        counts, edges = np.histogram(x[..., c], bins=30)  # 30 bins, as published
        thresholds = edges[_otsu_cuts(counts, (edges[:-1] + edges[1:]) / 2, classes)]
        out[..., c] = _class_means(x[..., c], np.digitize(x[..., c], thresholds), classes)
    return out


def quantize_median(x, colours, rng):
    # median cut per channel, so level 5 keeps 3 values per channel rather than 3 colours in all
    grey = [Image.fromarray(np.asarray(_pil(x))[..., c]) for c in range(3)]
    return np.stack([np.asarray(g.quantize(colours, Image.Quantize.MEDIANCUT).convert('L')) for g in grey],
                    axis=2).astype(np.float32) / 255


def quantize_uniform(x, bins, rng):
    labels = np.minimum((x * bins).astype(np.int64), bins - 1)
    return np.stack([_class_means(x[..., c], labels[..., c], bins) for c in range(3)], axis=2)


# name -> (function, parameter at levels 1..5). Seeds use a type's position here: append, don't reorder.
DISTORTIONS = {
    'blur_gaussian': (blur_gaussian, (1, 2, 3, 4, 5)),  # sigma, px
    'blur_motion': (blur_motion, ((5, 3), (10, 5), (15, 7), (15, 9), (20, 12))),  # kernel radius, sigma
    'blur_glass': (blur_glass, ((.7, 1, 1), (.9, 2, 1), (1.2, 2, 2), (1.4, 3, 2), (1.6, 4, 2))),  # sigma, shift, it.
    'blur_lens': (blur_lens, (2, 3, 4, 6, 8)),  # disk radius
    'blur_zoom': (blur_zoom, (1.03, 1.06, 1.10, 1.15, 1.21)),  # largest zoom
    'blur_jitter': (blur_jitter, (1, 2, 3, 4, 5)),  # largest shift, px
    'noise_gaussian_rgb': (noise_gaussian_rgb, (.05, .10, .15, .20, .25)),  # sigma
    'noise_gaussian_ycbcr': (noise_gaussian_ycbcr, ((.05, 1), (.06, 1.45), (.07, 1.9), (.08, 2.35), (.09, 2.8))),
    'noise_speckle': (noise_speckle, (.14, .21, .28, .35, .42)),  # sigma of the multiplier
    'noise_spatial': (noise_spatial, (.08, .11, .14, .18, .22)),  # sigma before the 3x3 box blur
    'noise_poisson': (noise_poisson, (80, 60, 40, 25, 15)),  # photons at white
    'noise_impulse': (noise_impulse, (.01, .03, .05, .07, .10)),  # fraction of values hit
    'jpeg': (jpeg, (25, 18, 12, 8, 5)),  # quality
    'jpeg2000': (jpeg2000, (29, 27.5, 26, 24.5, 23)),  # PSNR, dB
    'brighten_hsv_shift': (value_shift, (.1, .2, .3, .4, .5)),
    'brighten_rgb_shift': (rgb_shift, (.1, .15, .2, .27, .35)),
    'brighten_hsv_gamma': (value_gamma, (.7, .58, .47, .36, .25)),
    'brighten_rgb_gamma': (rgb_gamma, (.8, .7, .6, .45, .3)),
    'darken_hsv_shift': (value_shift, (-.1, -.2, -.3, -.4, -.5)),
    'darken_rgb_shift': (rgb_shift, (-.1, -.15, -.2, -.27, -.35)),
    'darken_hsv_gamma': (value_gamma, (1.5, 1.8, 2.2, 2.7, 3.5)),
    'darken_rgb_gamma': (rgb_gamma, (1.4, 1.7, 2.1, 2.6, 3.2)),
    'contrast_strengthen_scale': (contrast_scale, (1.4, 1.7, 2.1, 2.6, 4.0)),
    'contrast_strengthen_stretch': (contrast_stretch, (2, 4, 6, 8, 10)),
    'contrast_weaken_scale': (contrast_scale, (.75, .6, .45, .3, .2)),
    'contrast_weaken_stretch': (contrast_stretch, (1, .9, .8, .6, .4)),
    'saturation_strengthen_hsv': (saturation_hsv, (3, 6, 12, 20, 64)),
    'saturation_strengthen_ycbcr': (saturation_ycbcr, (2, 3, 5, 8, 16)),
    'saturation_weaken_hsv': (saturation_hsv, (.7, .55, .4, .2, 0)),
    'saturation_weaken_ycbcr': (saturation_ycbcr, (.6, .4, .2, .1, 0)),
    'oversharpen': (oversharpen, (2, 2.8, 4, 6, 8)),  # unsharp amount
    'pixelate': (pixelate, (.5, .4, .3, .25, .2)),  # downscale factor
    'quantize_otsu': (quantize_otsu, (15, 11, 8, 5, 3)),  # classes per channel
    'quantize_median': (quantize_median, (20, 15, 10, 6, 3)),  # median-cut values per channel
    'quantize_uniform': (quantize_uniform, (24, 16, 8, 6, 4)),  # uniform bins per channel
}


def distort(image, name, level, rng):
    """uint8 HxWx3 -> uint8 HxWx3: `name` at severity `level` (1-5)."""
    fn, params = DISTORTIONS[name]
    return _to_uint8(fn(image.astype(np.float32) / 255, params[level - 1], rng))


def type_rng(seed, ref, name):
    # one stream per (seed, original, type), shared by its five levels so a grid differs only in severity
    return np.random.default_rng([seed, zlib.crc32(ref.encode()), list(DISTORTIONS).index(name)])


# -----------------------------------------------------------------------------
# images in and out

def open_rgb(path, max_side=None):
    """8-bit RGB pixels of any image file, turned upright by its EXIF orientation, at most max_side."""
    im = load_image(path)
    if max_side and max(im.size) > max_side:
        s = max_side / max(im.size)
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.Resampling.LANCZOS)
    return np.asarray(im)


def save_png(pixels, path):
    # written under a temporary name, then renamed: a file under its final name is complete, so a rerun trusts it
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path + '.tmp', format='PNG', compress_level=1)  # 1: ~4x faster than 6
    os.replace(path + '.tmp', path)


def make_test_image(height, width, seed=0):
    """A procedural stand-in for a photo: colour gradients, 1/f texture, hard-edged shapes and stripes getting finer."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    top, bottom = rng.uniform(0.2, 0.9, 3), rng.uniform(0.1, 0.7, 3)
    img = top + (bottom - top) * (y / y.max())[..., None]
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.fftfreq(width)[None, :]
    pink = np.fft.ifft2(np.fft.fft2(rng.standard_normal((height, width))) / np.maximum(np.hypot(fy, fx), 1e-3)).real
    img += 0.08 * (pink / pink.std())[..., None] * rng.uniform(0.5, 1.5, 3)
    for _ in range(6):
        cy, cx, ry, rx = rng.uniform(0, y.max()), rng.uniform(0, x.max()), *rng.uniform(0.05, 0.25, 2)
        if rng.random() < 0.5:
            inside = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1
        else:
            inside = (abs(y - cy) < ry) & (abs(x - cx) < rx)
        img[inside] = rng.uniform(0, 1, 3) * (0.85 + 0.15 * np.sin(40 * x[inside]))[:, None]
    # a chirp up to 4 px per cycle rather than one frequency, which a filter could happen to null or invert
    stripes = (y > 0.6 * y.max()) & (x < 0.3)
    img[stripes] = 0.5 + 0.3 * np.sin(2.6 * max(height, width) * x[stripes] ** 2)[:, None]
    return _to_uint8(img)


def read_manifest(path):
    rows = read_jsonl_lines(path)
    for n, row in rows:
        if 'image' not in row:
            raise ValueError(f'{path}:{n}: each line needs an "image" field')
        for field in ('image', 'ref'):  # a number would fail later, in a worker, with no line to point at
            if (field == 'image' or row.get(field) is not None) and not (isinstance(row[field], str) and row[field]):
                raise ValueError(f'{path}:{n}: "{field}" must be a non-empty string, got {row[field]!r}')
    return [row for _, row in rows]


def list_inputs(spec):
    """[(path, ref, extra fields)] for a folder, a glob or a .jsonl manifest, in a stable order."""
    base = ''  # a manifest's relative paths are relative to the manifest
    if spec.endswith('.jsonl'):
        base, rows = os.path.dirname(spec), read_manifest(spec)
    elif os.path.isdir(spec):
        rows = []
        for d, dirs, files in os.walk(spec):  # all files, so that a non-image is reported rather than ignored
            dirs[:] = sorted(s for s in dirs if not s.startswith('.'))
            rows += [{'image': os.path.join(d, f)} for f in sorted(files) if not f.startswith('.')]
    else:
        rows = [{'image': p} for p in sorted(glob.glob(spec, recursive=True)) if os.path.isfile(p)]
    if not rows:
        raise SystemExit(f'no input files in {spec}')
    paths = [os.path.normpath(os.path.join(base, r['image'])) for r in rows]
    root = spec if os.path.isdir(spec) else os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    return [(path, r.get('ref') or os.path.splitext(os.path.relpath(path, root))[0].replace(os.sep, '/'),
             {k: v for k, v in r.items() if k not in ('image', 'ref')}) for path, r in zip(paths, rows)]


# -----------------------------------------------------------------------------
# the pool

def plan(ref, names, variants, all_levels, seed):
    """[(type, level)] for one original, seeded by (seed, ref) alone so workers and order don't matter."""
    rng = np.random.default_rng([seed, zlib.crc32(ref.encode())])
    chosen = sorted(rng.choice(len(names), min(variants, len(names)), replace=False))
    if all_levels:
        return [(names[i], level) for i in chosen for level in range(1, 6)]
    return [(names[i], int(rng.integers(1, 6))) for i in chosen]


def make_outputs(job):
    """Write one original and its variants, skipping those on disk. -> (manifest records, error or None)."""
    path, ref, extra, todo, out, max_side, seed = job
    original = {'image': f'{ref}.png', 'ref': ref, 'distortion': None, 'level': 0, 'source': 'authentic'}
    records = [original | {k: v for k, v in extra.items() if k not in original}]
    records += [{'image': f'{ref}__{name}_{level}.png', 'ref': ref, 'distortion': name, 'level': level,
                 'source': 'synthetic'} for name, level in todo]
    missing = [r for r in records if not os.path.exists(os.path.join(out, r['image']))]
    if not missing:
        return records, None
    try:
        image = open_rgb(path, max_side)
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError...) on bad files
        e = e.__cause__ or e  # load_image's message repeats the path that the report already names
        return [], f'{type(e).__name__}: {e}'
    for r in missing:
        name = r['distortion']
        pixels = image if name is None else distort(image, name, r['level'], type_rng(seed, ref, name))
        save_png(pixels, os.path.join(out, r['image']))
    return records, None


def make_sheet(path, ref, sheet_path, names, max_side, seed):
    # the same random draws as a run with this seed, so a tile is what the pool would hold at this size
    image = open_rgb(path, max_side)
    h, w = image.shape[:2]
    font = ImageFont.load_default(size=15)
    label, head, gap = 230, 26, 4
    sheet = Image.new('RGB', (label + 6 * (w + gap), head + len(names) * (h + gap)), 'white')
    draw = ImageDraw.Draw(sheet)
    for col, title in enumerate(['original'] + [f'level {level}' for level in range(1, 6)]):
        draw.text((label + col * (w + gap) + 4, 4), title, fill='black', font=font)
    for row, name in enumerate(tqdm(names, desc='sheet')):
        top = head + row * (h + gap)
        draw.text((4, top + h // 2 - 8), name, fill='black', font=font)
        tiles = [image] + [distort(image, name, level, type_rng(seed, ref, name)) for level in range(1, 6)]
        for col, tile in enumerate(tiles):
            sheet.paste(Image.fromarray(tile), (label + col * (w + gap), top))
    sheet.save(sheet_path)
    print(f'wrote {sheet_path}: {len(names)} types x 5 levels of {path} at {w}x{h}')


def bench():
    image = make_test_image(768, 1024)
    print(f'{"type":30s} {"mean s":>8s} {"worst s":>8s}   (over the 5 levels, 1024x768, one process)')
    worst = {}
    for name in DISTORTIONS:
        seconds = []
        for level in range(1, 6):
            t0 = time.perf_counter()
            distort(image, name, level, type_rng(0, 'bench', name))
            seconds.append(time.perf_counter() - t0)
        worst[name] = round(max(seconds), 4)
        print(f'{name:30s} {np.mean(seconds):8.3f} {max(seconds):8.3f}')
    print(json.dumps({'bench': 'distort', 'size': [1024, 768], 'worst_level_seconds': worst}))


def check_pool_folder(args, inputs):
    """
    Refuse a pool folder that holds inputs (a rerun would distort its own outputs again, as originals) or files made
    with other arguments (a rerun keeps every file on disk, so a new --max-side would mix two pools); then record
    this run's arguments in <out>/args.json. --workers is not among them: it does not change the output.
    """
    out = os.path.realpath(args.out)
    inside = [path for path, _, _ in inputs if os.path.realpath(path).startswith(out + os.sep)]
    if inside:
        raise SystemExit(f'--out {args.out} holds {len(inside)} of the inputs (e.g. {inside[0]}): a rerun would '
                         f'distort its own outputs; choose another --out')
    record = dict(input=args.input, max_side=args.max_side, variants=args.variants, types=args.types,
                  all_levels=args.all_levels, seed=args.seed)
    saved = os.path.join(args.out, 'args.json')
    if os.path.exists(saved):
        changed = changed_args(saved, record)
        if changed:
            raise SystemExit(f'{args.out} holds a pool made with other arguments ({"; ".join(changed)}); rerun with '
                             f'the same ones to resume, or remove it / choose another --out')
    elif os.path.isdir(args.out) and os.listdir(args.out):
        raise SystemExit(f'{args.out} is not empty but has no args.json, so the arguments of its files are unknown; '
                         f'remove them or choose another --out')
    os.makedirs(args.out, exist_ok=True)
    write_atomic(saved, json.dumps(record, indent=1, sort_keys=True) + '\n')


def main(argv=None):
    args = parse_args(argv)
    if args.bench:
        return bench()
    inputs = list_inputs(args.input)
    if args.sheet:
        return make_sheet(*inputs[0][:2], args.sheet, args.types, args.max_side or 256, args.seed)
    check_pool_folder(args, inputs)

    bad, jobs, seen = [], [], {}
    for path, ref, extra in inputs:
        if ref in seen:
            bad.append((path, f'same ref {ref!r} as {seen[ref]}'))
            continue
        seen[ref] = path
        todo = plan(ref, args.types, args.variants, args.all_levels, args.seed)
        jobs.append((path, ref, extra, todo, args.out, args.max_side, args.seed))
    per = len(jobs[0][3]) if jobs else 0
    print(f'{len(jobs)} originals x {per} variants ({min(args.variants, len(args.types))} of {len(args.types)} types, '
          f'{"all five levels" if args.all_levels else "one random level"} each) = {len(jobs) * (per + 1)} images '
          f'with the originals -> {args.out}, {args.workers} workers')

    if args.workers > 1:
        with multiprocessing.Pool(args.workers) as pool:
            results = list(tqdm(pool.imap(make_outputs, jobs), total=len(jobs), desc='distort'))
    else:
        results = [make_outputs(job) for job in tqdm(jobs, desc='distort')]

    records = []
    for job, (recs, error) in zip(jobs, results):
        records += recs
        if error:
            bad.append((job[0], error))
    os.makedirs(args.out, exist_ok=True)
    manifest = os.path.join(args.out, 'manifest.jsonl')
    write_jsonl_atomic(manifest, records)
    print(f'wrote {manifest}: {len(records)} images from {sum(1 for recs, _ in results if recs)} originals')
    if bad:
        print(f'skipped {len(bad)} of {len(inputs)} inputs:')
        for path, reason in bad:
            print(f'  {path}: {reason}')


if __name__ == '__main__':
    main()
