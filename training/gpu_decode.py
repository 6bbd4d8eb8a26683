"""JPEG decoding and augmentation on the training device (`decode: gpu`).

Loader workers read each file's bytes and draw its augmentation from its seed; the training device decodes the batch in
one call (nvjpeg, or nvImageCodec with gpu_decoder: nvimgcodec, on CUDA; libjpeg on CPU, which is how the tests run it),
then crops, resizes and flips it with two batched matrix products, applies colour jitter and normalises. A
cpu_decode_share of the samples is decoded, cropped and resized by the workers instead; the device flips those. The
output is what the CPU path yields: (x float32 normalised NCHW, y int64), both on the device. On CUDA a thread makes
batches ahead on a side stream, so that decoding and augmenting overlap the training steps.

Matching timm's CPU path:
- Augmentation parameters are drawn in timm's order from generators seeded with the sample seed (random.Random for the
  crop as RandomResizedCropAndInterpolation.get_params draws it, torch.Generator for flips and ColorJitter), so a
  sample gets the same crop, flips and jitter factors as `decode: cpu` gives it.
- Resampling uses PIL's filters (antialiased bilinear/bicubic, support scaled by the downscale factor), written as one
  weight matrix per image and axis: the crop, the resize and the flip are all in those weights. Results differ from
  PIL's by its uint8 rounding between passes (under 1 level of 255 on average, see tests/test_gpu_decode.py).
- Colour jitter keeps torchvision's random order of brightness, contrast, saturation and hue per image (four passes,
  each over the images whose k-th operation is that one): the augmentation distribution stays the CPU path's, for
  about the cost of one full-batch pass per operation. The operations follow torchvision's tensor versions on floats.

Files the device decoder cannot take (PNG, CMYK/YCCK or RGB-coded JPEGs, files without an end marker) are decoded
with PIL in the worker, which sends pixels instead of bytes. Bad files follow the CPU path's policy
(training/images.py): replaced by the next readable file with its label and the sample's seed, named once, counted per
pass against max_bad_images. auto_augment exists only as PIL operations and is refused.

Measured on one H200 (torch 2.11, 14 workers, batch 256, JPEGs of 250-500 px, ~70 KB; README "Input pipeline"):
train.py reaches 3,194 img/s at 224 px with the device decoding everything, 3,452 with cpu_decode_share 1.0, against a
ceiling of ~4,200 on synthetic input: nvjpeg's ~15 ms per 256 images share the SMs with the training step.
nvjpeg's pixels differ from libjpeg's by ~1.5 levels of 255 on average, nvImageCodec's by none.
"""
import io
import logging
import math
import queue
import random
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
import torch.utils.data
from PIL import Image
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg

from .config import UserError
from .data import SizedBatches, _worker_init
from .images import BadImage, BadImages, CheckedLoader, decode_crop, decode_rgb, first_readable, open_image

_logger = logging.getLogger(__name__)

NEAREST, BILINEAR, BICUBIC = 0, 1, 2
INTERPOLATIONS = {'nearest': NEAREST, 'bilinear': BILINEAR, 'bicubic': BICUBIC}
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3  # torchvision ColorJitter's operation ids
IDENTITY_FACTORS = (1.0, 1.0, 1.0, 0.0)
# a training sample's parameters, one float64 row per sample
SIZE, CROP, INTERP, FLIPS, ORDER, FACTORS = slice(0, 2), slice(2, 6), 6, slice(7, 9), slice(9, 13), slice(13, 17)
EOI = b'\xff\xd9'
CHUNK_ELEMENTS = 2 ** 27  # floats in one padded group of crops (512 MiB): a few groups per batch of ImageNet images
GRAY = (0.299, 0.587, 0.114)  # PIL's L conversion, which the CPU path's contrast and saturation use
NVIMGCODEC_CPU_THREADS = 2  # its default, one per core, competes with the loader workers (2 was fastest)


# ---- drawing a sample's augmentation (workers) ----

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

    @classmethod
    def create(cls, config: dict, data_cfg: dict) -> 'TrainAugment':
        if config['auto_augment']:
            raise UserError(f"decode: gpu cannot apply auto_augment {config['auto_augment']!r} (it exists only as PIL "
                            "operations): use decode: cpu, or drop auto_augment")
        jitter = config['color_jitter']
        jitter = tuple(jitter) if isinstance(jitter, (list, tuple)) else (float(jitter),) * 3
        try:  # torchvision's own checks and (lo, hi) ranges, so both paths accept the same values
            reference = transforms.ColorJitter(*jitter)
        except (TypeError, ValueError) as e:
            raise UserError(f"color_jitter {config['color_jitter']!r} refused by torchvision: {e}") from None
        ranges = tuple(None if r is None else (float(r[0]), float(r[1]))
                       for r in (reference.brightness, reference.contrast, reference.saturation, reference.hue))
        interpolation = data_cfg['interpolation']
        if interpolation not in (*INTERPOLATIONS, 'random'):
            raise UserError(f'decode: gpu resizes with bilinear, bicubic or nearest interpolation, not '
                            f'{interpolation!r}')
        return cls(tuple(data_cfg['input_size'][1:]), tuple(config['scale']), tuple(config['ratio']), interpolation,
                   config['hflip'], config['vflip'], ranges)

    def draw(self, seed: int, height: int, width: int) -> list:
        """One sample's parameters (see the row layout above), drawn in the order timm's transforms draw them."""
        rng = random.Random(seed)
        gen = torch.Generator().manual_seed(seed)
        box = crop_box(rng, height, width, self.scale, self.ratio)
        interpolation = rng.choice(('bilinear', 'bicubic')) if self.interpolation == 'random' else self.interpolation
        flips = [(p > 0) and bool(torch.rand(1, generator=gen) < p) for p in (self.hflip, self.vflip)]
        order = torch.randperm(4, generator=gen).tolist()
        factors = [identity if r is None else float(torch.empty(1).uniform_(r[0], r[1], generator=gen))
                   for identity, r in zip(IDENTITY_FACTORS, self.jitter)]
        return [height, width, *box, INTERPOLATIONS[interpolation], *flips, *order, *factors]


# ---- reading files (workers) ----

def pil_pixels(image: Image.Image) -> torch.Tensor:
    """RGB uint8 CHW pixels of an opened image, decoded by images.decode_rgb() (BadImage where PIL cannot)."""
    return torch.from_numpy(np.asarray(decode_rgb(image)).copy()).permute(2, 0, 1)


def read_image(path: str) -> tuple:
    """A file as (payload, height, width): its bytes (1-D uint8) where the device decoder takes it, else its pixels.

    Only the header is parsed of a JPEG that goes to the device. Raises images.BadImage as the CPU path does.
    """
    image = open_image(path)
    try:
        width, height = image.size
        if (image.format == 'JPEG') and (image.mode in ('RGB', 'L')) and (image.info.get('adobe_transform') != 0):
            image.fp.seek(0)
            data = image.fp.read()
            if data.rstrip(b'\0').endswith(EOI):  # else truncated, most likely: PIL says so precisely
                return torch.frombuffer(bytearray(data), dtype=torch.uint8), height, width
        return pil_pixels(image), height, width
    finally:
        image.close()


class Encoded(NamedTuple):
    item: object  # the sampler's item: (index, seed) or index
    source: int  # index of the file read: the item's own unless that one is bad
    payload: torch.Tensor  # 1-D bytes or CHW uint8 pixels
    params: list  # TrainAugment.draw() for training, [height, width] for evaluation
    label: int


def decoded_on_cpu(seed: int, share: float) -> bool:
    """Whether a training sample's worker decodes it (a `share` of the seeds), the same choice in every pass.

    A multiplicative hash of the seed: the crop's draws come from random.Random(seed), whose first number would tie the
    choice to the crop's area, and with it the decoding cost.
    """
    return ((seed * 2654435761) % 2 ** 32) < share * 2 ** 32


def crop_on_cpu(path: str, augment: TrainAugment, seed: int, size: tuple) -> tuple:
    """(pixels, params) of a sample that its worker decodes, crops and resizes (at reduced size where the crop allows,
    as the CPU path's jpeg_draft): CHW uint8 pixels at the output size, and the sample's params with the crop replaced
    by the whole output, so that the device only flips, jitters and normalises it."""
    image = open_image(path)
    try:
        width, height = image.size
        params = augment.draw(seed, height, width)
        top, left, h, w = params[CROP]
        resample = (Image.NEAREST, Image.BILINEAR, Image.BICUBIC)[params[INTERP]]
        crop = decode_crop(image, (left, top, left + w, top + h), size[::-1], resample)
    finally:
        image.close()
    params[SIZE], params[CROP] = size, (0, 0, *size)
    return torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1), params


class EncodedImages(torch.utils.data.Dataset):
    """Items for the device: a training item is (index, sample seed[, image size]), an evaluation item an index.

    A bad file is replaced as images.first_readable() replaces it on the CPU path: by the next readable file in the
    dataset's order, with that file's label and the sample's seed; `bad_images` records it for CheckedLoader.
    A `cpu_share` of the training samples is decoded, cropped and resized here instead (decoded_on_cpu()).
    """

    def __init__(self, samples: list, augment: Optional[TrainAugment], cpu_share: float = 0.0):
        self.samples = samples
        self.augment = augment
        self.cpu_share = cpu_share
        self.bad_images = BadImages([str(path) for path, _ in samples])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item) -> Encoded:
        index, seed, *size = item if self.augment is not None else (item, None)
        size = (size[0],) * 2 if size else getattr(self.augment, 'size', None)

        def encode(candidate: int) -> Encoded:
            path, label = self.samples[candidate]
            if (seed is not None) and decoded_on_cpu(seed, self.cpu_share):
                return Encoded(item, candidate, *crop_on_cpu(str(path), self.augment, seed, size), int(label))
            payload, height, width = read_image(str(path))
            params = self.augment.draw(seed, height, width) if self.augment is not None else [height, width]
            return Encoded(item, candidate, payload, params, int(label))
        return first_readable(index, len(self), self.bad_images, encode)


class EncodedBatch(NamedTuple):
    """A collated batch: the bytes of the files the device decodes, concatenated, and the pixels of the others."""
    encoded: torch.Tensor  # 1-D uint8
    spans: list  # (position in the batch, start, end) in `encoded`
    pixels: list  # (positions in the batch, NCHW uint8): the images of one size stacked
    params: torch.Tensor  # float64 [N, P]
    labels: torch.Tensor  # int64 [N]
    items: list  # the sampler's items and the files read, to replace a file the device cannot decode
    sources: list


def collate(batch: list) -> EncodedBatch:
    """One tensor for all bytes and one per image size for pixels: a worker hands the trainer a few tensors per batch
    instead of one per image, and the trainer copies them to the device in as few transfers."""
    spans, by_size, chunks, start = [], {}, [], 0
    for position, encoded in enumerate(batch):
        if encoded.payload.dim() == 1:
            spans.append((position, start, start + len(encoded.payload)))
            chunks.append(encoded.payload)
            start += len(encoded.payload)
        else:
            by_size.setdefault(tuple(encoded.payload.shape), []).append(position)
    pixels = [(positions, torch.stack([batch[p].payload for p in positions])) for positions in by_size.values()]
    return EncodedBatch(torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.uint8), spans, pixels,
                        torch.tensor([e.params for e in batch], dtype=torch.float64),
                        torch.tensor([e.label for e in batch], dtype=torch.int64), [e.item for e in batch],
                        [e.source for e in batch])


# ---- decoding (device) ----

def _create_nvimgcodec(device: torch.device):
    """nvImageCodec's batched decoder, which drives the GPU's hardware JPEG engines, or None where not installed."""
    try:
        from nvidia import nvimgcodec
    except ImportError:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    params = nvimgcodec.DecodeParams(apply_exif_orientation=False)  # and its default, interleaved sRGB
    # the hardware engines first; no CPU-only backend, which would decode on this process's few threads: a file the
    # GPU backends refuse is left out, and JpegDecoder hands the batch to torchvision
    backends = [nvimgcodec.Backend(getattr(nvimgcodec.BackendKind, kind))
                for kind in ('HW_GPU_ONLY', 'GPU_ONLY', 'HYBRID_CPU_GPU')]
    return nvimgcodec.Decoder(device_id=index, max_num_cpu_threads=NVIMGCODEC_CPU_THREADS, backends=backends), params


class JpegDecoder:
    """Decodes lists of JPEG bytes on one device: on CUDA with torchvision (nvjpeg) or nvImageCodec (`which`), on CPU
    with torchvision (libjpeg).

    Returns CHW uint8 images, with None for each file that the device could not decode.
    """

    def __init__(self, device: torch.device, which: str = 'torchvision'):
        self.device = device
        self.nvimgcodec = None
        if device.type == 'cuda' and which == 'nvimgcodec':
            try:
                self.nvimgcodec = _create_nvimgcodec(device)
            except Exception as e:  # a broken install must not stop training: torchvision decodes as well
                _logger.warning(f'nvImageCodec could not start ({type(e).__name__}: {e})')
            if self.nvimgcodec is None:
                raise UserError('gpu_decoder: nvimgcodec, but nvImageCodec is not installed or did not start: pip '
                                'install nvidia-nvimgcodec-cu13 (cu12 for CUDA 12), or set gpu_decoder torchvision')
        if device.type == 'cuda':
            _logger.info(f"JPEG decoding on the GPU with {'nvImageCodec' if self.nvimgcodec else 'torchvision/nvjpeg'}")

    def __call__(self, encoded: list) -> list:
        if self.nvimgcodec is not None:
            try:
                images = self._decode_nvimgcodec(encoded)
            except Exception as e:  # a failing install must not stop training: torchvision decodes as well
                _logger.warning(f'nvImageCodec failed ({type(e).__name__}: {e}); decoding with torchvision from now on')
                self.nvimgcodec = None
            else:
                if images is not None:
                    return images
        return self._decode_torchvision(encoded)

    def _decode_nvimgcodec(self, encoded: list) -> Optional[list]:
        """The images, or None where some file was not decoded (nvImageCodec leaves it out, or gives None)."""
        decoder, params = self.nvimgcodec
        images = decoder.decode([t.numpy() for t in encoded], params=params,
                                cuda_stream=torch.cuda.current_stream(self.device).cuda_stream)
        if (len(images) != len(encoded)) or any(image is None for image in images):
            return None
        return [torch.as_tensor(image, device=self.device).permute(2, 0, 1) for image in images]

    def _decode_torchvision(self, encoded: list) -> list:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of torchcodec
            warnings.simplefilter('ignore', DeprecationWarning)
            try:
                return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:  # one bad file fails the whole batch
                return [self._decode_one(data) for data in encoded]

    def _decode_one(self, data: torch.Tensor) -> Optional[torch.Tensor]:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return None


def decode_batch(batch: EncodedBatch, decoder: JpegDecoder, dataset: EncodedImages) -> tuple:
    """The batch's images on the device, and its params and labels with any replacements made here.

    A file the device cannot decode (or decodes to another size than its header says) is decoded by PIL from the same
    bytes; a file PIL cannot decode either is recorded bad and replaced as a worker would replace it, so that the
    next pass, whose worker skips it, gives the same sample.

    Returns:
        (images, params, labels): a list of CHW uint8 device tensors, float64 CPU params, CPU labels.
    """
    images = [None] * len(batch.labels)
    for positions, pixels in batch.pixels:
        for position, image in zip(positions, to_device(pixels, decoder.device).unbind(0)):
            images[position] = image
    encoded = [batch.encoded[start:end] for _, start, end in batch.spans]
    decoded = decoder(encoded) if encoded else []
    params, labels = batch.params.clone(), batch.labels.clone()
    sizes = params[:, SIZE].long().tolist()
    for (position, _, _), data, image in zip(batch.spans, encoded, decoded):
        source = batch.sources[position]
        while (image is None) or (list(image.shape[1:]) != sizes[position]):
            try:
                image = to_device(pil_pixels(Image.open(io.BytesIO(data.numpy().tobytes()))), decoder.device)
                break
            except BadImage as e:
                dataset.bad_images.met(source, e.reason)
            replacement = dataset[batch.items[position]]  # skips the files known to be bad
            source, data = replacement.source, replacement.payload
            params[position] = torch.tensor(replacement.params, dtype=torch.float64)
            sizes[position] = replacement.params[:2]
            labels[position] = replacement.label
            image = decoder([data])[0] if data.dim() == 1 else to_device(data, decoder.device)
        images[position] = image
    return images, params, labels


# ---- resampling (device) ----

def _bilinear(t: torch.Tensor) -> torch.Tensor:
    return (1 - t.abs()).clamp_(min=0)


def _bicubic(t: torch.Tensor) -> torch.Tensor:
    a, t = -0.5, t.abs()  # PIL's and torchvision's cubic
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = a * (((t - 5) * t + 8) * t - 4)
    return torch.where(t < 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


FILTERS = {BILINEAR: _bilinear, BICUBIC: _bicubic}


# How one axis of each image maps to the output: an [N, 6] float64 host tensor with these columns. Output index o
# reads position FIRST + o of the resized line (valid in [0, OUT_LEN)), whose sampling centre is
# (FIRST + o + 0.5) * SCALE on the source line; the source line starts at ORIGIN in the image, and only its region
# [START, START + LENGTH) is read.
FIRST, SCALE, OUT_LEN, ORIGIN, START, LENGTH = range(6)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on the device without waiting: a copy from pageable memory waits for the device's queue."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == 'cuda' else t


def axis_weights(axis: torch.Tensor, count: int, width: int, flip: torch.Tensor, interpolation: torch.Tensor,
                 present: set) -> torch.Tensor:
    """[N, count, width] resampling weights: output pixel o of image n is weights[n, o] @ (its region's line).

    PIL's antialiasing: the filter is stretched by the downscale factor and normalised over the pixels inside the
    region. A flip reverses the output order. `axis` (see FIRST...), `flip` and `interpolation` are on the device;
    `present` holds the interpolation codes among them.
    """
    device = axis.device
    first, scale, out_len, start, length = (axis[:, c] for c in (FIRST, SCALE, OUT_LEN, START, LENGTH))
    o = torch.arange(count, device=device, dtype=torch.float64)
    o = torch.where(flip[:, None], count - 1 - o, o)
    resized = first[:, None] + o
    center = (resized + 0.5) * scale[:, None]  # on the source line, float64 so that nearest picks PIL's pixel
    x = torch.arange(width, device=device)
    # distance from each output pixel's centre to each region pixel's centre, in filter units
    offset = (center - start[:, None] - 0.5).float()
    t = (x.float()[None, None, :] - offset[..., None]) / scale.clamp(min=1.0).float()[:, None, None]
    weights = torch.zeros(len(axis), count, width, device=device)
    for code in present:
        if code == NEAREST:
            pixel = (center.floor() - start[:, None]).clamp(min=0).clamp_(max=length[:, None] - 1)
            kernel = (x[None, None, :] == pixel[..., None]).float()
        else:
            kernel = FILTERS[code](t)
        weights = torch.where((interpolation == code)[:, None, None], kernel, weights)
    weights = weights * (x[None, :] < length[:, None])[:, None, :]
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=1e-12)
    return weights * ((resized >= 0) & (resized < out_len[:, None]))[..., None]


def _chunks(sizes: list) -> list:
    """Positions grouped so that each group padded to its largest height and width stays under CHUNK_ELEMENTS."""
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    groups, group, height, width = [], [], 0, 0
    for i in order:
        h, w = max(height, sizes[i][0]), max(width, sizes[i][1])
        if group and ((len(group) + 1) * 3 * h * w > CHUNK_ELEMENTS):
            groups.append(group)
            group, h, w = [], sizes[i][0], sizes[i][1]
        group.append(i)
        height, width = h, w
    return groups + [group]


def _copies(axis: torch.Tensor) -> torch.Tensor:
    """[N] bools: where an axis (see FIRST...) maps its source line 1:1 onto the output, the resampling is a copy."""
    return ((axis[:, FIRST] == 0) & (axis[:, SCALE] == 1) & (axis[:, START] == 0)
            & (axis[:, LENGTH] == axis[:, OUT_LEN]))


def resample(images: list, rows: torch.Tensor, cols: torch.Tensor, flips: torch.Tensor, interpolation: torch.Tensor,
             out_size: tuple) -> torch.Tensor:
    """Crop, resize and flip every image: [N, 3, H, W] floats in [0, 255].

    Regions are padded into groups (few: one for a usual ImageNet batch), each resampled by two batched matrix
    products, first along rows (PIL's order), then along columns. `rows` and `cols` are [N, 6] host tensors (see
    FIRST...), `flips` [N, 2] (horizontal, vertical) and `interpolation` [N] host tensors.
    """
    device = images[0].device
    top, left = (rows[:, ORIGIN] + rows[:, START]).long().tolist(), (cols[:, ORIGIN] + cols[:, START]).long().tolist()
    heights, widths = rows[:, LENGTH].long().tolist(), cols[:, LENGTH].long().tolist()
    regions = [image[:, t:t + h, l:l + w] for image, t, l, h, w in zip(images, top, left, heights, widths)]
    out = torch.empty(len(images), 3, *out_size, device=device)
    copied = (_copies(rows) & _copies(cols)).nonzero().flatten().tolist()
    if copied:  # pixels the workers cropped and resized (cpu_decode_share): flipped only, no resampling
        x = torch.stack([regions[i] for i in copied]).float()
        hflip, vflip = to_device(flips[copied], device).T[..., None, None, None]
        x = torch.where(hflip, x.flip(3), x)
        out.index_copy_(0, to_device(torch.tensor(copied), device), torch.where(vflip, x.flip(2), x))
    rest = sorted(set(range(len(images))) - set(copied))
    for group in _chunks([tuple(regions[i].shape[1:]) for i in rest]) if rest else []:
        group = [rest[k] for k in group]
        height = max(regions[i].shape[1] for i in group)
        width = max(regions[i].shape[2] for i in group)
        padded = torch.zeros(len(group), 3, height, width, device=device)
        for k, i in enumerate(group):
            padded[k, :, :regions[i].shape[1], :regions[i].shape[2]].copy_(regions[i])
        # one copy for the whole group's parameters
        packed = to_device(torch.cat([rows[group], cols[group], flips[group].double(),
                                      interpolation[group, None].double(), torch.tensor(group)[:, None].double()], 1),
                           device)
        codes, present = packed[:, 14].long(), set(interpolation[group].tolist())
        wx = axis_weights(packed[:, 6:12], out_size[1], width, packed[:, 12] > 0, codes, present)
        wy = axis_weights(packed[:, :6], out_size[0], height, packed[:, 13] > 0, codes, present)
        # PIL clips its uint8 result between the passes, which matters where bicubic overshoots
        horizontal = torch.matmul(padded, wx.transpose(1, 2)[:, None]).clamp_(0, 255)
        out.index_copy_(0, packed[:, 15].long(), torch.matmul(wy[:, None], horizontal))
    return out.clamp_(0, 255)


def crop_axes(params: torch.Tensor, out_size: tuple) -> tuple:
    """Rows and columns of RandomResizedCrop: the source line is the crop, read whole."""
    top, left, height, width = params[:, CROP].unbind(1)
    zero = torch.zeros_like(top)
    return (torch.stack([zero, height / out_size[0], torch.full_like(top, out_size[0]), top, zero, height], 1),
            torch.stack([zero, width / out_size[1], torch.full_like(top, out_size[1]), left, zero, width], 1))


@dataclass(frozen=True)
class EvalResize:
    """timm's evaluation transform: resize (the shorter side to size / crop_pct, or both for 'squash'), centre crop."""
    size: int
    crop_pct: float
    interpolation: str
    squash: bool

    @classmethod
    def create(cls, data_cfg: dict) -> 'EvalResize':
        _, height, width = data_cfg['input_size']
        mode = data_cfg.get('crop_mode') or 'center'
        if (height != width) or (mode not in ('center', 'squash')):
            raise UserError(f'decode: gpu evaluates square images with crop_mode center or squash, not '
                            f'{height}x{width} {mode}')
        interpolation = 'bilinear' if data_cfg['interpolation'] == 'random' else data_cfg['interpolation']
        if interpolation not in INTERPOLATIONS:
            raise UserError(f'decode: gpu resizes with bilinear, bicubic or nearest interpolation, not '
                            f'{interpolation!r}')
        return cls(height, data_cfg['crop_pct'], interpolation, mode == 'squash')

    def axes(self, sizes: torch.Tensor) -> tuple:
        """Rows and columns for images of these (height, width) sizes."""
        target = math.floor(self.size / self.crop_pct)
        lines = []
        for n in range(len(sizes)):
            height, width = sizes[n].tolist()
            if self.squash:
                resized = (target, target)
            else:  # torchvision's Resize(int): the shorter side becomes `target`, the longer one is truncated
                short, long = sorted((height, width))
                resized = (target, int(target * long / short)) if height <= width else (int(target * long / short),
                                                                                         target)
            lines.append([self._line(length, new) for length, new in zip((height, width), resized)])
        return tuple(torch.tensor([line[a] for line in lines], dtype=torch.float64) for a in (0, 1))

    def _line(self, length: int, resized: int) -> list:
        # CenterCrop: offset round((resized - size) / 2), or a zero border where the resized line is shorter
        first = int(round((resized - self.size) / 2.0)) if resized >= self.size else -((self.size - resized) // 2)
        scale = length / resized
        margin = 2 * max(scale, 1.0) + 1  # the widest filter reach, in source pixels
        lo = (max(first, 0) + 0.5) * scale - margin
        hi = (min(first + self.size, resized) - 0.5) * scale + margin
        start, end = max(0, math.floor(lo)), min(length, math.ceil(hi))
        return [first, scale, resized, 0, start, end - start]


# ---- colour and normalisation (device) ----

def _gray(x: torch.Tensor) -> torch.Tensor:
    return (GRAY[0] * x[:, 0] + GRAY[1] * x[:, 1] + GRAY[2] * x[:, 2]).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    factor = factor.view(-1, 1, 1, 1)
    return (factor * x + (1 - factor) * other).clamp_(0, 1)


def _brightness(x, factor):
    return _blend(x, torch.zeros_like(x[:, :1]), factor)


def _contrast(x, factor):
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def _saturation(x, factor):
    return _blend(x, _gray(x), factor)


def _hue(x, shift):
    """Rotate the HSV hue by `shift` turns; value and saturation stay."""
    r, g, b = x.unbind(1)
    value, low = x.max(1).values, x.min(1).values
    delta = value - low
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(value == r, ((g - b) / safe) % 6,
                      torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = (hue / 6 + shift.view(-1, 1, 1)) % 1.0
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + 6 * hue[:, None]) % 6
    return value[:, None] - delta[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


JITTER = {BRIGHTNESS: _brightness, CONTRAST: _contrast, SATURATION: _saturation, HUE: _hue}


def color_jitter(x: torch.Tensor, params: torch.Tensor, enabled: list) -> torch.Tensor:
    """torchvision's ColorJitter per image, in each image's own random order, on [0, 1] floats."""
    order = params[:, ORDER].long()
    steps = [(op, (order[:, k] == op).nonzero().flatten()) for k in range(4) for op in enabled]
    steps = [(op, index) for op, index in steps if len(index)]
    if not steps:
        return x
    # one copy: the factors, then each step's images
    packed = to_device(torch.cat([params[:, FACTORS].flatten()] + [index.double() for _, index in steps]), x.device)
    factors, *indices = packed.split([4 * len(params)] + [len(index) for _, index in steps])
    factors = factors.float().view(-1, 4)
    for (op, _), index in zip(steps, indices):
        index = index.long()
        x[index] = JITTER[op](x[index], factors[index, op])
    return x


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std, with [1, C, 1, 1] device tensors."""
    return x.sub_(mean).div_(std)


# ---- loaders ----

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


def _checked_loader(dataset: EncodedImages, batch_sampler, workers: int, prepare, device: torch.device,
                    max_bad: Optional[float], decoder: str) -> CheckedLoader:
    """data.py's loader shape: persistent workers (CheckedLoader.close() ends them) and the bad-image checks."""
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers,
                                         collate_fn=collate, worker_init_fn=_worker_init,
                                         persistent_workers=workers > 0)
    return CheckedLoader(loader, DeviceBatches(loader, dataset, prepare, device, decoder), dataset.bad_images, max_bad)


def create_gpu_train_loader(samples: list, config: dict, data_cfg: dict, batch_sampler, device: torch.device,
                            sizes=None) -> CheckedLoader:
    """Training batches decoded and augmented on `device`: timm's training transform, without auto_augment.

    Args:
        samples: (path, label) pairs in the dataset's order (timm's folder reader's `.samples`).
        batch_sampler: a data.TrainBatchSampler (micro-batches of (index, sample seed)).
        sizes: a data.ImageSizes for progressive resizing (None: data_cfg's size). The workers draw crops in source
            pixels, whatever the output size: the device's resampling reads the size of the sampler's epoch, and the
            workers' own crops (cpu_decode_share) the size that comes with each item.

    Returns:
        A CheckedLoader (close() it when done) of (x, y) on `device`.
    """
    augment = TrainAugment.create(config, data_cfg)
    enabled = [op for op, r in enumerate(augment.jitter) if r is not None]
    mean, std = (torch.tensor(data_cfg[k], device=device).view(1, -1, 1, 1) for k in ('mean', 'std'))

    def prepare(images: list, params: torch.Tensor) -> torch.Tensor:
        # the sampler's epoch changes only between passes, once the batches of the pass are made
        size = augment.size if sizes is None else (sizes.at(batch_sampler.epoch),) * 2
        rows, cols = crop_axes(params, size)
        x = resample(images, rows, cols, params[:, FLIPS].bool(), params[:, INTERP].long(), size)
        return normalize(color_jitter(x.div_(255), params, enabled), mean, std)

    max_bad = config['max_bad_images'] * batch_sampler.steps_per_epoch * batch_sampler.layout.per_process
    batches = batch_sampler if sizes is None else SizedBatches(batch_sampler, sizes)
    return _checked_loader(EncodedImages(samples, augment, config['cpu_decode_share']), batches,
                           config['workers'], prepare, device, max_bad, config['gpu_decoder'])


def create_gpu_eval_loader(samples: list, data_cfg: dict, batch_sampler, workers: int, device: torch.device,
                           max_bad_images: Optional[float] = None, decoder: str = 'torchvision') -> CheckedLoader:
    """Evaluation batches decoded, resized and centre-cropped on `device`: timm's evaluation transform.

    Args:
        batch_sampler: a data.EvalBatchSampler (lists of indices).
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
