"""What a training step uses besides the model (mixed precision, BatchNorm averaging, clipping), the BatchNorm
statistics of the SWA average, and the evaluation shared by train.py and validate.py."""
import logging
import time
from contextlib import nullcontext
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import update_bn

from .distributed import Processes, StopRequest, mean_over_ranks, sum_over_ranks

_logger = logging.getLogger(__name__)


class Interrupted(Exception):
    """A stop signal was agreed on, and what could be saved was saved; train.py exits."""


class NonFiniteLoss(Exception):
    def __init__(self, epoch: int, step: int):
        super().__init__(f'non-finite loss at epoch {epoch}, step {step}: training stopped, no checkpoint written '
                         'after the last good one')


def autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def copy_mean_over_ranks(targets: list, sources: list, procs: Processes, divisor: int = 1):
    """targets[i] = the mean over processes of sources[i] / divisor, in float64 and in one collective."""
    flat = mean_over_ranks(torch.cat([s.double().flatten() for s in sources]) / divisor, procs)
    for target, mean in zip(targets, flat.split([t.numel() for t in targets])):
        target.copy_(mean.view_as(target))


class BatchNormSteps:
    """One update of the BatchNorm running statistics per optimizer step: the mean over its micro-batches and
    processes.

    BatchNorm updates its running mean and variance on every forward. With gradient accumulation that makes several
    updates per step, and under DDP every process keeps its own; either way the evaluated weights would depend on
    how the global batch is split. Here each micro-batch updates from the statistics the step started with and the
    results are averaged, then over processes: the same as one update with the mean micro-batch statistics, on any
    number of processes. The processes' statistics stay equal, so the EMA and the checkpoints see the same ones.
    """

    def __init__(self, model: torch.nn.Module, procs: Processes):
        self.stats = [b for name, b in model.named_buffers()
                      if name.endswith(('running_mean', 'running_var', 'num_batches_tracked'))]
        self.procs = procs
        self.start = self.total = None

    def before_micro(self, j: int):
        if j == 0:
            self.start = [b.clone() for b in self.stats]
            self.total = [torch.zeros_like(b) for b in self.stats]
        else:
            torch._foreach_copy_(self.stats, self.start)

    def after_micro(self):
        torch._foreach_add_(self.total, self.stats)

    def end_step(self, accum: int):
        copy_mean_over_ranks(self.stats, self.total, self.procs, accum)


@torch.no_grad()
def recompute_batchnorm(model: torch.nn.Module, batches, procs: Processes, amp_dtype: Optional[torch.dtype] = None,
                        channels_last: bool = False):
    """torch's update_bn: the model's BatchNorm statistics recomputed as the mean over the images of `batches`
    ((images, targets) pairs), in training mode as training computes them. Each process runs its own shard: the
    statistics are then the mean over the processes, and num_batches_tracked the sum (the batches seen), so that every
    process holds what one process running all the batches would.

    An average of weights has no statistics of its own: the running statistics of the weights it averages do not
    describe its activations.
    """
    def images():
        for x, _ in batches:
            yield x.contiguous(memory_format=torch.channels_last) if channels_last else x
    with autocast(procs.device, amp_dtype):
        update_bn(images(), model)
    if procs.distributed:
        stats = [b for name, b in model.named_buffers() if name.endswith(('running_mean', 'running_var'))]
        copy_mean_over_ranks(stats, stats, procs)
        counts = [b for name, b in model.named_buffers() if name.endswith('num_batches_tracked')]
        torch._foreach_copy_(counts, sum_over_ranks(torch.stack(counts), procs).unbind())


def clipped_parameters(model: torch.nn.Module, mode: str) -> list:
    """The parameters gradient clipping applies to: all, but for AGC not the classifier (as in timm's train.py:
    adaptive clipping of the freshly initialised head would hold back its learning)."""
    if mode != 'agc':
        return list(model.parameters())
    head = {id(p) for p in model.get_classifier().parameters()}
    return [p for p in model.parameters() if id(p) not in head]


@torch.no_grad()
def evaluate(models: Sequence[torch.nn.Module], loader, procs: Processes, amp_dtype: Optional[torch.dtype] = None,
             channels_last: bool = False, eval_flip: bool = False, stop: Optional[StopRequest] = None,
             num_classes: Optional[int] = None) -> list:
    """Top-1, top-5 and mean cross-entropy of each model over every image of the loader's dataset, once each.

    One pass over the data for all the models (a run's raw and EMA weights): each batch is loaded and decoded once.
    Every process evaluates its own shard; sums are reduced, so the result does not depend on the number of
    processes. A stop request is agreed on in the batches all processes share, and raises Interrupted.

    With eval_flip, an image's logits are the mean of its own and its horizontal flip's, flipped here on the loaded
    batch (so with either decode path). Logits rather than probabilities, as FFCV's evaluation sums logits for its
    published numbers; the mean ranks as the sum does and keeps the loss on the scale of one view.

    Per class, the images and each model's top-1 hits are counted too, by index_add_ (bincount would wait for the
    GPU to size its result), in as many classes as the models predict; a distributed evaluation passes num_classes, as
    a process without a batch could not tell it.

    Returns:
        One dict per model: loss, top1, top5, images, class_images and class_hits (a list over the classes each), and
        the pass's img_per_sec and seconds.
    """
    for model in models:
        model.eval()
    device = procs.device
    sums = torch.zeros(len(models), 4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, images
    per_class = None  # [1 + models, classes]: images, then each model's top-1 hits
    if num_classes is not None:
        per_class = torch.zeros(1 + len(models), num_classes, dtype=torch.int64, device=device)
    common_batches = getattr(loader.batch_sampler, 'common_batches', len(loader))
    start = time.perf_counter()
    for i, (x, y) in enumerate(loader):
        if (stop is not None) and (i < common_batches) and stop.agreed()[0]:
            raise Interrupted()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for k, model in enumerate(models):
            with autocast(device, amp_dtype):
                logits = model(x)
                if eval_flip:
                    logits = (logits + model(x.flip(3))) / 2
            logits = logits.float()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top == y[:, None]
            sums[k, :3] += torch.stack([F.cross_entropy(logits, y, reduction='sum'), hits[:, :1].sum(),
                                        hits.sum()]).double()
            if per_class is None:
                per_class = torch.zeros(1 + len(models), logits.shape[1], dtype=torch.int64, device=device)
            per_class[1 + k].index_add_(0, y, hits[:, 0].long())
        sums[:, 3] += len(y)
        per_class[0].index_add_(0, y, torch.ones_like(y))
    sum_over_ranks(sums, procs)
    if per_class is None:  # no batch and no num_classes: no classes to count
        per_class = torch.zeros(1 + len(models), 0, dtype=torch.int64, device=device)
    sum_over_ranks(per_class, procs)
    class_images, *class_hits = per_class.tolist()
    elapsed = time.perf_counter() - start
    results = []
    for (loss, top1, top5, images), hits in zip(sums.tolist(), class_hits):
        images = max(images, 1)
        results.append(dict(loss=loss / images, top1=100 * top1 / images, top5=100 * top5 / images,
                            images=int(images), class_images=class_images, class_hits=hits,
                            img_per_sec=images / elapsed, seconds=elapsed))
    return results
