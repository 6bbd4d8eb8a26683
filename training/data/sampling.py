"""How samples are drawn: seeds, the split of a batch over processes and micro-batches, the samplers, the image sizes.

The order of an epoch is a permutation drawn from (seed, epoch). Optimizer step k of the epoch trains on positions
[k * B, (k + 1) * B) of it (B the global batch); process r of W takes the r-th slice of B / W and splits it into
micro-batches. Each sample's augmentation is seeded from (seed, epoch, position). So the same images with the same
augmentation make up step k on any number of processes or loader workers, and a resumed run needs only (epoch, k).
With repeated augmentation the epoch's positions hold its first indices, each several times (see TrainBatchSampler).
"""
import math
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.utils.data

from ..config import UserError

# independent random streams derived from the run's seed (SWA_BN: the training-mode forwards that recompute the
# BatchNorm statistics of the SWA average, which draw drop path)
ORDER, SAMPLE, STEP, SWA_BN = 1, 2, 3, 4


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers (seed, stream, epoch, ...)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)


def seed_all(seed: int):
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def seed_sample(seed: int):
    """Seed the generators timm's transforms draw from: Python's, NumPy's global one and torch's CPU generator.

    torch.manual_seed() would also queue a seed for CUDA, formatting a stack trace each time: 0.1 to 1 ms a sample
    in a loader worker (measured), a tenth of all its work at 160 px; this takes 10 us.
    """
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.default_generator.manual_seed(seed)


@dataclass(frozen=True)
class BatchLayout:
    """How the global batch of an optimizer step splits over processes and accumulated micro-batches."""
    global_batch: int
    world_size: int
    accum_steps: int

    @classmethod
    def create(cls, global_batch: int, world_size: int, max_per_device: Optional[int]) -> 'BatchLayout':
        if world_size < 1:
            raise UserError(f'WORLD_SIZE must be a number of processes, 1 or more, got {world_size}')
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
        self.steps_per_epoch = epoch_steps(num_samples, layout)
        if self.repeats > layout.global_batch:  # so more than the training images too
            raise UserError(f'aug_repeats {repeats} is more than the global batch of {layout.global_batch}: the '
                            'copies of an image go into one batch')
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


def epoch_steps(num_samples: int, layout: BatchLayout) -> int:
    """Optimizer steps in an epoch of `num_samples` training images: whole global batches, the rest left out."""
    if num_samples < layout.global_batch:
        raise UserError(f'the training set ({num_samples} images) is smaller than one batch of {layout.global_batch}')
    return num_samples // layout.global_batch


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
