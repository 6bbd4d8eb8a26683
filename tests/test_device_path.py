"""The `decode: gpu` input path, run on the CPU device: it must give what timm's CPU transforms give."""
import itertools
import logging
import random
import threading

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data import create_transform
from timm.data.transforms import RandomResizedCropAndInterpolation

from training.config import UserError, parse_config
from training.data import BatchLayout, EvalBatchSampler, TrainBatchSampler
import training.data.device_decode as device_decode
from training.data.device_autoaugment import OPS
from training.data import LazyImageFolder, seed_sample
from training.data.cpu_path import train_transform
from training.data.device_color import JITTER
from training.data.device_decode import EncodedImages, collate, read_image
from training.data.files import open_image
from training.data.device_geometry import crop_axes, resample
from training.data.device_params import (BICUBIC, BILINEAR, BRIGHTNESS, CONTRAST, HUE, SATURATION, TrainAugment,
                                         crop_box, decoded_on_cpu)
from training.data.device_path import create_gpu_eval_loader, create_gpu_train_loader, in_background

CPU = torch.device('cpu')
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def levels(x: torch.Tensor) -> torch.Tensor:
    """Normalised pixels back in levels of 255."""
    return x * torch.tensor(STD).view(-1, 1, 1) * 255


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth, textured RGB image: resampling differences show on it as they would on a photo."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([128 + 100 * np.sin(x / 5.0 + seed), 128 + 100 * np.cos(y / 4.0), (3 * x + 2 * y + 40 * seed) % 256],
                   -1)
    return np.clip(rgb + np.random.default_rng(seed).normal(0, 8, rgb.shape), 0, 255).astype(np.uint8)


def write(path, pixels: np.ndarray, mode: str = None, **save) -> str:
    image = Image.fromarray(pixels)
    (image.convert(mode) if mode else image).save(path, **save)
    return str(path)


def photos(folder, sizes: list) -> list:
    """(path, label) samples of JPEG photos of the given (height, width) sizes."""
    folder.mkdir(exist_ok=True)
    return [(write(folder / f'{i}.jpg', photo(h, w, i), quality=90), i % 3) for i, (h, w) in enumerate(sizes)]


def train_config(*args: str) -> dict:
    return parse_config(['--img-size', '32', '-j', '0', *args])


def data_cfg(size: int = 32, interpolation: str = 'bilinear', crop_pct: float = 0.875) -> dict:
    return dict(input_size=(3, size, size), interpolation=interpolation, mean=MEAN, std=STD, crop_pct=crop_pct,
                crop_mode='center')


def first_batch(loader):
    try:
        return next(iter(loader))
    finally:
        loader.close()


@pytest.mark.parametrize('size, scale, thin', [((40, 60), (0.08, 1.0), False), ((300, 20), (0.9, 1.0), True),
                                               ((20, 300), (0.5, 1.0), True)])
def test_crop_boxes_are_timms_for_the_same_seed(size, scale, thin):
    ratio = (3 / 4, 4 / 3)
    image = Image.new('RGB', size[::-1])
    boxes = []
    for seed in range(200):
        random.seed(seed)
        timm_box = RandomResizedCropAndInterpolation.get_params(image, scale, ratio)
        boxes.append(crop_box(random.Random(seed), *size, scale, ratio))
        assert boxes[-1] == timm_box
    if thin:  # no try fits: the fallback, the largest centred box within the ratio range
        assert set(boxes) == {((size[0] - boxes[0][2]) // 2, (size[1] - boxes[0][3]) // 2, *boxes[0][2:])}
        assert max(boxes[0][2:]) / min(boxes[0][2:]) == pytest.approx(4 / 3, abs=0.1)


def test_crop_resize_and_flip_land_where_the_box_says():
    # pixel values encode coordinates: red = column, green = row
    y, x = torch.meshgrid(torch.arange(64), torch.arange(64), indexing='ij')
    image = torch.stack([x, y, torch.zeros_like(x)]).to(torch.uint8)
    params = torch.zeros(4, 17, dtype=torch.float64)
    params[:, 2:6] = torch.tensor([[5, 9, 20, 24], [5, 9, 20, 24], [2, 3, 40, 48], [2, 3, 40, 48]])
    flips = torch.tensor([[False, False], [True, True], [False, False], [True, False]])
    interpolation = torch.tensor([BILINEAR, BILINEAR, BILINEAR, BICUBIC])
    same = resample([image] * 2, *crop_axes(params[:2], (20, 24)), flips[:2], interpolation[:2], (20, 24))
    assert torch.equal(same[0, 0], x[5:25, 9:33].float()) and torch.equal(same[0, 1], y[5:25, 9:33].float())
    assert torch.equal(same[1], same[0].flip(1).flip(2))  # both flips
    half = resample([image] * 2, *crop_axes(params[2:], (20, 24)), flips[2:], interpolation[2:], (20, 24))
    # a 2x reduction keeps a linear ramp linear: output pixel j sits at the centre of source pixels 2j and 2j + 1
    inner = (slice(2, -2), slice(2, -2))
    expect_x = 3 + 2 * torch.arange(24.0) + 0.5
    expect_y = 2 + 2 * torch.arange(20.0) + 0.5
    assert torch.allclose(half[0, 0][inner], expect_x.expand(20, 24)[inner], atol=1e-3)
    assert torch.allclose(half[0, 1][inner], expect_y[:, None].expand(20, 24)[inner], atol=1e-3)
    assert torch.allclose(half[1, 0][inner], expect_x.flip(0).expand(20, 24)[inner], atol=1e-3)


def test_pixels_already_at_the_output_size_are_copied_and_flipped_as_resampling_would():
    images = [torch.randint(0, 256, (3, 20, 24), dtype=torch.uint8) for _ in range(3)]
    images.append(torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8))  # resampled beside them
    params = torch.zeros(4, 17, dtype=torch.float64)
    params[:, 2:6] = torch.tensor([[0, 0, 20, 24]] * 3 + [[2, 3, 30, 40]])
    flips = torch.tensor([[False, False], [True, False], [True, True], [True, False]])
    for interpolation in (BILINEAR, BICUBIC):
        codes = torch.full((4,), interpolation)
        out = resample(images, *crop_axes(params, (20, 24)), flips, codes, (20, 24))
        assert torch.equal(out[0], images[0].float()) and torch.equal(out[1], images[1].float().flip(2))
        assert torch.equal(out[2], images[2].float().flip(1).flip(2))
        alone = resample(images[3:], *crop_axes(params[3:], (20, 24)), flips[3:], codes[3:], (20, 24))
        assert torch.equal(out[3], alone[0])


@pytest.mark.parametrize('interpolation, mode', [(BILINEAR, TF.InterpolationMode.BILINEAR),
                                                 (BICUBIC, TF.InterpolationMode.BICUBIC)])
def test_resampling_matches_pils_antialiased_filters(interpolation, mode):
    pixels = photo(120, 160)
    image = torch.from_numpy(pixels).permute(2, 0, 1)
    boxes = [(10, 20, 100, 90, 32), (5, 7, 20, 30, 64), (0, 0, 120, 160, 48), (3, 4, 40, 40, 40), (50, 60, 9, 70, 33)]
    for top, left, height, width, size in boxes:  # down- and upscaling, each axis its own way
        params = torch.zeros(1, 17, dtype=torch.float64)
        params[0, 2:6] = torch.tensor([top, left, height, width])
        out = resample([image], *crop_axes(params, (size, size)), torch.zeros(1, 2, dtype=torch.bool),
                       torch.tensor([interpolation]), (size, size))[0]
        expected = TF.resized_crop(Image.fromarray(pixels), top, left, height, width, [size, size], mode)
        difference = (out - torch.from_numpy(np.array(expected)).permute(2, 0, 1)).abs()
        assert difference.mean() < 0.4 and difference.max() < 1.5  # PIL rounds to uint8 after each pass


@pytest.mark.parametrize('jitter, interpolation, mean_tol, cpu_share', [
    ('0.0', 'bilinear', 0.5, '0'), ('0.4', 'random', 2.0, '0'), ('0.4 0.4 0.4 0.1', 'bicubic', 2.5, '0'),
    ('0.4', 'random', 2.0, '0.5'), ('0.4 0.4 0.4 0.1', 'bicubic', 2.5, '1')])
def test_training_batches_match_timms_transform_for_the_same_seeds(tmp_path, jitter, interpolation, mean_tol,
                                                                   cpu_share):
    samples = photos(tmp_path, [(48, 64), (64, 40), (50, 50), (36, 90)] * 2)
    config = train_config('--color-jitter', *jitter.split(), '--vflip', '0.3', '--decode', 'gpu',
                          '--cpu-decode-share', cpu_share)
    sampler = TrainBatchSampler(len(samples), BatchLayout.create(8, 1, None), rank=0, seed=5)
    x, y = first_batch(create_gpu_train_loader(samples, config, data_cfg(interpolation=interpolation), sampler, CPU))
    reference = create_transform(32, is_training=True, scale=tuple(config['scale']), ratio=tuple(config['ratio']),
                                 hflip=0.5, vflip=0.3, color_jitter=config['color_jitter'],
                                 interpolation=interpolation, mean=MEAN, std=STD)
    for k, (index, seed) in enumerate(next(iter(sampler))):
        seed_sample(seed)
        expected = reference(Image.open(samples[index][0]).convert('RGB'))
        difference = levels(x[k] - expected).abs()
        # the same crop, flips and jitter; left is PIL's uint8 rounding (and its truncating blends, ~0.5 level each)
        assert difference.mean() < mean_tol and y[k] == samples[index][1]
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_cpu_decode_share_picks_that_share_of_the_seeds_the_same_way_every_time():
    seeds = range(1000, 21000, 7)
    for share in (0.0, 0.25, 0.5, 1.0):
        picked = [s for s in seeds if decoded_on_cpu(s, share)]
        assert len(picked) / len(seeds) == pytest.approx(share, abs=0.02)
        assert picked == [s for s in seeds if decoded_on_cpu(s, share)]
    # not tied to the crop: the share of small crops is the same among the picked seeds as among all
    small = {s for s in seeds if random.Random(s).random() < 0.5}
    picked = [s for s in seeds if decoded_on_cpu(s, 0.5)]
    assert len(small.intersection(picked)) / len(picked) == pytest.approx(len(small) / len(seeds), abs=0.03)


def test_cpu_decoded_samples_arrive_as_pixels_at_the_output_size(tmp_path):
    samples = photos(tmp_path, [(48, 64), (64, 40), (50, 50), (36, 90)] * 2)
    config = train_config('--decode', 'gpu', '--cpu-decode-share', '0.5')
    augment = TrainAugment.create(config, data_cfg())
    dataset = EncodedImages(samples, augment)
    items = [dataset[(i, 100 + i, 32, 0.5)] for i in range(len(samples))]
    batch = collate(items)
    on_cpu = [i for i in range(len(samples)) if decoded_on_cpu(100 + i, 0.5)]
    assert 0 < len(on_cpu) < len(samples)
    assert [positions for positions, _ in batch.pixels] == [on_cpu]  # one stacked tensor, one transfer
    assert batch.pixels[0][1].shape == (len(on_cpu), 3, 32, 32)
    assert sorted(p for p, _, _ in batch.spans) == [i for i in range(len(samples)) if i not in on_cpu]
    assert all(batch.params[i, 0:6].tolist() == [32, 32, 0, 0, 32, 32] for i in on_cpu)


def test_cpu_decode_share_needs_the_device_path_and_nvimgcodec_must_be_there_when_asked_for(monkeypatch):
    with pytest.raises(UserError, match='cpu_decode_share splits the decoding of the device path'):
        train_config('--cpu-decode-share', '0.5', '--decode', 'cpu')
    monkeypatch.setattr(device_decode, '_create_nvimgcodec', lambda device: None)
    with pytest.raises(UserError, match='gpu_decoder: nvimgcodec, but nvImageCodec is not installed'):
        device_decode.JpegDecoder(torch.device('cuda'), 'nvimgcodec')


def test_jitter_operations_match_torchvision_on_each_image():
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    factors = torch.tensor([0.6, 1.0, 1.4])
    for op, reference in ((BRIGHTNESS, TF.adjust_brightness), (CONTRAST, TF.adjust_contrast),
                          (SATURATION, TF.adjust_saturation)):
        expected = torch.stack([reference(x[n], float(factors[n])) for n in range(3)])
        assert torch.allclose(JITTER[op](x.clone(), factors), expected, atol=2e-3)  # PIL's grey: 0.299, not 0.2989
    shifts = torch.tensor([-0.1, 0.0, 0.25])
    expected = torch.stack([TF.adjust_hue(x[n], float(shifts[n])) for n in range(3)])
    assert torch.allclose(JITTER[HUE](x.clone(), shifts), expected, atol=1e-5)


@pytest.mark.parametrize('crop_pct, interpolation', [(0.875, 'bilinear'), (0.95, 'bicubic'), (1.15, 'bilinear')])
def test_evaluation_batches_match_timms_eval_transform(tmp_path, crop_pct, interpolation):
    samples = photos(tmp_path, [(48, 64), (64, 40), (37, 37), (20, 50), (120, 41)])
    cfg = data_cfg(28, interpolation, crop_pct)
    x, y = first_batch(create_gpu_eval_loader(samples, cfg, EvalBatchSampler(len(samples), 8), 0, CPU))
    reference = create_transform(28, is_training=False, interpolation=interpolation, crop_pct=crop_pct, mean=MEAN,
                                 std=STD)
    for k, (path, label) in enumerate(samples):
        difference = levels(x[k] - reference(Image.open(path).convert('RGB'))).abs()
        assert difference.mean() < 0.5 and difference.max() < 1.5 and y[k] == label


@pytest.mark.parametrize('augment', [['--color-jitter', '0.4', '0.4', '0.4', '0.1'],
                                     ['--auto-augment', 'rand-m9-mstd0.5-inc1', '--cpu-decode-share', '0.5']])
def test_batches_are_the_same_twice_and_with_two_workers(shapes, augment):
    """Workers draw auto-augment ops from the global generators, which they do not restore: the draws must not
    depend on what a worker drew before."""
    samples = LazyImageFolder(str(shapes / 'train')).samples
    config = train_config(*augment)
    sampler = TrainBatchSampler(len(samples), BatchLayout.create(16, 1, None), rank=0, seed=7)
    batches = {}
    for workers in (0, 2):
        loader = create_gpu_train_loader(samples, dict(config, workers=workers), data_cfg(), sampler, CPU)
        assert (len(loader) == len(sampler)) and (loader.batch_sampler.sampler is sampler)
        try:
            batches[workers] = [list(loader)[:2] for _ in range(2)]
        finally:
            loader.close()
    for (x, y), (x2, y2), (x3, y3) in zip(batches[0][0], batches[0][1], batches[2][0]):
        assert torch.equal(x, x2) and torch.equal(x, x3) and torch.equal(y, y2) and torch.equal(y, y3)


def test_files_the_device_cannot_take_are_decoded_by_pil_like_the_cpu_path(tmp_path):
    pixels = photo(32, 32)
    files = [write(tmp_path / 'cmyk.jpg', pixels, 'CMYK', format='JPEG'),
             write(tmp_path / 'png.JPEG', pixels, format='PNG'),
             write(tmp_path / 'gray.jpg', pixels, 'L', format='JPEG'),
             write(tmp_path / 'progressive.jpg', pixels, format='JPEG', progressive=True)]
    payloads = [read_image(path)[0] for path in files]
    assert [p.dim() for p in payloads] == [3, 3, 1, 1]  # pixels from PIL for CMYK and PNG, bytes for the device
    samples = [(path, 0) for path in files]
    x, _ = first_batch(create_gpu_eval_loader(samples, data_cfg(32, crop_pct=1.0), EvalBatchSampler(4, 4), 0, CPU))
    for k, path in enumerate(files):  # 32 px images at 32 px, crop_pct 1: each output pixel is a source pixel
        expected = torch.from_numpy(np.array(Image.open(path).convert('RGB'))).permute(2, 0, 1).float()
        assert torch.allclose(levels(x[k]) + torch.tensor(MEAN).view(3, 1, 1) * 255, expected, atol=1e-3)


def test_bad_files_are_replaced_by_the_next_readable_one_and_named(tmp_path, caplog):
    samples = photos(tmp_path, [(32, 32)] * 6)
    (tmp_path / 'empty.jpg').write_bytes(b'')
    (tmp_path / 'text.jpg').write_text('not an image')
    good = open(samples[0][0], 'rb').read()
    (tmp_path / 'cut.jpg').write_bytes(good[:len(good) // 2])
    huffman = bytearray(good)  # a broken Huffman table: the header reads, the decoders fail (on the device too)
    start = huffman.index(b'\xff\xc4')
    huffman[start + 5:start + 21] = bytes([255] * 16)
    (tmp_path / 'huffman.jpg').write_bytes(bytes(huffman))
    bad = [(str(tmp_path / name), 9) for name in ('empty.jpg', 'text.jpg', 'cut.jpg', 'huffman.jpg')]
    samples = samples[:1] + bad[:2] + samples[1:2] + bad[2:] + samples[2:]  # bad files at 1, 2, 4, 5
    cfg = data_cfg(32, crop_pct=1.0)
    with caplog.at_level(logging.WARNING):
        loader = create_gpu_eval_loader(samples, cfg, EvalBatchSampler(len(samples), 5), 0, CPU, max_bad_images=1.0)
        try:
            (x, y), (x2, y2) = list(loader)
        finally:
            loader.close()
    clean, _ = first_batch(create_gpu_eval_loader([samples[i] for i in (0, 3, 6)], cfg, EvalBatchSampler(3, 3), 0,
                                                  CPU))
    assert torch.equal(x[1], clean[1]) and torch.equal(x[2], clean[1])  # 1 and 2 become 3, with its label
    assert torch.equal(x[4], clean[2]) and torch.equal(x2[0], clean[2])  # 4 and 5 become 6
    assert y.tolist() == [0, 1, 1, 1, 2] and y2.tolist()[0] == 2
    for path, _ in bad:
        assert sum(path in record.getMessage() for record in caplog.records) == 1


def test_more_bad_files_than_max_bad_images_stop_the_run_in_one_line(tmp_path):
    samples = photos(tmp_path, [(32, 32)] * 4)
    (tmp_path / 'empty.jpg').write_bytes(b'')
    samples[1] = (str(tmp_path / 'empty.jpg'), 0)
    loader = create_gpu_eval_loader(samples, data_cfg(), EvalBatchSampler(4, 4), 0, CPU, max_bad_images=0.1)
    try:
        with pytest.raises(UserError, match=r'^1 unreadable image.*max_bad_images') as error:
            list(loader)
    finally:
        loader.close()
    assert '\n' not in str(error.value)


@pytest.mark.parametrize('policy, message', [
    ('augmix-m5-w4-d2', "decode: gpu applies timm's rand-\\* and AutoAugment strings and ta_wide, not auto_augment"),
    ('rand-m9-mstd0.5-t3a', 'decode: gpu has no device version of auto-augment op'),
    ('rand-m9-q5', 'augmentation settings refused by timm')])
def test_auto_augments_without_a_device_version_are_refused_in_one_line(tmp_path, policy, message):
    config = train_config('--auto-augment', policy)
    sampler = TrainBatchSampler(8, BatchLayout.create(8, 1, None), rank=0, seed=0)
    with pytest.raises(UserError, match=message) as error:
        create_gpu_train_loader(photos(tmp_path, [(32, 32)] * 8), config, data_cfg(), sampler, CPU)
    assert '\n' not in str(error.value)


def test_output_is_normalised_float_nchw_with_int64_labels(tmp_path):
    colour = np.array([200, 100, 30], dtype=np.uint8)
    samples = [(write(tmp_path / f'{i}.jpg', np.broadcast_to(colour, (40, 56, 3)).copy(), quality=100), i)
               for i in range(4)]
    sampler = TrainBatchSampler(4, BatchLayout.create(4, 1, None), rank=0, seed=1)
    x, y = first_batch(create_gpu_train_loader(samples, train_config('--color-jitter', '0'), data_cfg(), sampler, CPU))
    expected = (torch.tensor(colour / 255.0, dtype=torch.float32) - torch.tensor(MEAN)) / torch.tensor(STD)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and x.is_contiguous()
    assert torch.allclose(x, expected.view(1, 3, 1, 1).expand_as(x), atol=1.5 / 255 / min(STD))
    assert y.dtype == torch.int64 and sorted(y.tolist()) == [0, 1, 2, 3]


def test_decoding_falls_back_to_pil_when_the_device_decoder_fails(tmp_path, monkeypatch):
    samples = photos(tmp_path, [(30, 44)] * 3)
    cfg = data_cfg(28)
    expected, _ = first_batch(create_gpu_eval_loader(samples, cfg, EvalBatchSampler(3, 3), 0, CPU))
    monkeypatch.setattr(device_decode.JpegDecoder, '__call__', lambda self, encoded: [None] * len(encoded))
    x, _ = first_batch(create_gpu_eval_loader(samples, cfg, EvalBatchSampler(3, 3), 0, CPU))
    assert torch.equal(x, expected)  # libjpeg through torchvision and through PIL give the same pixels



def test_background_batches_come_in_order_and_their_errors_reach_the_consumer():
    def produce():
        yield from range(5)
        raise UserError('bad batch')
    received = []
    with pytest.raises(UserError, match='bad batch'):
        for item in in_background(produce, depth=2):
            received.append(item)
    assert received == [0, 1, 2, 3, 4]


def test_leaving_background_batches_early_stops_their_thread():
    made = []

    def produce():
        for i in itertools.count():
            made.append(i)
            yield i
    batches = in_background(produce, depth=2)
    assert next(batches) == 0
    batches.close()
    assert [t for t in threading.enumerate() if t.name == 'device-batches'] == []
    assert len(made) <= 4  # the one taken, two queued, one being made


AUTO_AUGMENTS = ['rand-m9-mstd0.5-inc1', 'rand-n3-m7-mstd101-inc0-p0.8', 'original', 'v0', 'ta_wide']


@pytest.mark.parametrize('auto_augment', AUTO_AUGMENTS)
def test_the_workers_share_of_an_auto_augment_run_is_timms_cpu_transform_to_the_pixel(tmp_path, auto_augment):
    """cpu_decode_share 1.0: each sample's crop, flips and auto-augment ops are drawn as timm's (or torchvision's)
    transform draws them from the sample's seed, and applied by the same PIL functions: the CPU path's pixels."""
    samples = photos(tmp_path, [(48, 64), (64, 40), (50, 50), (36, 90)] * 6)
    config = train_config('--auto-augment', auto_augment, '--vflip', '0.3', '--decode', 'gpu')
    cpu = train_transform(config, data_cfg())
    dataset = EncodedImages(samples, TrainAugment.create(config, data_cfg()))
    for index in range(len(samples)):
        seed = 1000 + 7 * index
        seed_sample(seed)
        expected = cpu(open_image(samples[index][0]))
        encoded = dataset[(index, seed, 32, 1.0)]
        assert torch.equal(encoded.payload, expected), index
        assert encoded.params[7:9] == [False, False] and set(encoded.params[17:]) == {0.0}  # nothing left to do


@pytest.mark.parametrize('auto_augment', AUTO_AUGMENTS)
def test_auto_augment_ops_drawn_for_the_device_are_timms_draws(tmp_path, auto_augment):
    """The ops the device applies (cpu_decode_share 0) are those the workers apply (share 1) to the same samples."""
    samples = photos(tmp_path, [(48, 64), (64, 40)] * 10)
    config = train_config('--auto-augment', auto_augment, '--decode', 'gpu', '--train-interpolation', 'bicubic')
    augment = TrainAugment.create(config, data_cfg(interpolation='bicubic'))
    applied = []
    for index in range(len(samples)):
        drawn = EncodedImages(samples, augment)[(index, 500 + index, 32, 0.0)].params
        ops = drawn[17:]
        assert len(ops) == 3 * augment.auto.layers and drawn[2:6] != [0, 0, 32, 32]
        applied += [OPS[int(code)] for code in ops[0::3] if code]
        assert all(int(resample) in (0, 3) for resample in ops[2::3])  # bicubic where an op resamples
    assert len(set(applied)) >= 5  # the draws vary from sample to sample


@pytest.mark.parametrize('auto_augment', AUTO_AUGMENTS)
def test_auto_augment_on_the_device_gives_timms_cpu_transform(tmp_path, auto_augment):
    """cpu_decode_share 0: the device crops, resizes, flips and auto-augments. Its ops match PIL's to the level
    (tests/test_device_autoaugment.py); what is left is the resize's rounding (under a level), which solarize or a
    histogram op turns into larger differences on a few pixels of a few images."""
    samples = photos(tmp_path, [(48, 64), (64, 40), (50, 50), (36, 90)] * 4)
    config = train_config('--auto-augment', auto_augment, '--decode', 'gpu', '--cpu-decode-share', '0')
    sampler = TrainBatchSampler(len(samples), BatchLayout.create(16, 1, None), rank=0, seed=5)
    x, y = first_batch(create_gpu_train_loader(samples, config, data_cfg(), sampler, CPU))
    reference = train_transform(dict(config, jpeg_draft=False), data_cfg())
    differences = []
    for k, (index, seed) in enumerate(next(iter(sampler))):
        seed_sample(seed)
        expected = (reference(open_image(samples[index][0])) / 255 - torch.tensor(MEAN).view(-1, 1, 1)) / \
            torch.tensor(STD).view(-1, 1, 1)
        differences.append(levels(x[k] - expected).abs().mean())
        assert y[k] == samples[index][1]
    differences = torch.stack(differences)
    assert differences.median() < 0.6 and differences.mean() < 3.0
