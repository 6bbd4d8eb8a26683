"""The CPU input path: timm's crops decoded at reduced size, labels and determinism, and the bad-image policy."""
import logging
import math
import random
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F
from PIL import Image, ImageDraw
from timm.data import create_dataset
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_pil_interp

import training.data.bad_images as bad_images
import training.data.cpu_path as cpu_path
from training.config import UserError, parse_config
from training.data import (BatchLayout, LazyImageFolder, TrainBatchSampler, create_eval_loader, create_train_loader,
                           open_image_folder,
                           seed_sample)
from training.data.cpu_path import DraftRandomResizedCrop, SeededSamples
from training.data.files import dct_scale, decode_crop, open_image

from conftest import REPO, run_train

CFG = dict(input_size=(3, 32, 32), interpolation='bilinear', mean=(0.5,) * 3, std=(0.25,) * 3, crop_pct=0.875)


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth gradients, a few shapes and mild noise: decodes and resizes like a photograph."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack([rng.uniform(60, 190) + 50 * np.sin(x / rng.uniform(9, 30) + y / rng.uniform(9, 30) + c)
                       for c in range(3)], axis=-1)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = rng.uniform(0, 0.8, 2) * (width, height)
        draw.ellipse((x0, y0, x0 + width / 4, y0 + height / 5), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, 3, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def photo_folder(root: Path, count: int = 12, classes: int = 3, seed: int = 0) -> Path:
    """`count` JPEGs of 64-160 px in `classes` class folders, under root/train."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / 'train' / f'class{i % classes}'
        folder.mkdir(parents=True, exist_ok=True)
        photo(rng, int(rng.integers(64, 161)), int(rng.integers(64, 161))).save(folder / f'{i:03d}.JPEG', quality=90)
    return root


def tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32))


def train_loader(root: Path, workers: int = 0, batch: int = 4, *args: str):
    config = parse_config(['--img-size', '32', '-j', str(workers), '-b', str(batch), *args])
    dataset = open_image_folder(root, 'train')
    loader, sampler = create_train_loader(dataset, config, CFG, BatchLayout.create(batch, 1, None), 0,
                                          torch.device('cpu'))
    return dataset, loader, sampler


# ---------------------------------------------------------------------------------------------------------------
# reduced-size decoding

@pytest.mark.parametrize('interpolation', ['bilinear', 'random'])
def test_crop_boxes_and_random_draws_are_timms_for_the_same_seed(tmp_path, monkeypatch, interpolation):
    timm_crop = RandomResizedCropAndInterpolation(32, interpolation=interpolation)
    draft_crop = DraftRandomResizedCrop.like(timm_crop)
    boxes = []
    monkeypatch.setattr(cpu_path, 'decode_crop', lambda img, box, size, resample: boxes.append((box, resample)))
    rng = np.random.default_rng(0)
    for seed in range(40):
        path = tmp_path / f'{seed}.jpg'
        photo(rng, int(rng.integers(40, 400)), int(rng.integers(40, 400))).save(path)
        seed_sample(seed)
        i, j, h, w = timm_crop.get_params(Image.open(path).convert('RGB'), timm_crop.scale, timm_crop.ratio)
        interp = random.choice(timm_crop.interpolation) if interpolation == 'random' else timm_crop.interpolation
        after_timm = random.getstate()
        seed_sample(seed)
        draft_crop(open_image(str(path)))
        assert boxes[-1] == ((j, i, j + w, i + h), str_to_pil_interp(interp.value))
        assert random.getstate() == after_timm  # the same draws: the flip and jitter after it draw the same
    assert len({box for box, _ in boxes}) == 40


def test_a_crop_smaller_than_twice_the_output_gives_timms_pixels(tmp_path):
    """Below a DCT scale of 2 (and for formats without DCT scaling) the crop is timm's, pixel for pixel."""
    rng = np.random.default_rng(1)
    timm_crop = RandomResizedCropAndInterpolation(48, scale=(0.08, 1.0))
    draft_crop = DraftRandomResizedCrop.like(timm_crop)
    for k, suffix in enumerate(['.jpg'] * 6 + ['.png'] * 2):
        path = tmp_path / f'{k}{suffix}'
        photo(rng, 80, 70).save(path)  # any crop of it is below 96 px: scale 1
        seed_sample(k)
        expected = timm_crop(Image.open(path).convert('RGB'))
        seed_sample(k)
        assert torch.equal(tensor(draft_crop(open_image(str(path)))), tensor(expected))


@pytest.mark.parametrize('crop, out, scale', [((320, 320), (160, 160), 2), ((319, 320), (160, 160), 1),
                                              ((640, 1000), (160, 160), 4), ((1280, 1280), (160, 160), 8),
                                              ((4000, 4000), (160, 160), 8), ((448, 500), (224, 224), 2)])
def test_the_dct_scale_keeps_at_least_the_output_size(crop, out, scale):
    assert dct_scale(crop, out) == scale
    assert (crop[0] / scale >= out[0]) and (crop[1] / scale >= out[1])


@pytest.mark.parametrize('box, scale', [((0, 0, 384, 288), 8), ((40, 30, 240, 190), 4), ((101, 57, 230, 186), 2)])
def test_a_large_crop_decodes_at_reduced_size_close_to_the_full_decode(tmp_path, box, scale):
    path = tmp_path / 'big.jpg'
    photo(np.random.default_rng(2), 384, 288).save(path, quality=90)
    full = F.resized_crop(Image.open(path).convert('RGB'), box[1], box[0], box[3] - box[1], box[2] - box[0],
                          [32, 48])
    img = open_image(str(path))
    drafted = decode_crop(img, box, (48, 32), Image.BILINEAR)
    assert img.size == (math.ceil(384 / scale), math.ceil(288 / scale))  # what libjpeg decoded
    assert drafted.size == (48, 32) and drafted.mode == 'RGB'
    assert (tensor(drafted) - tensor(full)).abs().mean() < 2.0  # of 255: measured 0.5-0.9


def test_labels_and_files_are_timms_create_dataset(tmp_path):
    root = photo_folder(tmp_path, count=14, classes=4)
    (root / 'train' / 'class10').mkdir()  # natural order: class10 after class3, as timm sorts
    photo(np.random.default_rng(3), 64, 64).save(root / 'train' / 'class10' / 'x.JPEG')
    ours = open_image_folder(root, 'train')
    timm = create_dataset('', root=str(root / 'train'), split='train', search_split=False)
    assert isinstance(ours, LazyImageFolder)
    assert ours.samples == timm.reader.samples and ours.reader.class_to_idx == timm.reader.class_to_idx
    assert [ours[i][1] for i in range(len(ours))] == [timm[i][1] for i in range(len(timm))]


def test_a_sample_is_the_same_with_any_number_of_workers(tmp_path):
    root = photo_folder(tmp_path, count=16)
    (root / 'train' / 'class1' / '004.JPEG').write_bytes(b'')  # a replaced sample too
    passes = []
    for workers in (0, 2):
        _, loader, sampler = train_loader(root, workers, 4, '--max-bad-images', '0.1')
        with loader:
            sampler.set_position(3, 0)
            passes.append([(x.clone(), y.clone()) for x, y in loader])
    assert len(passes[0]) == 4
    for (x0, y0), (x2, y2) in zip(*passes):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)


def test_the_draft_path_is_deterministic_and_near_the_full_decode_path(tmp_path):
    root = photo_folder(tmp_path, count=8)
    seeded = [SeededSamples(train_loader(root, 0, 4, flag)[0]) for flag in ('--jpeg-draft', '--no-jpeg-draft')]
    differences = []
    for index in range(8):
        draft, full = seeded[0][(index, 100 + index)][0], seeded[1][(index, 100 + index)][0]
        assert torch.equal(seeded[0][(index, 100 + index)][0], draft)
        differences.append(float((draft.float() - full.float()).abs().mean()))
    # the same crop, flip and jitter: equal below a DCT scale of 2, within a level above (measured 0.5-0.85 of 255)
    assert max(differences) < 3.0 and differences.count(0.0) == 5


# ---------------------------------------------------------------------------------------------------------------
# bad images

def write_bad(folder: Path, kind: str, name: str) -> Path:
    """A file of one of the kinds found in real ImageNet copies, named .JPEG."""
    path = folder / name
    img = photo(np.random.default_rng(len(kind)), 72, 60)
    if kind == 'png':
        img.save(path, format='PNG')
    elif kind == 'cmyk':
        img.convert('CMYK').save(path, format='JPEG')
    elif kind == 'grayscale':
        img.convert('L').save(path, format='JPEG')
    elif kind == 'palette':
        img.convert('P').save(path, format='GIF')
    elif kind == 'truncated':
        img.save(path, format='JPEG')
        path.write_bytes(path.read_bytes()[:-300])
    elif kind == 'corrupt':
        img.save(path, format='JPEG')
        data = bytearray(path.read_bytes())
        at = data.index(b'\xff\xda') + 40  # in the entropy-coded data, after the start-of-scan marker
        data[at:at + 2] = b'\xff\xc4'  # a Huffman-table marker where none can be
        path.write_bytes(bytes(data))
    elif kind == 'empty':
        path.write_bytes(b'')
    elif kind == 'text':
        path.write_text('<html>not found</html>')
    elif kind == 'huge':  # 144 megapixels, between PIL's warning and error limits, in a few KB
        Image.new('1', (12000, 12000)).save(path, format='PNG')
    return path


@pytest.mark.parametrize('kind', ['png', 'cmyk', 'grayscale', 'palette'])
def test_images_pil_can_read_are_decoded_to_rgb_and_not_counted(tmp_path, kind):
    root = photo_folder(tmp_path, count=4, classes=1)
    path = write_bad(root / 'train' / 'class0', kind, '001.JPEG')
    dataset, loader, _ = train_loader(root)
    x, _ = SeededSamples(dataset)[(1, 7)]
    seed_sample(7)
    assert torch.equal(x, dataset.transform(Image.open(path).convert('RGB')))  # as timm's RGB conversion gives
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
    assert dataset.bad_images.epoch_report() == (0, ())


@pytest.mark.parametrize('kind, reason', [('truncated', 'truncated image data'), ('corrupt', 'corrupt image data'),
                                          ('empty', 'empty file'), ('text', 'not an image PIL can identify'),
                                          ('huge', "above PIL's decompression-bomb limit")])
def test_a_bad_file_is_replaced_by_the_next_readable_one_under_the_same_seed(tmp_path, kind, reason):
    root = photo_folder(tmp_path, count=6, classes=2)
    write_bad(root / 'train' / 'class0', kind, '002.JPEG')  # index 1: class0 holds 000, 002, 004
    dataset, _, _ = train_loader(root)
    seeded = SeededSamples(dataset)
    assert dataset.samples[1][0].endswith('002.JPEG')
    x, y = seeded[(1, 55)]
    x2, y2 = seeded[(2, 55)]
    assert torch.equal(x, x2) and y == y2 == 0
    assert dataset.bad_images.epoch_report() == (1, ((dataset.samples[1][0], reason),))


def test_each_bad_file_is_named_once_and_counted_every_epoch(tmp_path, caplog):
    root = photo_folder(tmp_path, count=16, classes=2)
    bad = [write_bad(root / 'train' / 'class0', kind, f'{i:03d}.JPEG')
           for i, kind in zip((0, 6, 8), ('truncated', 'empty', 'text'))]
    _, loader, sampler = train_loader(root, 2, 8, '--max-bad-images', '0.2')
    reports = []
    with loader, caplog.at_level(logging.WARNING, logger='training.images'):
        for epoch in range(2):
            sampler.set_position(epoch, 0)
            assert sum(len(x) for x, _ in loader) == 16
            reports.append(loader.epoch_report())
    named = [r.getMessage() for r in caplog.records]
    assert len(named) == 3 and all(sum(str(p) in m for m in named) == 1 for p in bad)
    assert reports[0].count == reports[1].count == 3
    assert sorted(p for p, _ in reports[0].files) == sorted(map(str, bad)) and reports[1].files == ()


def test_more_bad_images_than_max_bad_images_stops_the_loader_with_one_line(tmp_path):
    root = photo_folder(tmp_path, count=16, classes=2)
    for i in (0, 2, 4):
        write_bad(root / 'train' / 'class0', 'empty', f'{i:03d}.JPEG')
    _, loader, _ = train_loader(root, 0, 8, '--max-bad-images', '0.125')  # 2 of 16 allowed
    with pytest.raises(UserError, match=r'^3 unreadable image\(s\) in this pass .*max_bad_images allows \(2\)'):
        list(loader)
    _, loader, _ = train_loader(root, 0, 8, '--max-bad-images', '0.1875')  # 3 allowed
    assert len(list(loader)) == 2


def test_a_training_run_over_too_many_bad_images_exits_with_one_line(tmp_path, shapes, capsys):
    data = Path(shutil.copytree(shapes, tmp_path / 'shapes'))
    next((data / 'train').rglob('*.jpg')).write_bytes(b'')
    assert run_train(data, tmp_path / 'out', '--max-bad-images', '0.0', '-b', '80') == 2  # one step
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('train.py: error: 1 unreadable image(s) in this pass')


def test_too_many_bad_images_stop_the_run_at_once_not_after_the_epoch_trained(tmp_path, shapes, capsys):
    data = Path(shutil.copytree(shapes, tmp_path / 'shapes'))
    train_set = open_image_folder(data, 'train')
    sampler = TrainBatchSampler(len(train_set), BatchLayout.create(8, 1, None), 0, parse_config([])['seed'])
    first = train_set.samples[sampler.epoch_order()[0]][0]  # in the epoch's first batch
    Path(first).write_bytes(b'')
    assert run_train(data, tmp_path / 'out', '-b', '8') == 2  # max_bad_images 0.001 of 80 images: none may be bad
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith('train.py: error: 1 unreadable image(s) in this pass')
    steps = re.findall(r'step (\d+)/10', (tmp_path / 'out' / 'run' / 'log.txt').read_text())
    assert steps == ['1']  # stopped after the batch that met it, not 10 steps later


def test_a_run_of_bad_files_stops_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(bad_images, 'MAX_BAD_IN_A_ROW', 3)
    root = photo_folder(tmp_path, count=8, classes=1)
    for i in range(1, 5):
        write_bad(root / 'train' / 'class0', 'text', f'{i:03d}.JPEG')
    _, loader, sampler = train_loader(root, 0, 8, '--max-bad-images', '1.0')
    with pytest.raises(UserError, match='^3 images in a row are unreadable'):
        list(loader)


def test_the_eval_loader_replaces_and_counts_bad_images(tmp_path):
    root = photo_folder(tmp_path, count=6, classes=2)
    write_bad(root / 'train' / 'class1', 'truncated', '001.JPEG')
    dataset = open_image_folder(root, 'train')
    with create_eval_loader(dataset, CFG, 4, 0, torch.device('cpu')) as loader:
        assert sum(len(x) for x, _ in loader) == 6
        assert loader.epoch_report().count == 1


# ---------------------------------------------------------------------------------------------------------------
# workers

def test_close_ends_the_persistent_workers(tmp_path):
    _, loader, sampler = train_loader(photo_folder(tmp_path, count=8), 2, 4)
    next(iter(loader))  # mid-pass, as when training is interrupted
    workers = loader.loader._iterator._workers
    assert all(w.is_alive() for w in workers)
    loader.close()
    assert not any(w.is_alive() for w in workers)
    assert len(list(loader)) == 2  # a closed loader starts new workers if iterated again
    loader.close()


def test_the_interpreter_exits_when_a_loader_was_left_open(tmp_path):
    """Workers ignore SIGTERM: without CheckedLoader's exit hook, Python's exit would wait for them forever."""
    photo_folder(tmp_path, count=8)
    script = textwrap.dedent(f'''
        import torch
        from pathlib import Path
        from training.config import parse_config
        from training.data import BatchLayout, create_train_loader, open_image_folder
        config = parse_config(['--img-size', '32', '-j', '2', '-b', '4'])
        loader, _ = create_train_loader(open_image_folder(Path({str(tmp_path)!r}), 'train'), config, {CFG!r},
                                        BatchLayout.create(4, 1, None), 0, torch.device('cpu'))
        batches = iter(loader)
        next(batches)
        print('left open')
    ''')
    done = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == 'left open', done.stderr


def test_the_interpreter_exits_when_building_a_loaders_iterator_raised(tmp_path):
    """The workers start before the sampler's first batch is drawn: an error there, not caught, keeps the iterator
    alive in its traceback, with workers that no loader can close and that ignore SIGTERM. Python's exit must still
    end (it waited forever)."""
    photo_folder(tmp_path, count=8)
    script = textwrap.dedent(f'''
        import torch
        from pathlib import Path
        from training.config import parse_config
        from training.data import BatchLayout, create_train_loader, open_image_folder
        config = parse_config(['--img-size', '32', '-j', '2', '-b', '4'])
        loader, sampler = create_train_loader(open_image_folder(Path({str(tmp_path)!r}), 'train'), config, {CFG!r},
                                              BatchLayout.create(4, 1, None), 0, torch.device('cpu'))
        sampler.epoch_order = lambda: 1 / 0
        next(iter(loader))
    ''')
    done = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip().endswith('ZeroDivisionError: division by zero'), done.stderr


def test_more_repeats_than_the_batch_is_one_line(tmp_path):
    """More than the batch is also more than the images (it raised deep in the sampler's first draw)."""
    config = parse_config(['--img-size', '32', '-b', '8', '--aug-repeats', '500'])
    with pytest.raises(UserError, match='aug_repeats 500 is more than the global batch of 8') as error:
        create_train_loader(open_image_folder(photo_folder(tmp_path, count=12), 'train'), config, CFG,
                            BatchLayout.create(8, 1, None), 0, torch.device('cpu'))
    assert '\n' not in str(error.value)
