"""The CPU input path (`decode: cpu`): loader workers decode and augment each image with timm's transforms, and timm's
PrefetchLoader normalises the batch on the device.

The training crop decodes a JPEG at reduced size where the crop allows (jpeg_draft, see files.decode_crop): the box is
drawn by timm's own RandomResizedCropAndInterpolation.get_params on the size read from the file's header, so the crops
are timm's.
"""
import random
from functools import partial
from typing import Callable, Optional

import torch
import torch.utils.data
from PIL import Image
from timm.data import auto_augment as timm_auto_augment
from timm.data import create_transform
from timm.data.loader import PrefetchLoader, fast_collate
from timm.data.transforms import RandomResizedCropAndInterpolation, interp_mode_to_str, str_to_pil_interp
from torchvision import transforms
from torchvision.transforms import InterpolationMode, TrivialAugmentWide

from ..config import TA_WIDE, UserError
from .files import decode_crop
from .sampling import ImageSizes, SizedBatches, TrainBatchSampler, seed_sample
from .sources import LazyImageFolder
from .workers import CheckedLoader, worker_loader


class DraftRandomResizedCrop(RandomResizedCropAndInterpolation):
    """timm's random resized crop that decodes the image itself, at reduced size when the crop allows.

    The box comes from timm's get_params on the header's size, then the interpolation, drawn as timm draws them, so
    a seed gives the crop timm's transform gives; only the pixels differ, by the DCT scaling's resampling.
    """
    takes_opened_image = True

    @classmethod
    def like(cls, crop: RandomResizedCropAndInterpolation) -> 'DraftRandomResizedCrop':
        draft = cls(crop.size, scale=crop.scale, ratio=crop.ratio)
        draft.interpolation = crop.interpolation
        return draft

    def __call__(self, img: Image.Image) -> Image.Image:
        i, j, h, w = self.get_params(img, self.scale, self.ratio)
        if isinstance(self.interpolation, (tuple, list)):
            interpolation = random.choice(self.interpolation)
        else:
            interpolation = self.interpolation
        resample = str_to_pil_interp(interp_mode_to_str(interpolation))
        return decode_crop(img, (j, i, j + w, i + h), self.size[::-1], resample)


def with_draft_crop(transform: transforms.Compose) -> transforms.Compose:
    """timm's training transform with its RandomResizedCropAndInterpolation decoding at reduced size."""
    return transforms.Compose([DraftRandomResizedCrop.like(t) if type(t) is RandomResizedCropAndInterpolation else t
                               for t in transform.transforms])


class SeededSamples(torch.utils.data.Dataset):
    """(index, seed) items, each loaded with its augmentation seeded from its own seed, so that it does not depend on
    which worker loads it or on what that worker loaded before. A LazyImageFolder seeds again before each try of a
    bad file's replacement, so a replaced sample is the same on every run.

    With `transform_at` (a size -> transform builder), items are (index, seed, size) and each is loaded with the
    transform of its size, built once per size and process.
    """

    def __init__(self, dataset, transform_at: Optional[Callable[[int], Callable]] = None):
        self.dataset = dataset
        self.transform_at = transform_at
        self.transforms = {}
        self.size = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed, *size = item
        if size and (size[0] != self.size):
            self._use_size(size[0])
        if isinstance(self.dataset, LazyImageFolder):
            return self.dataset.load(index, seed)
        seed_sample(seed)
        return self.dataset[index]

    def _use_size(self, size: int):
        if size not in self.transforms:
            self.transforms[size] = self.transform_at(size)
        self.dataset.transform = self.transforms[size]
        self.size = size


def _checked_loader(dataset, batch_sampler, data_cfg: dict, workers: int, device, bad_images,
                    max_bad: Optional[float]) -> CheckedLoader:
    """timm's collate and prefetcher around a DataLoader that takes its batches from our batch sampler.

    timm's create_loader() takes no sampler: it picks RandomSampler, DistributedSampler or OrderedDistributedSampler
    itself (the last pads the validation set with duplicates). Exact mid-epoch resume, batches that do not depend on
    the number of processes, and exact distributed validation need our samplers, so the loader is built here from the
    same parts.
    """
    loader = worker_loader(dataset, batch_sampler, workers, fast_collate, pin_memory=device.type == 'cuda')
    prefetcher = PrefetchLoader(loader, mean=data_cfg['mean'], std=data_cfg['std'],
                                channels=data_cfg['input_size'][0], device=device)
    return CheckedLoader(loader, prefetcher, bad_images, max_bad)


def create_cpu_train_loader(dataset, config: dict, data_cfg: dict, sampler: TrainBatchSampler, device,
                            sizes: Optional[ImageSizes] = None) -> CheckedLoader:
    """This process's training loader over `sampler`'s micro-batches (a CheckedLoader: close() it when done).

    With progressive resizing (`sizes`), each epoch trains at its size; the workers persist.
    """
    dataset.transform = train_transform(config, data_cfg)
    max_bad = config['max_bad_images'] * sampler.steps_per_epoch * sampler.layout.per_process
    samples, batches = SeededSamples(dataset), sampler
    if sizes is not None:
        samples = SeededSamples(dataset, partial(_sized_train_transform, config, data_cfg))
        batches = SizedBatches(sampler, sizes)
    return _checked_loader(samples, batches, data_cfg, config['workers'], device,
                           getattr(dataset, 'bad_images', None), max_bad)


def _sized_train_transform(config: dict, data_cfg: dict, size: int):
    channels = data_cfg['input_size'][0]
    return train_transform(config, dict(data_cfg, input_size=(channels, size, size)))


def train_transform(config: dict, data_cfg: dict):
    """timm's training transform for these settings, as create_loader() builds it, or with torchvision's
    TrivialAugmentWide in place of timm's auto-augment for `auto_augment: ta_wide`; with jpeg_draft, its random
    resized crop decodes JPEGs at reduced size where the crop allows (see files.decode_crop)."""
    ta_wide = config['auto_augment'] == TA_WIDE
    try:
        crop_and_flips, augment, to_tensor = create_transform(
            data_cfg['input_size'],
            is_training=True,
            scale=tuple(config['scale']),
            ratio=tuple(config['ratio']),
            hflip=config['hflip'],
            vflip=config['vflip'],
            color_jitter=None if ta_wide else config['color_jitter'],  # timm turns it off for its own auto-augment too
            auto_augment=None if ta_wide else config['auto_augment'],
            interpolation=data_cfg['interpolation'],
            mean=data_cfg['mean'],
            std=data_cfg['std'],
            re_prob=0.0,  # applied per step by create_random_erasing(), see there
            use_prefetcher=True,  # uint8 images: the PrefetchLoader normalises them on the device
            separate=True,
        )
    except (AssertionError, ValueError, KeyError) as e:  # timm's checks of the augmentation settings
        raise UserError(f"augmentation settings refused by timm (auto_augment {config['auto_augment']!r}, "
                        f"color_jitter {config['color_jitter']!r}): {e}") from None
    augment = [trivial_augment_wide(data_cfg['interpolation'])] if ta_wide else augment.transforms
    for op in auto_augment_ops(augment):
        if op.aug_fn is timm_auto_augment.posterize:
            op.aug_fn = posterize
    transform = transforms.Compose(crop_and_flips.transforms + augment + to_tensor.transforms)
    return with_draft_crop(transform) if config['jpeg_draft'] else transform


def auto_augment_ops(transforms: list) -> list:
    """The AugmentOps of timm's RandAugment or AutoAugment among `transforms`."""
    ops = []
    for t in transforms:
        if isinstance(t, timm_auto_augment.RandAugment):
            ops += t.ops
        elif isinstance(t, timm_auto_augment.AutoAugment):
            ops += [op for sub_policy in t.policy for op in sub_policy]
    return ops


def posterize(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize, for 0 bits too: timm's levels reach 0 at magnitude 10 (RandAugment's increasing ops, which
    RSB's mstd0.5 noise reaches, AutoAugment v0), where Pillow used to give black and Pillow 13 raises ValueError."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return timm_auto_augment.posterize(img, bits_to_keep, **kwargs)


def trivial_augment_wide(interpolation: str) -> TrivialAugmentWide:
    """torchvision's TrivialAugmentWide, which timm's auto-augment strings do not offer. Its rotations and shears use
    the training interpolation, as torchvision's reference recipe passes it (the class's own default is nearest).
    It draws its op and magnitude from torch's global generator, which seed_sample() seeds for each sample."""
    return TrivialAugmentWide(interpolation=InterpolationMode(interpolation))


def create_cpu_eval_loader(dataset, data_cfg: dict, sampler, workers: int, device,
                           max_bad_images: Optional[float] = None) -> CheckedLoader:
    """This process's evaluation loader over `sampler`'s batches (a CheckedLoader: close() it when done).

    Images decode at full size: the published protocol resizes full-size pixels (to img_size / crop_pct, then a
    center crop), and ImageNet's validation images, ~500x375, are below the twice 256 px that a DCT scale needs.
    """
    dataset.transform = create_transform(
        data_cfg['input_size'],
        is_training=False,
        interpolation=data_cfg['interpolation'],
        mean=data_cfg['mean'],
        std=data_cfg['std'],
        crop_pct=data_cfg['crop_pct'],
        crop_mode=data_cfg.get('crop_mode'),
        use_prefetcher=True,
    )
    max_bad = None if max_bad_images is None else max_bad_images * (sampler.end - sampler.start)
    return _checked_loader(dataset, sampler, data_cfg, workers, device, getattr(dataset, 'bad_images', None), max_bad)
