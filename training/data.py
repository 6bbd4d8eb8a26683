"""Datasets, timm loaders, and a sample order that makes every run repeatable and resumable at any step.

The order of an epoch is a permutation drawn from (seed, epoch). Optimizer step k of the epoch trains on positions
[k * B, (k + 1) * B) of it (B the global batch); process r of W takes the r-th slice of B / W and splits it into
micro-batches. Each sample's augmentation is seeded from (seed, epoch, position). So the same images with the same
augmentation make up step k on any number of processes or loader workers, and a resumed run needs only (epoch, k).
With repeated augmentation the epoch's positions hold its first indices, each several times (see TrainBatchSampler).
"""
import hashlib
import json
import logging
import math
import os
import random
import signal
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.utils.data
from timm.data import create_dataset, create_transform, resolve_data_config
from timm.data.loader import PrefetchLoader, fast_collate
from timm.data.random_erasing import RandomErasing
from torchvision import transforms
from torchvision.transforms import InterpolationMode, TrivialAugmentWide

from . import builtin_data
from .config import TA_WIDE, UserError
from .images import CheckedLoader, LazyImageFolder, seed_sample, with_draft_crop

_logger = logging.getLogger(__name__)

# independent random streams derived from the run's seed
ORDER, SAMPLE, STEP = 1, 2, 3


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers (seed, stream, epoch, ...)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)


def seed_all(seed: int):
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


@dataclass(frozen=True)
class BatchLayout:
    """How the global batch of an optimizer step splits over processes and accumulated micro-batches."""
    global_batch: int
    world_size: int
    accum_steps: int

    @classmethod
    def create(cls, global_batch: int, world_size: int, max_per_device: Optional[int]) -> 'BatchLayout':
        if global_batch % world_size:
            raise UserError(f'batch_size {global_batch} is not divisible by {world_size} processes')
        per_process = global_batch // world_size
        accum = 1 if not max_per_device else math.ceil(per_process / max_per_device)
        while per_process % accum:
            accum += 1
        return cls(global_batch, world_size, accum)

    @property
    def per_process(self) -> int:
        return self.global_batch // self.world_size

    @property
    def micro_batch(self) -> int:
        return self.per_process // self.accum_steps


class TrainBatchSampler(torch.utils.data.Sampler):
    """Yields this process's micro-batches of (index, sample seed) from the current position to the epoch's end.

    With repeats R > 1 (repeated augmentation, timm's RepeatAugSampler semantics): the epoch keeps its length and
    trains the first indices of its permutation R times each, so it draws about 1/R of the dataset. The copies of a
    sample lie next to each other in timm's order; here each step's batch is reordered so that they lie B / R apart,
    which on R or more processes (or micro-batches) puts them in different ones when R divides B, as timm's strided
    split does, while the step stays the same on any number of processes. Every copy has its own position, hence its
    own sample seed and augmentation.
    """

    def __init__(self, num_samples: int, layout: BatchLayout, rank: int, seed: int, repeats: int = 1):
        self.num_samples = num_samples
        self.layout = layout
        self.rank = rank
        self.seed = seed
        self.repeats = max(repeats, 1)
        self.steps_per_epoch = num_samples // layout.global_batch
        self.epoch = 0
        self.start_step = 0

    def set_position(self, epoch: int, start_step: int):
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.layout.accum_steps

    def epoch_order(self) -> list:
        """The dataset index at each position of the epoch's steps."""
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(
            derive_seed(self.seed, ORDER, self.epoch)))
        if self.repeats == 1:
            return order.tolist()
        batch, positions = self.layout.global_batch, self.steps_per_epoch * self.layout.global_batch
        repeated = order[:math.ceil(positions / self.repeats)].repeat_interleave(self.repeats)[:positions]
        spread = torch.cat([torch.arange(copy, batch, self.repeats) for copy in range(self.repeats)])
        return repeated.view(self.steps_per_epoch, batch)[:, spread].flatten().tolist()

    def __iter__(self):
        order = self.epoch_order()
        sample_seed = derive_seed(self.seed, SAMPLE, self.epoch)
        micro = self.layout.micro_batch
        for step in range(self.start_step, self.steps_per_epoch):
            start = step * self.layout.global_batch + self.rank * self.layout.per_process
            for j in range(self.layout.accum_steps):
                positions = range(start + j * micro, start + (j + 1) * micro)
                yield [(order[p], sample_seed + p) for p in positions]


@dataclass(frozen=True)
class ImageSizes:
    """The training image size of each epoch: `final`, or FFCV's progressive resizing (train_imagenet.py's
    get_resolution): `start` up to epoch ramp[0], `final` from epoch ramp[1] on, in between the linear ramp rounded to
    a multiple of 32. A function of the epoch alone, so a resumed run trains each epoch at the size it had."""
    final: int
    start: Optional[int] = None
    ramp: Optional[tuple] = None  # (first, last) epoch of the ramp

    def at(self, epoch: int) -> int:
        if self.start is None:
            return self.final
        first, last = self.ramp
        if epoch <= first:
            return self.start
        if epoch >= last:
            return self.final
        return int(np.round(np.interp(epoch, self.ramp, (self.start, self.final)) / 32)) * 32

    def ranges(self, epochs: int) -> list:
        """(first epoch, last epoch, size) of each run of epochs at one size."""
        runs = []
        for epoch in range(epochs):
            size = self.at(epoch)
            if runs and runs[-1][2] == size:
                runs[-1] = (runs[-1][0], epoch, size)
            else:
                runs.append((epoch, epoch, size))
        return runs


def image_sizes(config: dict, final: int) -> ImageSizes:
    """The run's ImageSizes; `final` is the resolved training size (img_size, or the model's default)."""
    start = config['img_size_start']
    if start is None:
        return ImageSizes(final)
    if start > final:
        raise UserError(f'img_size_start {start} is larger than the final training size {final}: progressive '
                        'resizing grows the images')
    return ImageSizes(final, start, tuple(config['resize_epochs']))


class SizedBatches(torch.utils.data.Sampler):
    """A TrainBatchSampler's micro-batches with the image size of their epoch appended to each item, for the workers.

    Workers persist across epochs and hold their own copy of the dataset: the size travels with the items, and each
    worker builds the transform of a size once (SeededSamples), so nothing restarts when the size changes.
    """

    def __init__(self, sampler: TrainBatchSampler, sizes: ImageSizes):
        self.sampler = sampler
        self.sizes = sizes

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        size = self.sizes.at(self.sampler.epoch)
        for batch in self.sampler:
            yield [(*item, size) for item in batch]


class EvalBatchSampler(torch.utils.data.Sampler):
    """Batches of this process's contiguous shard of the dataset: every image counted once, none padded."""

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.start = rank * num_samples // world_size
        self.end = (rank + 1) * num_samples // world_size
        self.batch_size = batch_size
        # the smallest shard has this many batches: every process reaches each of them, so a collective
        # (such as agreeing to stop) is safe inside them
        self.common_batches = math.ceil((num_samples // world_size) / batch_size)

    def __len__(self) -> int:
        return math.ceil((self.end - self.start) / self.batch_size)

    def __iter__(self):
        for first in range(self.start, self.end, self.batch_size):
            yield list(range(first, min(first + self.batch_size, self.end)))


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


def _worker_init(worker_id: int):
    # A Ctrl-C or a SIGTERM sent to the process group must reach only the trainer, which saves and then stops the
    # workers; a worker killed by it would break the batch being saved for.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _checked_loader(dataset, batch_sampler, data_cfg: dict, workers: int, device, bad_images,
                    max_bad: Optional[float]) -> CheckedLoader:
    """timm's collate and prefetcher around a DataLoader that takes its batches from our batch sampler.

    timm's create_loader() takes no sampler: it picks RandomSampler, DistributedSampler or OrderedDistributedSampler
    itself (the last pads the validation set with duplicates). Exact mid-epoch resume, batches that do not depend on
    the number of processes, and exact distributed validation need the samplers above, so the loader is built here
    from the same parts. Workers persist between passes; CheckedLoader.close() ends them.
    """
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=workers,
        collate_fn=fast_collate,
        pin_memory=device.type == 'cuda',
        worker_init_fn=_worker_init,
        persistent_workers=workers > 0,
    )
    prefetcher = PrefetchLoader(loader, mean=data_cfg['mean'], std=data_cfg['std'],
                                channels=data_cfg['input_size'][0], device=device)
    return CheckedLoader(loader, prefetcher, bad_images, max_bad)


def split_folder(root: Path, split: str) -> Path:
    """The folder of a split, as timm's create_dataset finds it ('validation' also finds val/)."""
    names = {'train': ('train', 'training'), 'validation': ('val', 'validation', 'valid'),
             'val': ('val', 'validation', 'valid')}.get(split, (split,))
    for name in names:
        if (root / name).is_dir():
            return root / name
    return root / names[0]


def open_image_folder(root: Path, split: str, dataset: str = ''):
    """One split: a LazyImageFolder for a folder of class folders, timm's dataset for a named one, with one-line
    errors for the usual layout mistakes."""
    if dataset:
        try:
            return create_dataset(dataset, root=str(root), split=split)
        except Exception as e:
            raise UserError(f'cannot open dataset {dataset!r} at {root}: {e}') from None
    folder = split_folder(root, split)
    if not folder.is_dir():
        raise UserError(f'no {split} split at {folder}: expected {folder}/<class>/<image>.JPEG')
    try:
        ds = LazyImageFolder(str(folder))
    except RuntimeError:  # timm's folder reader found no image files
        raise UserError(f'no images found under {folder}') from None
    classes = classes_of(ds)
    if '' in classes or '.' in classes:
        raise UserError(f'{folder} holds images but no class folders: expected {folder}/<class>/<image>.JPEG '
                        '(ImageNet\'s flat val folder must be sorted first, see README)')
    return ds


def classes_of(dataset) -> list:
    reader = getattr(dataset, 'reader', None)
    if reader is not None and hasattr(reader, 'class_to_idx'):
        return list(reader.class_to_idx)
    return list(getattr(dataset, 'classes', []))


BUILTIN_ROOT = Path('data/shapes')


def locate_dataset(data_dir: Optional[str], dataset: str) -> tuple:
    """(root, timm dataset name) of a run's data; the one place that knows `dataset: builtin`.

    The built-in shapes are generated at data/shapes on first use. A --data-dir is never filled with them: a
    mistyped ImageNet path must fail, not train on shapes.
    """
    if dataset != 'builtin':
        return Path(data_dir or os.environ.get('IMAGENET_DIR') or 'data/imagenet'), dataset
    if data_dir:
        return Path(data_dir), ''
    if not BUILTIN_ROOT.exists():
        _logger.info(f'Generating the built-in shapes dataset in {BUILTIN_ROOT}')
        builtin_data.generate(BUILTIN_ROOT, seed=0)
    return BUILTIN_ROOT, ''


@dataclass(frozen=True)
class Datasets:
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    num_classes: int
    fingerprint: dict  # what a checkpoint records of the data: image and class counts, class names, manifest


def open_datasets(root: Path, dataset: str, train_split: str, val_split: str,
                  num_classes: Optional[int]) -> Datasets:
    """The training and validation datasets of a run, checked against each other and num_classes."""
    if not dataset and not root.is_dir():
        raise UserError(f'no dataset at {root} (set --data-dir or IMAGENET_DIR): expected '
                        f'{root}/train/<synset>/*.JPEG and {root}/val/<synset>/*.JPEG')
    train = open_image_folder(root, train_split, dataset)
    val = open_image_folder(root, val_split, dataset)
    train_classes, val_classes = classes_of(train), classes_of(val)
    if train_classes and val_classes and train_classes != val_classes:
        raise UserError(f'train has {len(train_classes)} classes and val {len(val_classes)}, or other names: '
                        'both need the same class folders')
    found = len(train_classes) or num_classes
    if num_classes and found != num_classes:
        raise UserError(f'num_classes is {num_classes} but {root} has {found} classes')
    if not found:
        raise UserError(f'cannot tell the number of classes of {dataset}: set num_classes')
    fingerprint = dict(train_images=len(train), val_images=len(val), classes=found,
                       class_names=train_classes or None, train_files=listing_sha256(train),
                       manifest=read_manifest(root))
    return Datasets(train, val, found, fingerprint)


def listing_sha256(dataset) -> Optional[str]:
    """sha256 of a folder dataset's (label, file) list: a swap of images between class folders changes it even when
    the class names and counts stay (ImageNet's file names carry their synset). None for other datasets."""
    reader = getattr(dataset, 'reader', None)
    samples = getattr(reader, 'samples', None)
    if samples is None:
        return None
    prefix = os.path.join(str(reader.root), '')  # the reader's paths start with its root: slicing is cheap for 1.28M
    digest = hashlib.sha256()
    for path, label in samples:
        digest.update(f'{label}\t{str(path)[len(prefix):]}\n'.encode())
    return digest.hexdigest()


def read_manifest(root: Path) -> Optional[dict]:
    """The identity of a dataset prepared by tools/prepare_imagenet.py (counts, settings and the sha256 of its file
    listing), so that runs on different copies of ImageNet can be told apart; None for other datasets."""
    path = root / 'manifest.json'
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        splits = {name: dict(images=split['images'], classes=split['classes'], sha256=split['sha256'],
                             bad_files=len(split.get('bad_files', [])))
                  for name, split in manifest['splits'].items()}
        return dict(sha256=manifest['sha256'], imagenet=manifest['imagenet'], images=manifest['images'],
                    settings=manifest['settings'], splits=splits)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f'{path} is not a manifest of tools/prepare_imagenet.py ({type(e).__name__}: {e})') from None


@dataclass(frozen=True)
class Loaders:
    train: object  # yields (images, targets) on the device, one micro-batch at a time
    sampler: 'TrainBatchSampler'
    val: object
    sizes: ImageSizes  # the training image size of each epoch

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch


def build_loaders(config: dict, datasets: Datasets, model, layout: BatchLayout, procs) -> Loaders:
    """Training and validation loaders over this process's share of the data."""
    train_cfg, val_cfg = data_configs(config, model)
    sizes = image_sizes(config, train_cfg['input_size'][-1])
    train, sampler = create_train_loader(datasets.train, config, train_cfg, layout, procs.rank, procs.device, sizes)
    val_batch = config['validation_batch_size'] or layout.micro_batch
    val = create_eval_loader(datasets.val, val_cfg, val_batch, config['workers'], procs.device, procs.rank,
                             procs.world_size, config['max_bad_images'], config['decode'], config['gpu_decoder'])
    return Loaders(train, sampler, val, sizes)


def data_config(config: dict, model, img_size: Optional[int], crop_pct: Optional[float] = None,
                interpolation: Optional[str] = None) -> dict:
    """timm's data config (input size, interpolation, mean, std, crop) of a run's settings, at one image size."""
    overrides = {k: config.get(k) for k in ('interpolation', 'mean', 'std', 'crop_pct') if config.get(k) is not None}
    if crop_pct is not None:
        overrides['crop_pct'] = crop_pct
    if interpolation is not None:
        overrides['interpolation'] = interpolation
    return resolve_data_config(args=dict(overrides, img_size=img_size), model=model)


def data_configs(config: dict, model) -> tuple:
    """Data configs for training (at train_interpolation when set: it may be 'random', which only training takes) and
    for validation (at val_img_size when set)."""
    return (data_config(config, model, config['img_size'], interpolation=config.get('train_interpolation')),
            data_config(config, model, config['val_img_size'] or config['img_size']))


def image_samples(dataset) -> list:
    """(path, label) pairs of a folder dataset, for loaders that read the files themselves (decode: gpu)."""
    samples = getattr(getattr(dataset, 'reader', None), 'samples', None)
    if samples is None:
        raise UserError('decode: gpu reads image files: it needs a folder of class folders, not a named dataset')
    return samples


def create_train_loader(dataset, config: dict, data_cfg: dict, layout: BatchLayout, rank: int, device,
                        sizes: Optional[ImageSizes] = None):
    """This process's training loader (a CheckedLoader: close() it when done) and its batch sampler.

    With progressive resizing (`sizes` that change), each epoch trains at its size; the workers persist.
    """
    sampler = TrainBatchSampler(len(dataset), layout, rank, config['seed'], config['aug_repeats'])
    if sampler.steps_per_epoch == 0:
        raise UserError(f'the training set ({len(dataset)} images) is smaller than one batch of {layout.global_batch}')
    if sampler.repeats > 1:
        positions = sampler.steps_per_epoch * layout.global_batch
        _logger.info(f'Repeated augmentation: each epoch trains {math.ceil(positions / sampler.repeats)} of the '
                     f'{len(dataset)} images {sampler.repeats} times each ({positions} samples)')
    progressive = (sizes is not None) and (sizes.start is not None)
    if config['decode'] == 'gpu':
        from .gpu_decode import create_gpu_train_loader  # imported here: gpu_decode imports this module
        return create_gpu_train_loader(image_samples(dataset), config, data_cfg, sampler, device,
                                       sizes if progressive else None), sampler
    try:
        dataset.transform = _train_transform(config, data_cfg)
    except (AssertionError, ValueError, KeyError) as e:  # timm's checks of the augmentation settings
        raise UserError(f"augmentation settings refused by timm (auto_augment {config['auto_augment']!r}, "
                        f"color_jitter {config['color_jitter']!r}): {e}") from None
    max_bad = config['max_bad_images'] * sampler.steps_per_epoch * layout.per_process
    samples, batches = SeededSamples(dataset), sampler
    if progressive:
        samples = SeededSamples(dataset, partial(_sized_train_transform, config, data_cfg))
        batches = SizedBatches(sampler, sizes)
    loader = _checked_loader(samples, batches, data_cfg, config['workers'], device,
                             getattr(dataset, 'bad_images', None), max_bad)
    return loader, sampler


def _sized_train_transform(config: dict, data_cfg: dict, size: int):
    channels = data_cfg['input_size'][0]
    return _train_transform(config, dict(data_cfg, input_size=(channels, size, size)))


def _train_transform(config: dict, data_cfg: dict):
    """timm's training transform for these settings, as create_loader() builds it, or with torchvision's
    TrivialAugmentWide in place of timm's auto-augment for `auto_augment: ta_wide`; with jpeg_draft, its random
    resized crop decodes JPEGs at reduced size where the crop allows (see training/images.py)."""
    ta_wide = config['auto_augment'] == TA_WIDE
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
    augment = [trivial_augment_wide(data_cfg['interpolation'])] if ta_wide else augment.transforms
    transform = transforms.Compose(crop_and_flips.transforms + augment + to_tensor.transforms)
    return with_draft_crop(transform) if config['jpeg_draft'] else transform


def trivial_augment_wide(interpolation: str) -> TrivialAugmentWide:
    """torchvision's TrivialAugmentWide, which timm's auto-augment strings do not offer. Its rotations and shears use
    the training interpolation, as torchvision's reference recipe passes it (the class's own default is nearest).
    It draws its op and magnitude from torch's global generator, which seed_sample() seeds for each sample."""
    return TrivialAugmentWide(interpolation=InterpolationMode(interpolation))


def create_eval_loader(dataset, data_cfg: dict, batch_size: int, workers: int, device, rank: int = 0,
                       world_size: int = 1, max_bad_images: Optional[float] = None, decode: str = 'cpu',
                       gpu_decoder: str = 'torchvision'):
    """This process's evaluation loader (a CheckedLoader: close() it when done).

    Images decode at full size: the published protocol resizes full-size pixels (to img_size / crop_pct, then a
    center crop), and ImageNet's validation images, ~500x375, are below the twice 256 px that a DCT scale needs.
    Bad images are replaced and logged; with max_bad_images, more than that share of the shard stops the run.
    """
    sampler = EvalBatchSampler(len(dataset), batch_size, rank, world_size)
    if decode == 'gpu':
        from .gpu_decode import create_gpu_eval_loader
        return create_gpu_eval_loader(image_samples(dataset), data_cfg, sampler, workers, device, max_bad_images,
                                      gpu_decoder)
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


def create_random_erasing(config: dict, device) -> Optional[RandomErasing]:
    """timm's RandomErasing, applied by the training step on the normalised batch.

    timm's prefetcher would apply it while fetching the next batch, drawing from the global RNG at a moment that
    depends on when the loader started; applied in the step, after the step's seed, a resumed run erases the same.
    """
    if config['re_prob'] <= 0:
        return None
    return RandomErasing(config['re_prob'], mode=config['re_mode'], max_count=config['re_count'], device=device)
