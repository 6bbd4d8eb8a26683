"""A training sample's augmentation on the device path, drawn in a loader worker from the sample's seed as timm's CPU
transforms draw it, and carried to the device as one float64 row per sample.

The draws come from generators seeded as seed_sample() seeds the CPU path's, in timm's order: Python's random for the
crop as RandomResizedCropAndInterpolation.get_params draws it, torch's for flips and ColorJitter, then the
auto-augment's own draws (numpy's and Python's for timm's, torch's for TrivialAugmentWide). So a sample gets the same
crop, flips, jitter factors and auto-augment ops as `decode: cpu` gives it.
"""
import copy
import math
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.utils.data
from PIL import Image
from timm.data import auto_augment as timm_auto_augment
from torchvision import transforms
from torchvision.transforms import TrivialAugmentWide
from torchvision.transforms.functional import pil_modes_mapping

from ..config import TA_WIDE, UserError
from .cpu_path import auto_augment_ops, posterize, train_transform
from .device_autoaugment import OPS, ta_wide_op

NEAREST, BILINEAR, BICUBIC = 0, 1, 2
INTERPOLATIONS = {'nearest': NEAREST, 'bilinear': BILINEAR, 'bicubic': BICUBIC}
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3  # torchvision ColorJitter's operation ids
IDENTITY_FACTORS = (1.0, 1.0, 1.0, 0.0)
# timm's auto-augment image functions that draw their resample (the rest ignore it), and those without an argument
GEOMETRIC = ('rotate', 'shear_x', 'shear_y', 'translate_x_rel', 'translate_y_rel', 'translate_x_abs', 'translate_y_abs')
NO_ARGUMENT = ('auto_contrast', 'equalize', 'invert')
INTEGER_ARGUMENT = ('posterize', 'solarize', 'solarize_add')
# a training sample's parameters, one float64 row per sample
# then AUTO: the auto-augment's (op, argument, resample) of each layer
SIZE, CROP, INTERP, FLIPS, ORDER, FACTORS, AUTO = (slice(0, 2), slice(2, 6), 6, slice(7, 9), slice(9, 13),
                                                   slice(13, 17), slice(17, None))


def crop_box(rng: random.Random, height: int, width: int, scale: tuple, ratio: tuple) -> tuple:
    """RandomResizedCrop's (top, left, height, width), drawn as timm's get_params draws it from Python's random.

    Ten tries of area and log-uniform aspect ratio; then the largest centred box within the ratio range.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if (w <= width) and (h <= height):
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    if width / height < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif width / height > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class TrainAugment:
    """timm's training transform (RandomResizedCrop, flips, ColorJitter) as per-sample parameters."""
    size: tuple  # output (height, width)
    scale: tuple
    ratio: tuple
    interpolation: str  # 'bilinear', 'bicubic', 'nearest' or 'random' (bilinear or bicubic per image)
    hflip: float
    vflip: float
    jitter: tuple  # (lo, hi) ranges of brightness, contrast, saturation, hue factors; None where off
    auto: Optional['AutoAugmentDraws'] = None

    @classmethod
    def create(cls, config: dict, data_cfg: dict) -> 'TrainAugment':
        interpolation = data_cfg['interpolation']
        if interpolation not in (*INTERPOLATIONS, 'random'):
            raise UserError(f'decode: gpu resizes with bilinear, bicubic or nearest interpolation, not '
                            f'{interpolation!r}')
        auto = AutoAugmentDraws.create(config, data_cfg)
        return cls(tuple(data_cfg['input_size'][1:]), tuple(config['scale']), tuple(config['ratio']), interpolation,
                   config['hflip'], config['vflip'], jitter_ranges(config), auto)

    def draw(self, seed: int, height: int, width: int) -> list:
        """One sample's parameters (see the row layout above), drawn in the order timm's transforms draw them."""
        rng = random.Random(seed)
        gen = torch.Generator().manual_seed(seed)
        box = crop_box(rng, height, width, self.scale, self.ratio)
        interpolation = rng.choice(('bilinear', 'bicubic')) if self.interpolation == 'random' else self.interpolation
        flips = [(p > 0) and bool(torch.rand(1, generator=gen) < p) for p in (self.hflip, self.vflip)]
        auto = self.auto.draw(rng, gen, seed) if self.auto is not None else []
        order = torch.randperm(4, generator=gen).tolist()
        factors = [identity if r is None else float(torch.empty(1).uniform_(r[0], r[1], generator=gen))
                   for identity, r in zip(IDENTITY_FACTORS, self.jitter)]
        return [height, width, *box, INTERPOLATIONS[interpolation], *flips, *order, *factors, *auto]


def jitter_ranges(config: dict) -> tuple:
    """ColorJitter's (lo, hi) ranges of brightness, contrast, saturation and hue (None where off), as timm's
    create_transform sets them: off with an auto-augment, except timm's '3a' ones."""
    augment = config['auto_augment']
    jitter = config['color_jitter']
    if (augment and ('3a' not in augment)) or (augment == TA_WIDE) or (jitter is None):
        return (None,) * 4
    jitter = tuple(jitter) if isinstance(jitter, (list, tuple)) else (float(jitter),) * 3
    try:  # torchvision's own checks and (lo, hi) ranges, so both paths accept the same values
        reference = transforms.ColorJitter(*jitter)
    except (TypeError, ValueError) as e:
        raise UserError(f"color_jitter {config['color_jitter']!r} refused by torchvision: {e}") from None
    return tuple(None if r is None else (float(r[0]), float(r[1]))
                 for r in (reference.brightness, reference.contrast, reference.saturation, reference.hue))


class _Record:
    """Stands in for one of timm's auto-augment image functions: appends (op, argument, resample) to the list it is
    handed instead of an image. A geometric op draws its resample from a list as timm's _interpolation does."""

    def __init__(self, name: str):
        self.code, self.geometric = OPS.index(name), name in GEOMETRIC

    def __call__(self, ops: list, *args, **kwargs) -> list:
        resample = kwargs.get('resample', 0)
        if isinstance(resample, (list, tuple)):
            resample = random.choice(resample) if self.geometric else 0
        ops.append((self.code, float(args[0]) if args else 0.0, int(resample)))
        return ops


@contextmanager
def _global_generators(rng: random.Random, gen: torch.Generator, seed: int):
    """Python's, NumPy's and torch's global generators at the states timm's transforms would find them in (as
    seed_sample() seeds them, advanced as far as `rng` and `gen`): timm's and torchvision's auto-augments draw from the
    global ones. In the main process (a replacement for a file the device could not decode) they are restored
    afterwards, the training step's draws being theirs; a loader worker's serve nothing else, and saving NumPy's
    alone would double the cost of a sample's draws."""
    saved = None
    if torch.utils.data.get_worker_info() is None:
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.setstate(rng.getstate())
    np.random.seed(seed % (2 ** 32))
    torch.set_rng_state(gen.get_state())
    try:
        yield
    finally:
        rng.setstate(random.getstate())
        gen.set_state(torch.get_rng_state())
        if saved is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


class AutoAugmentDraws:
    """The run's auto-augment as `layers` (op, argument, resample) triples per sample, ops named as in
    device_autoaugment.OPS (0: none).

    timm's RandAugment or AutoAugment draws them itself: a copy of timm's own object whose image functions record
    instead of apply, so the op choice, probabilities, magnitude noise, signs and resampling are timm's draws.
    torchvision's TrivialAugmentWide (ta_wide) is drawn as its forward() draws.
    """

    def __init__(self, recorder, layers: int, fill: tuple, resample: int):
        self.recorder = recorder
        self.layers = layers
        self.fill = fill  # the fill of the geometric ops: timm's img_mean, torchvision's black
        self.resample = resample  # TrivialAugmentWide's

    @classmethod
    def create(cls, config: dict, data_cfg: dict) -> Optional['AutoAugmentDraws']:
        if not config['auto_augment']:
            return None
        found = [t for t in train_transform(dict(config, jpeg_draft=False), data_cfg).transforms
                 if isinstance(t, (timm_auto_augment.RandAugment, timm_auto_augment.AutoAugment, TrivialAugmentWide))]
        if not found:
            raise UserError(f"decode: gpu applies timm's rand-* and AutoAugment strings and ta_wide, not auto_augment "
                            f"{config['auto_augment']!r}")
        augment = found[0]
        if isinstance(augment, TrivialAugmentWide):
            return cls(augment, 1, (0, 0, 0), pil_modes_mapping[augment.interpolation])
        recorder = copy.deepcopy(augment)
        ops = auto_augment_ops([recorder])
        for op in ops:
            if op.aug_fn.__name__ not in OPS:
                raise UserError(f'decode: gpu has no device version of auto-augment op {op.name}')
            op.aug_fn = _Record(op.aug_fn.__name__)
        layers = recorder.num_layers if isinstance(recorder, timm_auto_augment.RandAugment) else \
            max(len(sub_policy) for sub_policy in recorder.policy)
        return cls(recorder, layers, tuple(ops[0].kwargs['fillcolor']), 0)

    def draw(self, rng: random.Random, gen: torch.Generator, seed: int) -> list:
        """The layers' triples, flat, drawn after the crop and flips (`rng`, `gen` as far as those drew)."""
        with _global_generators(rng, gen, seed):
            ops = self._trivial_augment() if isinstance(self.recorder, TrivialAugmentWide) else self.recorder([])
        ops += [(0, 0.0, 0)] * (self.layers - len(ops))
        return [value for op in ops for value in op]

    def _trivial_augment(self) -> list:
        augment = self.recorder
        space = augment._augmentation_space(augment.num_magnitude_bins)  # torchvision 0.29's table of ops
        name = list(space)[int(torch.randint(len(space), (1,)).item())]
        magnitudes, signed = space[name]
        magnitude = (float(magnitudes[torch.randint(len(magnitudes), (1,), dtype=torch.long)].item())
                     if magnitudes.ndim > 0 else 0.0)
        if signed and torch.randint(2, (1,)):
            magnitude *= -1.0
        return [(*ta_wide_op(name, magnitude), self.resample)]

    def apply_pil(self, image: Image.Image, ops: list) -> Image.Image:
        """A sample's ops (its row's AUTO part) applied by timm's image functions, for the workers' own share."""
        for code, argument, resample in zip(ops[0::3], ops[1::3], ops[2::3]):
            name = OPS[int(code)]
            if name != 'identity':
                if (name in INTEGER_ARGUMENT) and float(argument).is_integer():
                    argument = int(argument)  # as timm's level functions hand them over: PIL's posterize needs one
                arguments = () if name in NO_ARGUMENT else (argument,)
                function = posterize if name == 'posterize' else getattr(timm_auto_augment, name)
                image = function(image, *arguments, fillcolor=self.fill, resample=int(resample))
        return image


def decoded_on_cpu(seed: int, share: float) -> bool:
    """Whether a training sample's worker decodes it (a `share` of the seeds), the same choice in every pass.

    A multiplicative hash of the seed: the crop's draws come from random.Random(seed), whose first number would tie the
    choice to the crop's area, and with it the decoding cost.
    """
    return ((seed * 2654435761) % 2 ** 32) < share * 2 ** 32


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on the device without waiting: a copy from pageable memory waits for the device's queue."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == 'cuda' else t
