"""Datasets, timm loaders, and a sample order that makes every run repeatable and resumable at any step.

The order of an epoch is a permutation drawn from (seed, epoch). Optimizer step k of the epoch trains on positions
[k * B, (k + 1) * B) of it (B the global batch); process r of W takes the r-th slice of B / W and splits it into
micro-batches. Each sample's augmentation is seeded from (seed, epoch, position). So the same images with the same
augmentation make up step k on any number of processes or loader workers, and a resumed run needs only (epoch, k).
"""
import logging
import math
import random
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.utils.data
from timm.data import create_dataset, create_loader, resolve_data_config
from timm.data.loader import PrefetchLoader
from timm.data.random_erasing import RandomErasing

from . import builtin_data
from .config import UserError, data_root

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
    """Yields this process's micro-batches of (index, sample seed) from the current position to the epoch's end."""

    def __init__(self, num_samples: int, layout: BatchLayout, rank: int, seed: int):
        self.num_samples = num_samples
        self.layout = layout
        self.rank = rank
        self.seed = seed
        self.steps_per_epoch = num_samples // layout.global_batch
        self.epoch = 0
        self.start_step = 0

    def set_position(self, epoch: int, start_step: int):
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.layout.accum_steps

    def __iter__(self):
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(
            derive_seed(self.seed, ORDER, self.epoch))).tolist()
        sample_seed = derive_seed(self.seed, SAMPLE, self.epoch)
        micro = self.layout.micro_batch
        for step in range(self.start_step, self.steps_per_epoch):
            start = step * self.layout.global_batch + self.rank * self.layout.per_process
            for j in range(self.layout.accum_steps):
                positions = range(start + j * micro, start + (j + 1) * micro)
                yield [(order[p], sample_seed + p) for p in positions]


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
    """Seeds Python, NumPy and torch from a sample's own seed before its transform runs, so its augmentation does
    not depend on which worker loads it or on what that worker loaded before."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        seed_all(seed)
        return self.dataset[index]


def _worker_init(worker_id: int):
    # A Ctrl-C or a SIGTERM sent to the process group must reach only the trainer, which saves and then stops the
    # workers; a worker killed by it would break the batch being saved for.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _with_batch_sampler(loader, dataset, batch_sampler):
    """Rebuild the DataLoader that timm's create_loader() made around our batch sampler.

    create_loader() takes no sampler: it picks RandomSampler, DistributedSampler or OrderedDistributedSampler itself
    (the last pads the validation set with duplicates). Exact mid-epoch resume, batches that do not depend on the
    number of processes, and exact distributed validation need the samplers above, so we keep everything else it
    built (transforms, collate, worker count, prefetcher) and swap the sampler.

    Workers are not persistent: they ignore SIGTERM (see _worker_init), so they must end with each pass over the
    data rather than be left for the interpreter's exit, which would stop them with SIGTERM.
    """
    inner = loader.loader if isinstance(loader, PrefetchLoader) else loader
    rebuilt = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=inner.num_workers,
        collate_fn=inner.collate_fn,
        pin_memory=inner.pin_memory,
        worker_init_fn=_worker_init,
    )
    if isinstance(loader, PrefetchLoader):
        loader.loader = rebuilt
        return loader
    return rebuilt


def split_folder(root: Path, split: str) -> Path:
    """The folder of a split, as timm's create_dataset finds it ('validation' also finds val/)."""
    names = {'train': ('train', 'training'), 'validation': ('val', 'validation', 'valid'),
             'val': ('val', 'validation', 'valid')}.get(split, (split,))
    for name in names:
        if (root / name).is_dir():
            return root / name
    return root / names[0]


def open_image_folder(root: Path, split: str, dataset: str = ''):
    """timm's dataset for one split, with one-line errors for the usual layout mistakes."""
    if dataset:
        try:
            return create_dataset(dataset, root=str(root), split=split)
        except Exception as e:
            raise UserError(f'cannot open dataset {dataset!r} at {root}: {e}') from None
    folder = split_folder(root, split)
    if not folder.is_dir():
        raise UserError(f'no {split} split at {folder}: expected {folder}/<class>/<image>.JPEG')
    ds = create_dataset('', root=str(folder), split=split, search_split=False)
    classes = classes_of(ds)
    if len(ds) == 0:
        raise UserError(f'no images found under {folder}')
    if '' in classes or '.' in classes:
        raise UserError(f'{folder} holds images but no class folders: expected {folder}/<class>/<image>.JPEG '
                        '(ImageNet\'s flat val folder must be sorted first, see README)')
    return ds


def classes_of(dataset) -> list:
    reader = getattr(dataset, 'reader', None)
    if reader is not None and hasattr(reader, 'class_to_idx'):
        return list(reader.class_to_idx)
    return list(getattr(dataset, 'classes', []))


def prepare_builtin_data(config: dict):
    """Write the built-in shapes dataset where a `dataset: builtin` run expects it, unless it is there."""
    root = data_root(config)
    if config['dataset'] == 'builtin' and not root.exists():
        _logger.info(f'Generating the built-in shapes dataset in {root}')
        builtin_data.generate(root, seed=0)


def create_datasets(config: dict):
    """The training and validation datasets of a run, checked against each other and num_classes."""
    root = data_root(config)
    dataset = '' if config['dataset'] == 'builtin' else config['dataset']
    if not dataset and not root.is_dir():
        raise UserError(f'no dataset at {root} (set --data-dir or IMAGENET_DIR): expected '
                        f'{root}/train/<synset>/*.JPEG and {root}/val/<synset>/*.JPEG')
    train = open_image_folder(root, config['train_split'], dataset)
    val = open_image_folder(root, config['val_split'], dataset)
    train_classes, val_classes = classes_of(train), classes_of(val)
    if train_classes and val_classes and train_classes != val_classes:
        raise UserError(f'train has {len(train_classes)} classes and val {len(val_classes)}, or other names: '
                        'both need the same class folders')
    num_classes = len(train_classes) or config['num_classes']
    if config['num_classes'] and num_classes != config['num_classes']:
        raise UserError(f"num_classes is {config['num_classes']} but {root} has {num_classes} classes")
    if not num_classes:
        raise UserError(f'cannot tell the number of classes of {dataset}: set num_classes')
    return train, val, num_classes


def data_config(config: dict, model, img_size: Optional[int], crop_pct: Optional[float] = None) -> dict:
    """timm's data config (input size, interpolation, mean, std, crop) of a run's settings, at one image size."""
    overrides = {k: config.get(k) for k in ('interpolation', 'mean', 'std', 'crop_pct') if config.get(k) is not None}
    if crop_pct is not None:
        overrides['crop_pct'] = crop_pct
    return resolve_data_config(args=dict(overrides, img_size=img_size), model=model)


def data_configs(config: dict, model) -> tuple:
    """Data configs for training and for validation (at val_img_size when set)."""
    return (data_config(config, model, config['img_size']),
            data_config(config, model, config['val_img_size'] or config['img_size']))


def create_train_loader(dataset, config: dict, data_cfg: dict, layout: BatchLayout, rank: int, device):
    try:
        loader = _create_train_loader(dataset, config, data_cfg, layout, device)
    except (AssertionError, ValueError, KeyError) as e:  # timm's checks of the augmentation settings
        raise UserError(f"augmentation settings refused by timm (auto_augment {config['auto_augment']!r}, "
                        f"color_jitter {config['color_jitter']!r}): {e}") from None
    sampler = TrainBatchSampler(len(dataset), layout, rank, config['seed'])
    if sampler.steps_per_epoch == 0:
        raise UserError(f'the training set ({len(dataset)} images) is smaller than one batch of {layout.global_batch}')
    return _with_batch_sampler(loader, SeededSamples(dataset), sampler), sampler


def _create_train_loader(dataset, config: dict, data_cfg: dict, layout: BatchLayout, device):
    return create_loader(
        dataset,
        input_size=data_cfg['input_size'],
        batch_size=layout.micro_batch,
        is_training=True,
        scale=tuple(config['scale']),
        ratio=tuple(config['ratio']),
        hflip=config['hflip'],
        vflip=config['vflip'],
        color_jitter=config['color_jitter'],
        auto_augment=config['auto_augment'],
        interpolation=data_cfg['interpolation'],
        mean=data_cfg['mean'],
        std=data_cfg['std'],
        num_workers=config['workers'],
        pin_memory=device.type == 'cuda',
        device=device,
        re_prob=0.0,  # applied per step by create_random_erasing(), see there
    )


def create_eval_loader(dataset, data_cfg: dict, batch_size: int, workers: int, device, rank: int = 0,
                       world_size: int = 1):
    loader = create_loader(
        dataset,
        input_size=data_cfg['input_size'],
        batch_size=batch_size,
        is_training=False,
        interpolation=data_cfg['interpolation'],
        mean=data_cfg['mean'],
        std=data_cfg['std'],
        crop_pct=data_cfg['crop_pct'],
        crop_mode=data_cfg.get('crop_mode'),
        num_workers=workers,
        pin_memory=device.type == 'cuda',
        device=device,
    )
    return _with_batch_sampler(loader, dataset, EvalBatchSampler(len(dataset), batch_size, rank, world_size))


def create_random_erasing(config: dict, device) -> Optional[RandomErasing]:
    """timm's RandomErasing, applied by the training step on the normalised batch.

    timm's prefetcher would apply it while fetching the next batch, drawing from the global RNG at a moment that
    depends on when the loader started; applied in the step, after the step's seed, a resumed run erases the same.
    """
    if config['re_prob'] <= 0:
        return None
    return RandomErasing(config['re_prob'], mode=config['re_mode'], max_count=config['re_count'], device=device)
