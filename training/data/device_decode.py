"""Reading files in the loader workers and decoding JPEGs on the training device (`decode: gpu`).

Workers read each file's bytes and draw its augmentation (device_params.py); the device decodes the batch in one call
(nvjpeg, or nvImageCodec with gpu_decoder: nvimgcodec, on CUDA; libjpeg on CPU, which is how the tests run it). A
cpu_decode_share of the samples is decoded, cropped and resized by the workers instead.

Files the device decoder cannot take (PNG, CMYK/YCCK or RGB-coded JPEGs, files without an end marker) are decoded with
PIL in the worker, which sends pixels instead of bytes. Bad files follow the CPU path's policy (bad_images.py):
replaced by the next readable file with its label and the sample's seed, named once, counted per pass.

nvjpeg's pixels differ from libjpeg's by ~1.5 levels of 255 on average, nvImageCodec's by none.
"""
import io
import logging
import warnings
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.utils.data
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from ..config import UserError
from .bad_images import BadImages, first_readable
from .device_params import AUTO, CROP, FLIPS, INTERP, SIZE, TrainAugment, decoded_on_cpu, to_device
from .files import BadImage, decode_crop, decode_rgb, open_image

_logger = logging.getLogger(__name__)

EOI = b'\xff\xd9'
NVIMGCODEC_CPU_THREADS = 2  # its default, one per core, competes with the loader workers (2 was fastest)


def pil_pixels(image: Image.Image) -> torch.Tensor:
    """RGB uint8 CHW pixels of an opened image, decoded by files.decode_rgb() (BadImage where PIL cannot)."""
    return torch.from_numpy(np.asarray(decode_rgb(image)).copy()).permute(2, 0, 1)


def read_image(path: str) -> tuple:
    """A file as (payload, height, width): its bytes (1-D uint8) where the device decoder takes it, else its pixels.

    Only the header is parsed of a JPEG that goes to the device. Raises files.BadImage as the CPU path does.
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


def crop_on_cpu(path: str, augment: TrainAugment, seed: int, size: tuple) -> tuple:
    """(pixels, params) of a sample that its worker decodes, crops, resizes (at reduced size where the crop allows, as
    the CPU path's jpeg_draft), flips and auto-augments with timm's PIL functions: CHW uint8 pixels at the output size,
    and the sample's params with the crop replaced by the whole output and no flips or auto-augment ops left, so that
    the device only jitters and normalises it."""
    image = open_image(path)
    try:
        width, height = image.size
        params = augment.draw(seed, height, width)
        top, left, h, w = params[CROP]
        resample = (Image.NEAREST, Image.BILINEAR, Image.BICUBIC)[params[INTERP]]
        crop = decode_crop(image, (left, top, left + w, top + h), size[::-1], resample)
    finally:
        image.close()
    for flip, transpose in zip(params[FLIPS], (Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM)):
        crop = crop.transpose(transpose) if flip else crop
    if augment.auto is not None:
        crop = augment.auto.apply_pil(crop, params[AUTO])
    params[SIZE], params[CROP], params[FLIPS] = size, (0, 0, *size), (False, False)
    params[AUTO] = [0.0] * len(params[AUTO])
    return torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1), params


class EncodedImages(torch.utils.data.Dataset):
    """Items for the device: a training item is (index, sample seed, image size, cpu_decode_share), an evaluation item
    an index. The share comes with the item, so that it can change between passes without restarting the workers.

    A bad file is replaced as bad_images.first_readable() replaces it on the CPU path: by the next readable file in the
    dataset's order, with that file's label and the sample's seed; `bad_images` records it for CheckedLoader.
    The item's share of the training samples is decoded, cropped and resized here instead (decoded_on_cpu()).
    """

    def __init__(self, samples: list, augment: Optional[TrainAugment]):
        self.samples = samples
        self.augment = augment
        self.bad_images = BadImages([str(path) for path, _ in samples])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item) -> Encoded:
        index, seed, size, share = item if self.augment is not None else (item, None, None, 0.0)

        def encode(candidate: int) -> Encoded:
            path, label = self.samples[candidate]
            if (seed is not None) and decoded_on_cpu(seed, share):
                return Encoded(item, candidate, *crop_on_cpu(str(path), self.augment, seed, (size, size)), int(label))
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
