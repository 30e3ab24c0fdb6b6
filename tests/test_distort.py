"""distort.py: every type at every level, monotone severity, and a CLI that is deterministic, resumable and
tolerant of bad files. Images are made procedurally; nothing is downloaded."""
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import distort  # noqa: E402

IMAGES = [distort.make_test_image(96, 128, seed) for seed in range(4)]


def run_cli(*args):
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'distort.py'), *map(str, args)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def read_manifest(out):
    with open(os.path.join(out, 'manifest.jsonl')) as f:
        return [json.loads(line) for line in f]


def tree(folder):
    """{relative path: bytes} of every file under folder."""
    files = {}
    for d, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(d, name)
            with open(path, 'rb') as f:
                files[os.path.relpath(path, folder)] = f.read()
    return files


def finished_pngs(folder):
    return [os.path.relpath(os.path.join(d, n), folder) for d, _, names in os.walk(folder)
            for n in names if n.endswith('.png')]


def make_photos(folder, n, height=96, width=128):
    """n procedural photos with refs a, sub/b, c (a JPEG), d (greyscale), e, f, ..."""
    for i in range(n):
        name = ['a.png', 'sub/b.png', 'c.jpg', 'd.png'][i] if i < 4 else f'{chr(97 + i)}.png'
        im = Image.fromarray(distort.make_test_image(height, width, seed=i))
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        (im.convert('L') if name == 'd.png' else im).save(os.path.join(folder, name))


# -----------------------------------------------------------------------------
# the distortions

def test_table_has_35_types_with_five_levels_each():
    assert len(distort.DISTORTIONS) == 35
    assert all(len(params) == 5 for _, params in distort.DISTORTIONS.values())


@pytest.mark.parametrize('name', list(distort.DISTORTIONS))
def test_every_level_gives_uint8_rgb_of_the_input_size_that_differs_from_it(name):
    for level in range(1, 6):
        out = distort.distort(IMAGES[0], name, level, distort.type_rng(0, 'a', name))
        assert out.dtype == np.uint8 and out.shape == IMAGES[0].shape
        assert (out != IMAGES[0]).any(), f'{name} level {level} left the image unchanged'


@pytest.mark.parametrize('name', list(distort.DISTORTIONS))
def test_severity_is_monotone_in_mean_mse(name):
    # MSE serves every type here, with the random draws (noise, motion angle) fixed across levels as in a run.
    # Caveats: blur_lens is only monotone on broadband content (a disk's negative lobes invert a single grating,
    # hence the chirp in make_test_image); contrast_strengthen_stretch is monotone in the mean over images,
    # not per pixel; saturation_strengthen_hsv plateaus once every pixel has reached S = 1 (equal, not lower).
    mse = [np.mean([np.mean((distort.distort(im, name, level, distort.type_rng(0, str(i), name)).astype(float)
                             - im) ** 2) for i, im in enumerate(IMAGES)]) for level in range(1, 6)]
    assert all(b >= a for a, b in zip(mse, mse[1:])), mse


def test_jpeg2000_lands_near_the_target_psnr():
    for level, target in enumerate(distort.DISTORTIONS['jpeg2000'][1], 1):
        out = distort.distort(IMAGES[1], 'jpeg2000', level, None)
        psnr = -10 * np.log10(np.mean((out / 255 - IMAGES[1] / 255) ** 2))
        assert abs(psnr - target) < 0.75, (level, psnr)


def test_randomness_depends_on_seed_ref_and_type_only():
    def noisy(seed, ref):
        return distort.distort(IMAGES[0], 'noise_gaussian_rgb', 3, distort.type_rng(seed, ref, 'noise_gaussian_rgb'))
    assert (noisy(0, 'a') == noisy(0, 'a')).all()
    assert (noisy(0, 'a') != noisy(0, 'b')).any() and (noisy(0, 'a') != noisy(1, 'a')).any()


def test_open_rgb_makes_8bit_rgb_from_grey_palette_alpha_16bit_and_exif(tmp_path):
    grey = tmp_path / 'grey.png'
    Image.new('L', (4, 3), 100).save(grey)
    assert (distort.open_rgb(grey) == 100).all() and distort.open_rgb(grey).shape == (3, 4, 3)
    palette = tmp_path / 'palette.png'
    indexed = Image.new('P', (4, 3), 1)
    indexed.putpalette([0, 0, 0, 200, 10, 30])
    indexed.save(palette)
    assert distort.open_rgb(palette)[0, 0].tolist() == [200, 10, 30]
    alpha = tmp_path / 'alpha.png'
    Image.new('RGBA', (4, 3), (0, 0, 0, 0)).save(alpha)
    assert (distort.open_rgb(alpha) == 255).all()  # transparent over white
    deep = tmp_path / 'deep.png'
    Image.fromarray(np.full((3, 4), 65535, np.uint16)).save(deep)
    assert distort.open_rgb(deep).dtype == np.uint8 and (distort.open_rgb(deep) == 255).all()
    rotated = tmp_path / 'rotated.jpg'
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    Image.new('RGB', (4, 3)).save(rotated, exif=exif)
    assert distort.open_rgb(rotated).shape == (4, 3, 3)


def test_malformed_manifest_line_names_the_file_and_line(tmp_path):
    manifest = tmp_path / 'in.jsonl'
    manifest.write_text('{"image": "a.png"}\n{"image": oops}\n')
    with pytest.raises(ValueError, match=r'in\.jsonl:2: malformed JSON line'):
        distort.list_inputs(str(manifest))
    manifest.write_text('{"img": "a.png"}\n')
    with pytest.raises(ValueError, match=r'in\.jsonl:1: each line needs an "image" field'):
        distort.list_inputs(str(manifest))


# -----------------------------------------------------------------------------
# the script

def test_output_is_identical_for_one_and_two_workers(tmp_path):
    make_photos(tmp_path / 'photos', 4)
    for workers in (1, 2):
        run_cli('--input', tmp_path / 'photos', '--out', tmp_path / f'w{workers}', '--variants', 4, '--seed', 3,
                '--workers', workers)
    one, two = tree(tmp_path / 'w1'), tree(tmp_path / 'w2')
    assert len(one) == 4 * 5 + 2 and one == two  # 20 PNGs, manifest.jsonl, args.json


def test_manifest_lists_originals_and_distinct_variants_with_their_fields(tmp_path):
    make_photos(tmp_path / 'photos', 4)
    run_cli('--input', tmp_path / 'photos', '--out', tmp_path / 'pool', '--variants', 10, '--workers', 1)
    rows = read_manifest(tmp_path / 'pool')
    assert sorted({r['ref'] for r in rows}) == ['a', 'c', 'd', 'sub/b']
    for ref in ('a', 'c', 'd', 'sub/b'):
        original, *variants = [r for r in rows if r['ref'] == ref]
        assert original == {'image': f'{ref}.png', 'ref': ref, 'distortion': None, 'level': 0, 'source': 'authentic'}
        assert len(variants) == 10 and len({v['distortion'] for v in variants}) == 10
        for v in variants:
            assert v['image'] == f'{ref}__{v["distortion"]}_{v["level"]}.png'
            assert v['source'] == 'synthetic' and 1 <= v['level'] <= 5 and v['distortion'] in distort.DISTORTIONS
    for r in rows:
        with Image.open(tmp_path / 'pool' / r['image']) as im:
            assert im.mode == 'RGB' and im.size == (128, 96)  # the greyscale d.png too


def test_jsonl_input_keeps_its_fields_on_the_original_and_all_levels_makes_a_grid(tmp_path):
    make_photos(tmp_path / 'photos', 2)
    manifest = tmp_path / 'in.jsonl'
    manifest.write_text(json.dumps({'image': 'photos/a.png', 'mos': 0.7}) + '\n' +
                        json.dumps({'image': str(tmp_path / 'photos/sub/b.png'), 'ref': 'bee', 'mos': 0.2}) + '\n')
    run_cli('--input', manifest, '--out', tmp_path / 'pool', '--variants', 2, '--all-levels',
            '--types', 'jpeg,blur_gaussian,pixelate', '--max-side', 64, '--workers', 1)
    rows = read_manifest(tmp_path / 'pool')
    originals = [r for r in rows if r['level'] == 0]
    # refs are relative to the images' common folder (photos/) unless the manifest gives one
    assert [(r['ref'], r['mos']) for r in originals] == [('a', 0.7), ('bee', 0.2)]
    for ref in ('a', 'bee'):
        variants = [(r['distortion'], r['level']) for r in rows if r['ref'] == ref and r['level'] > 0]
        types = sorted({t for t, _ in variants})
        assert len(types) == 2 and set(types) <= {'jpeg', 'blur_gaussian', 'pixelate'}
        assert sorted(variants) == [(t, level) for t in types for level in range(1, 6)]
    assert all('mos' not in r for r in rows if r['level'] > 0)
    for r in rows:
        with Image.open(tmp_path / 'pool' / r['image']) as im:
            assert max(im.size) == 64


def test_resume_after_a_kill_matches_a_clean_run(tmp_path):
    make_photos(tmp_path / 'photos', 6, height=384, width=512)
    args = ['--input', tmp_path / 'photos', '--variants', 10, '--seed', 1, '--workers', 1]
    run_cli(*args, '--out', tmp_path / 'clean')
    clean = tree(tmp_path / 'clean')

    out = tmp_path / 'resumed'
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'distort.py'), *map(str, args), '--out', out],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(finished_pngs(out)) < 5:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    done = {f: os.stat(out / f).st_mtime_ns for f in finished_pngs(out)}
    assert 5 <= len(done) < len(clean) - 1 and not (out / 'manifest.jsonl').exists()
    missing = sorted(set(clean) - set(done) - {'manifest.jsonl'})
    (out / (missing[0] + '.tmp')).write_bytes(b'half a png')  # as if killed mid-write

    run_cli(*args, '--out', out)
    assert tree(out) == clean  # same bytes, nothing left over, manifest complete without duplicates
    assert all(os.stat(out / f).st_mtime_ns == t for f, t in done.items())  # finished files were skipped
    rows = read_manifest(out)
    assert len({r['image'] for r in rows}) == len(rows) == 6 * 11


def test_corrupt_and_non_image_files_are_skipped_and_reported(tmp_path):
    make_photos(tmp_path / 'photos', 1)
    Image.fromarray(IMAGES[0]).save(tmp_path / 'full.jpg')
    data = (tmp_path / 'full.jpg').read_bytes()
    (tmp_path / 'photos' / 'broken.jpg').write_bytes(data[:len(data) // 2])
    (tmp_path / 'photos' / 'notes.txt').write_text('not an image')
    result = run_cli('--input', tmp_path / 'photos', '--out', tmp_path / 'pool', '--variants', 2, '--workers', 2)
    assert 'skipped 2 of 3 inputs' in result.stdout
    assert 'broken.jpg: OSError' in result.stdout and 'notes.txt: UnidentifiedImageError' in result.stdout
    assert {r['ref'] for r in read_manifest(tmp_path / 'pool')} == {'a'}


def test_contact_sheet_has_a_row_per_type_and_a_column_per_level(tmp_path):
    Image.fromarray(IMAGES[0]).save(tmp_path / 'photo.png')
    run_cli('--input', tmp_path / 'photo.png', '--sheet', tmp_path / 'sheet.png', '--max-side', 32)
    with Image.open(tmp_path / 'sheet.png') as sheet:
        # 6 columns (original + 5 levels) of 32x24 tiles and 35 rows, plus labels and gaps of a few pixels
        assert 6 * 32 < sheet.width < 6 * 40 + 300 and 35 * 24 < sheet.height < 35 * 32 + 40


# -----------------------------------------------------------------------------
# bad arguments and folders, refused before any work

@pytest.mark.parametrize('flags,message', [
    (['--max-side', '-5'], '--max-side must be positive, got -5'),  # wrote 1x1 images
    (['--max-side', '0'], '--max-side must be positive, got 0'),
    (['--variants', '-1'], '--variants must be at least 0, got -1'),  # a NumPy traceback
    (['--workers', '0'], '--workers must be positive, got 0'),
    (['--seed', '-1'], '--seed must be at least 0, got -1'),
    (['--out', 'PHOTOS'], 'is also an input'),
    (['--out', 'PHOTOS/pool'], 'is inside --input .*: a rerun would take its outputs for originals'),
    (['--out', 'PHOTOS/a.png/pool'], r'a\.png is a file, not a folder'),
    (['--out', '/proc/pool'], 'cannot write in /proc'),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path, flags, message, capsys):
    make_photos(tmp_path / 'photos', 1)
    photos = str(tmp_path / 'photos')
    argv = ['--input', photos, '--out', str(tmp_path / 'pool')] + [f.replace('PHOTOS', photos) for f in flags]
    with pytest.raises(SystemExit):
        distort.parse_args(argv)
    assert re.search(message, capsys.readouterr().err)


def test_a_pool_folder_that_holds_inputs_or_other_arguments_is_refused(tmp_path):
    make_photos(tmp_path / 'photos', 1)
    base = ['--input', str(tmp_path / 'photos'), '--variants', '1', '--workers', '1', '--max-side', '32']
    distort.main(base + ['--out', str(tmp_path / 'pool')])
    record = json.loads((tmp_path / 'pool' / 'args.json').read_text())
    assert record['max_side'] == 32 and 'workers' not in record
    distort.main(base + ['--out', str(tmp_path / 'pool'), '--workers', '1'])  # the same arguments: a resume
    with pytest.raises(SystemExit, match=r'holds a pool made with other arguments \(--max-side 32 -> 48\)'):
        distort.main(base[:-1] + ['48', '--out', str(tmp_path / 'pool')])  # used to keep the old files silently
    (tmp_path / 'old').mkdir()
    (tmp_path / 'old' / 'a.png').write_bytes(b'')
    with pytest.raises(SystemExit, match='is not empty but has no args.json'):
        distort.main(base + ['--out', str(tmp_path / 'old')])
    # a glob that reaches into --out: a rerun would distort the pool's own outputs as originals
    with pytest.raises(SystemExit, match=r'holds 2 of the inputs'):
        distort.main(['--input', str(tmp_path / 'pool' / '*.png'), '--out', str(tmp_path / 'pool'), '--workers', '1'])


@pytest.mark.parametrize('line,message', [
    ('{"image": 7}', r'in\.jsonl:2: "image" must be a non-empty string, got 7'),
    ('{"image": ""}', r'in\.jsonl:2: "image" must be a non-empty string, got \'\''),
    ('{"image": "a.png", "ref": 5}', r'in\.jsonl:2: "ref" must be a non-empty string, got 5'),
])
def test_manifest_field_types_name_the_file_and_line(tmp_path, line, message):
    (tmp_path / 'in.jsonl').write_text('{"image": "a.png", "ref": "ok"}\n' + line + '\n')
    with pytest.raises(ValueError, match=message):
        distort.list_inputs(str(tmp_path / 'in.jsonl'))
