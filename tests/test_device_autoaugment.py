"""training.data.device_autoaugment against PIL, run through timm's and torchvision's own op functions."""
import numpy as np
import pytest
import timm.data.auto_augment as timm_aa
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.autoaugment import _apply_op

from training.data.device_autoaugment import BICUBIC, BILINEAR, NEAREST, OPS, apply_ops, posterize, ta_wide_op

# Largest allowed difference from PIL, in levels of 255 (mean absolute and max), for every op, argument and filter.
# Measured: 0 and 0 everywhere (Pillow 13 on x86-64). A Pillow built to fuse multiply-adds (aarch64) may round a
# rare pixel differently.
MEAN_TOLERANCE = 0.0
MAX_TOLERANCE = 0

TIMM_FILL = (124, 116, 104)  # timm's img_mean for ImageNet
FILTERS = (NEAREST, BILINEAR, BICUBIC)
NO_ARG = ('auto_contrast', 'equalize', 'invert')


def make_images(n: int = 6, height: int = 40, width: int = 56, seed: int = 0) -> np.ndarray:
    """uint8 [n, H, W, 3]: smooth colour gradients in a random direction with noise, each in its own value range;
    the last image has a flat channel (the degenerate case of auto_contrast and equalize)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / np.array([height, width]).reshape(2, 1, 1)
    images = []
    for _ in range(n):
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
        lo, hi = rng.uniform(0, 80), rng.uniform(160, 255)
        image = lo + (hi - lo) * (0.5 + 0.5 * np.sin(3 * ramp + rng.uniform(0, 6, 3))) + rng.normal(0, 10, ramp.shape)
        images.append(np.clip(np.round(image), lo, hi).astype(np.uint8))
    images[-1][..., 2] = 77
    return np.stack(images)


IMAGES = make_images()


def as_batch(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float()


def timm_op(image: Image.Image, op: str, arg: float, resample: int, fill: tuple) -> Image.Image:
    if op == 'identity':
        return image
    args = () if op in NO_ARG else (arg,)
    return getattr(timm_aa, op)(image, *args, fillcolor=fill, resample=resample)


def apply_one(op: str, arg: float, resample: int = NEAREST, fill: tuple = TIMM_FILL) -> torch.Tensor:
    """The op on every image of IMAGES, as uint8-valued [n, H, W, 3]."""
    layers = torch.tensor([[[OPS.index(op), arg, resample]]] * len(IMAGES), dtype=torch.float64)
    return apply_ops(as_batch(IMAGES), layers, fill).permute(0, 2, 3, 1)


def assert_matches(out: torch.Tensor, reference: list):
    diff = (out.double() - torch.from_numpy(np.stack([np.asarray(image) for image in reference])).double()).abs()
    mean, worst = diff.mean().item(), diff.max().item()
    assert mean <= MEAN_TOLERANCE and worst <= MAX_TOLERANCE, f'mean {mean:.4f}, max {worst:.0f} levels'


COLOUR_CASES = [('auto_contrast', 0), ('equalize', 0), ('invert', 0),
                ('posterize', 1), ('posterize', 4), ('posterize', 7), ('posterize', 8),
                ('solarize', 0), ('solarize', 128), ('solarize', 200.5), ('solarize', 256),
                ('solarize_add', 0), ('solarize_add', 60), ('solarize_add', 110)]
COLOUR_CASES += [(op, factor) for op in ('contrast', 'color', 'brightness', 'sharpness')
                 for factor in (0.1, 0.37, 1.0, 1.9)]


@pytest.mark.parametrize('op,arg', COLOUR_CASES)
def test_colour_and_histogram_ops_match_pil(op, arg):
    reference = [timm_op(Image.fromarray(image), op, arg, NEAREST, TIMM_FILL) for image in IMAGES]
    assert_matches(apply_one(op, arg), reference)


GEOMETRY_CASES = [('rotate', 30), ('rotate', -30), ('rotate', 45), ('rotate', -12.7), ('rotate', 180),
                  ('shear_x', 0.3), ('shear_x', -0.17), ('shear_y', 0.3), ('shear_y', -0.3),
                  ('translate_x_rel', 0.45), ('translate_x_rel', -0.2234), ('translate_y_rel', 0.1),
                  ('translate_y_rel', -0.45), ('translate_x_abs', 10), ('translate_x_abs', -7.3),
                  ('translate_y_abs', 3.7), ('translate_y_abs', -10), ('translate_x_abs', 250)]


@pytest.mark.parametrize('resample', FILTERS)
@pytest.mark.parametrize('op,arg', GEOMETRY_CASES)
def test_geometric_ops_match_pil(op, arg, resample):
    reference = [timm_op(Image.fromarray(image), op, arg, resample, TIMM_FILL) for image in IMAGES]
    assert_matches(apply_one(op, arg, resample), reference)


def test_geometric_ops_match_pil_on_an_odd_sized_image():
    """Odd sizes put the rotation centre between pixels."""
    images = make_images(2, 39, 55, seed=1)
    for op, arg in [('rotate', 21.5), ('shear_y', -0.23), ('translate_x_rel', 0.3)]:
        for resample in FILTERS:
            layers = torch.tensor([[[OPS.index(op), arg, resample]]] * 2, dtype=torch.float64)
            out = apply_ops(as_batch(images), layers, TIMM_FILL).permute(0, 2, 3, 1)
            assert_matches(out, [timm_op(Image.fromarray(image), op, arg, resample, TIMM_FILL) for image in images])


def test_posterize_to_zero_bits_gives_black():
    """timm's posterize passes 0 bits on to Pillow, which Pillow 13 rejects; older Pillow gave black."""
    with pytest.raises(ValueError):
        timm_aa.posterize(Image.fromarray(IMAGES[0]), 0)
    out = posterize(as_batch(IMAGES), torch.zeros(len(IMAGES), dtype=torch.float64))
    assert out.abs().max().item() == 0


# per sample: (op, arg, resample) of layer 0 and of layer 1; layer 1 has rotate with two filters and a lone equalize
CHAIN = [[('rotate', -25, BICUBIC), ('equalize', 0, 0)],
         [('identity', 0, 0), ('shear_x', 0.2, NEAREST)],
         [('color', 1.6, 0), ('rotate', 14, BILINEAR)],
         [('translate_y_rel', -0.3, BILINEAR), ('rotate', -7, NEAREST)],
         [('posterize', 3, 0), ('identity', 0, 0)],
         [('rotate', 12, BICUBIC), ('sharpness', 1.8, 0)]]


def test_two_layers_of_mixed_ops_match_the_pil_chain():
    layers = torch.tensor([[[OPS.index(op), arg, resample] for op, arg, resample in sample] for sample in CHAIN],
                          dtype=torch.float64)
    out = apply_ops(as_batch(IMAGES), layers, TIMM_FILL).permute(0, 2, 3, 1)
    reference = []
    for image, sample in zip(IMAGES, CHAIN):
        image = Image.fromarray(image)
        for op, arg, resample in sample:
            image = timm_op(image, op, arg, resample, TIMM_FILL)
        reference.append(image)
    assert_matches(out, reference)


def test_identity_leaves_a_sample_unchanged():
    layers = torch.tensor([[[OPS.index('identity'), 0, 0]], [[OPS.index('invert'), 0, 0]]], dtype=torch.float64)
    x = as_batch(IMAGES[:2])
    out = apply_ops(x.clone(), layers, TIMM_FILL)
    assert torch.equal(out[0], x[0])
    assert torch.equal(out[1], 255 - x[1])


def test_an_op_drawn_by_a_single_sample_and_an_empty_batch():
    layers = torch.zeros(len(IMAGES), 1, 3, dtype=torch.float64)
    layers[3, 0] = torch.tensor([OPS.index('rotate'), 40, BILINEAR])
    out = apply_ops(as_batch(IMAGES), layers, TIMM_FILL)
    rotated = timm_op(Image.fromarray(IMAGES[3]), 'rotate', 40, BILINEAR, TIMM_FILL)
    assert_matches(out[3:4].permute(0, 2, 3, 1), [rotated])
    assert torch.equal(out[[0, 1, 2, 4, 5]], as_batch(IMAGES)[[0, 1, 2, 4, 5]])
    empty = apply_ops(torch.zeros(0, 3, 40, 56), torch.zeros(0, 2, 3, dtype=torch.float64), TIMM_FILL)
    assert empty.shape == (0, 3, 40, 56)


def test_unknown_resample_code_is_rejected():
    layers = torch.tensor([[[OPS.index('rotate'), 10, 1]]], dtype=torch.float64)  # 1 = PIL's LANCZOS
    with pytest.raises(ValueError):
        apply_ops(as_batch(IMAGES[:1]), layers, TIMM_FILL)


TA_CASES = [('Identity', 0.0), ('ShearX', 0.99), ('ShearX', -0.33), ('ShearY', 0.66), ('ShearY', -0.99),
            ('TranslateX', 32.0), ('TranslateX', -9.6), ('TranslateY', 19.2), ('TranslateY', -32.0),
            ('Rotate', 135.0), ('Rotate', -45.0), ('Rotate', 76.5), ('Brightness', 0.99), ('Brightness', -0.66),
            ('Color', 0.33), ('Color', -0.99), ('Contrast', 0.66), ('Contrast', -0.33), ('Sharpness', 0.99),
            ('Sharpness', -0.99), ('Posterize', 8.0), ('Posterize', 5.0), ('Posterize', 2.0), ('Solarize', 255.0),
            ('Solarize', 127.5), ('Solarize', 0.0), ('AutoContrast', 0.0), ('Equalize', 0.0)]


@pytest.mark.parametrize('name,magnitude', TA_CASES)
def test_trivial_augment_wide_ops_match_torchvision(name, magnitude):
    op, arg = ta_wide_op(name, magnitude)
    for interpolation, resample in ((InterpolationMode.NEAREST, NEAREST), (InterpolationMode.BILINEAR, BILINEAR)):
        reference = [_apply_op(Image.fromarray(image), name, magnitude, interpolation=interpolation, fill=None)
                     for image in IMAGES]
        assert_matches(apply_one(OPS[op], arg, resample, fill=(0, 0, 0)), reference)
