"""The device input path (`decode: gpu`): loaders whose workers read files and draw augmentations, and whose batches
the training device decodes (device_decode.py), crops and resizes (device_geometry.py), colours and normalises
(device_color.py). The output is what the CPU path yields: (x float32 normalised NCHW, y int64), both on the device.
On CUDA a thread makes batches ahead on a side stream, so that decoding and augmenting overlap the training steps.

Measured on one H200 (torch 2.11, 14 workers, batch 256, JPEGs of 250-500 px, ~70 KB; docs/input-pipeline.md):
train.py reaches 3,194 img/s at 224 px with the device decoding everything, 3,452 with cpu_decode_share 1.0, against a
ceiling of ~4,200 on synthetic input: nvjpeg's ~15 ms per 256 images share the SMs with the training step.
"""
import queue
import threading
from typing import Callable, Optional

import torch
import torch.utils.data

from .device_color import color_jitter, normalize
from .device_decode import EncodedBatch, EncodedImages, JpegDecoder, collate, decode_batch
from .device_geometry import EvalResize, crop_axes, resample
from .device_autoaugment import apply_ops
from .device_params import AUTO, FLIPS, INTERP, INTERPOLATIONS, SIZE, TrainAugment, to_device
from .sampling import ImageSizes, TrainBatchSampler
from .workers import CheckedLoader, worker_loader


def in_background(produce: Callable, depth: int):
    """Iterate produce() in a thread, up to `depth` items ahead; its exceptions are raised here.

    Leaving the loop early stops the thread once its current item is made.
    """
    items, stop = queue.Queue(depth), threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                items.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run():
        try:
            for item in produce():
                if not put(('item', item)):
                    return
            put(('end', None))
        except BaseException as e:  # handed to the consumer, which raises it
            put(('error', e))

    thread = threading.Thread(target=run, name='device-batches', daemon=True)
    thread.start()
    try:
        while True:
            kind, value = items.get()
            if kind == 'end':
                return
            if kind == 'error':
                raise value
            yield value
    finally:
        stop.set()
        thread.join()


class DeviceBatches:
    """(x, y) device batches of a DataLoader of EncodedBatch: the device decodes and augments.

    On CUDA a thread makes the next two batches on a side stream while the caller trains: the decoders block the
    thread that calls them until their GPU work is done, which would hold back the training steps' launches (torch
    operations release the GIL while they run). On CPU each batch is made when asked for.
    """

    def __init__(self, loader: torch.utils.data.DataLoader, dataset: EncodedImages, prepare, device: torch.device,
                 decoder: str):
        self.loader = loader
        self.dataset = dataset
        self.prepare = prepare  # (images, params) -> x
        self.device = device
        self.decoder = JpegDecoder(device, decoder)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if self.device.type != 'cuda':
            for batch in self.loader:
                yield self._make(batch)
            return
        stream = torch.cuda.Stream(self.device)

        def produce():
            with torch.cuda.device(self.device), torch.cuda.stream(stream):
                for batch in self.loader:
                    made = self._make(batch)
                    done = torch.cuda.Event()
                    done.record(stream)
                    yield made, done

        for made, done in in_background(produce, depth=2):
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            for t in made:  # made on the side stream, used and freed on the current one
                t.record_stream(current)
            yield made

    def _make(self, batch: EncodedBatch) -> tuple:
        images, params, labels = decode_batch(batch, self.decoder, self.dataset)
        return self.prepare(images, params), to_device(labels, self.device)


class TrainItems(torch.utils.data.Sampler):
    """A TrainBatchSampler's micro-batches as the workers' items: (index, seed, image size of the epoch, share).

    `share` (cpu_decode_share) is read when a pass starts: decode: auto sets it between its timed passes.
    """

    def __init__(self, sampler: TrainBatchSampler, sizes: ImageSizes, share: float):
        self.sampler = sampler
        self.sizes = sizes
        self.share = share

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        size, share = self.sizes.at(self.sampler.epoch), self.share
        for batch in self.sampler:
            yield [(index, seed, size, share) for index, seed in batch]


def _checked_loader(dataset: EncodedImages, batch_sampler, workers: int, prepare, device: torch.device,
                    max_bad: Optional[float], decoder: str) -> CheckedLoader:
    loader = worker_loader(dataset, batch_sampler, workers, collate)
    return CheckedLoader(loader, DeviceBatches(loader, dataset, prepare, device, decoder), dataset.bad_images, max_bad)


def create_gpu_train_loader(samples: list, config: dict, data_cfg: dict, batch_sampler, device: torch.device,
                            sizes=None) -> CheckedLoader:
    """Training batches decoded and augmented on `device`: timm's training transform.

    Args:
        samples: (path, label) pairs in the dataset's order (timm's folder reader's `.samples`).
        batch_sampler: a sampling.TrainBatchSampler (micro-batches of (index, sample seed)).
        sizes: a sampling.ImageSizes for progressive resizing (None: data_cfg's size). The workers draw crops in source
            pixels, whatever the output size: the device's resampling reads the size of the sampler's epoch, and the
            workers' own crops (cpu_decode_share) the size that comes with each item.

    Returns:
        A CheckedLoader (close() it when done) of (x, y) on `device`; its batch_sampler's `share` is the
        cpu_decode_share (config's, or 0.0 where that is None).
    """
    augment = TrainAugment.create(config, data_cfg)
    sizes = sizes or ImageSizes(augment.size[0])
    enabled = [op for op, r in enumerate(augment.jitter) if r is not None]
    mean, std = (torch.tensor(data_cfg[k], device=device).view(1, -1, 1, 1) for k in ('mean', 'std'))

    def prepare(images: list, params: torch.Tensor) -> torch.Tensor:
        # the sampler's epoch changes only between passes, once the batches of the pass are made
        size = (sizes.at(batch_sampler.epoch),) * 2
        rows, cols = crop_axes(params, size)
        x = resample(images, rows, cols, params[:, FLIPS].bool(), params[:, INTERP].long(), size)
        if augment.auto is not None:  # on the uint8 levels PIL's auto-augment sees
            x = apply_ops(x.round_(), params[:, AUTO].reshape(len(params), -1, 3), augment.auto.fill)
        return normalize(color_jitter(x.div_(255), params, enabled), mean, std)

    max_bad = config['max_bad_images'] * batch_sampler.steps_per_epoch * batch_sampler.layout.per_process
    items = TrainItems(batch_sampler, sizes, config['cpu_decode_share'] or 0.0)
    return _checked_loader(EncodedImages(samples, augment), items, config['workers'], prepare, device, max_bad,
                           config['gpu_decoder'])


def create_gpu_eval_loader(samples: list, data_cfg: dict, batch_sampler, workers: int, device: torch.device,
                           max_bad_images: Optional[float] = None, decoder: str = 'torchvision') -> CheckedLoader:
    """Evaluation batches decoded, resized and centre-cropped on `device`: timm's evaluation transform.

    Args:
        batch_sampler: a sampling.EvalBatchSampler (lists of indices).
        max_bad_images: the share of the shard's images that may be bad before the run stops (None: no limit).
    """
    resize = EvalResize.create(data_cfg)
    interpolation = INTERPOLATIONS[resize.interpolation]
    mean, std = (torch.tensor(data_cfg[k], device=device).view(1, -1, 1, 1) for k in ('mean', 'std'))

    def prepare(images: list, params: torch.Tensor) -> torch.Tensor:
        rows, cols = resize.axes(params[:, SIZE].long())
        no_flips = torch.zeros(len(images), 2, dtype=torch.bool)
        x = resample(images, rows, cols, no_flips, torch.full((len(images),), interpolation),
                     (resize.size, resize.size))
        return normalize(x.div_(255), mean, std)

    max_bad = None if max_bad_images is None else max_bad_images * (batch_sampler.end - batch_sampler.start)
    return _checked_loader(EncodedImages(samples, None), batch_sampler, workers, prepare, device, max_bad, decoder)
