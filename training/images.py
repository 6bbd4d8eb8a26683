"""Image files on the CPU input path: opened without decoding, decoded at reduced size when the crop allows, and
the bad-image policy.

Reduced-size decoding: libjpeg can decode a JPEG at 1/2, 1/4 or 1/8 of its size (DCT scaling, PIL's `draft`), which
skips most of the inverse DCT, colour conversion and memory traffic. The training crop is drawn first, by timm's own
`RandomResizedCropAndInterpolation.get_params` on the size read from the file's header, so the crops are timm's; the
scale is the largest that still leaves the crop at least the output size (see `dct_scale`).

Bad images (the policy; README "Unreadable images"):
- decoded anyway when PIL can: a PNG or GIF named .JPEG, CMYK and grayscale JPEGs, palette images all become RGB.
  So does a JPEG whose entropy data libjpeg resynchronises past: PIL does not report libjpeg's warnings.
- bad otherwise: an empty file, a file PIL cannot identify, truncated data (PIL's LOAD_TRUNCATED_IMAGES, which would
  fill the missing part with grey, is never set), a decoding error, an image above PIL's decompression-bomb limit.
- a bad image is replaced by the next index (wrapping) whose image loads, under the sample's own seed, so that a
  resumed run loads exactly what the interrupted one did; its label comes with it.
- each bad file is logged once, with its path and reason, by the main process; the number met in each pass over the
  data is counted, and more than `max_bad_images` (a share of the pass's images) stops the run with one line.
Workers are separate processes: they record what they meet in shared memory (`BadImages`), and the main process,
which iterates the loader (`CheckedLoader`), reads it every few batches and at the end of each pass.
"""
import atexit
import logging
import math
import os
import random
import weakref
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.utils.data
from PIL import Image, UnidentifiedImageError
from timm.data import create_reader
from timm.data.transforms import RandomResizedCropAndInterpolation, interp_mode_to_str, str_to_pil_interp
from torchvision import transforms

from .config import UserError

_logger = logging.getLogger(__name__)

# why an image is bad; the position is the code shared with the main process (0: not bad)
REASONS = ('', 'empty file', 'not an image PIL can identify', 'truncated image data', 'corrupt image data',
           'above PIL\'s decompression-bomb limit', 'cannot be read from disk')
EMPTY, UNIDENTIFIED, TRUNCATED, CORRUPT, TOO_LARGE, UNREADABLE = range(1, len(REASONS))

MAX_BAD_IN_A_ROW = 32  # a sample gives up after this many consecutive bad files: the data set is broken
CHECK_EVERY = 50  # batches between two bad-image checks of the main process


class BadImage(Exception):
    """An image file that cannot be decoded; `reason` is a code into REASONS."""

    def __init__(self, path: str, reason: int):
        super().__init__(f'{path}: {REASONS[reason]}')
        self.path, self.reason = path, reason


class TooManyBadImages(Exception):
    """MAX_BAD_IN_A_ROW consecutive files were bad (raised in a worker, turned into a UserError by CheckedLoader)."""


def open_image(path: str) -> Image.Image:
    """The image at `path` with its header read and its pixels not yet decoded."""
    try:
        if os.path.getsize(path) == 0:
            raise BadImage(path, EMPTY)
        return Image.open(path)
    except UnidentifiedImageError:
        raise BadImage(path, UNIDENTIFIED) from None
    except Image.DecompressionBombError:
        raise BadImage(path, TOO_LARGE) from None
    except (OSError, SyntaxError, ValueError):
        raise BadImage(path, UNREADABLE) from None


def decode_rgb(img: Image.Image) -> Image.Image:
    """The pixels of an opened image in RGB, all of them or BadImage; an already decoded image passes through."""
    try:
        img.load()
        return img if img.mode == 'RGB' else img.convert('RGB')
    except (OSError, SyntaxError, ValueError) as e:
        img.close()
        reason = TRUNCATED if 'truncated' in str(e) else CORRUPT
        raise BadImage(getattr(img, 'filename', ''), reason) from None


def open_rgb(path: str) -> Image.Image:
    """The image at `path` decoded to RGB at full size, or BadImage."""
    return decode_rgb(open_image(path))


def dct_scale(crop_size: tuple, out_size: tuple) -> int:
    """The largest JPEG DCT scale (8, 4, 2 or 1) at which the crop (w, h) still measures at least out_size (w, h).

    The resize that follows then still shrinks or keeps its input, as it would from full size, and the scaled decode
    keeps every frequency below the decoded image's Nyquist limit, which is at or above the output's: what the output
    can show is all there. Any larger scale would make the resize enlarge, and lose detail.
    """
    for scale in (8, 4, 2):
        if (crop_size[0] >= scale * out_size[0]) and (crop_size[1] >= scale * out_size[1]):
            return scale
    return 1


def decode_crop(img: Image.Image, box: tuple, size: tuple, resample: int) -> Image.Image:
    """Decode an opened image and resize its `box` (left, top, right, bottom in full-size pixels) to `size` (w, h),
    decoding a JPEG at the largest DCT scale that the box allows (other formats at full size)."""
    left, top, right, bottom = box
    full_width = img.width
    scale = dct_scale((right - left, bottom - top), size)
    if scale > 1:
        # a request of (W // s, H // s) makes PIL pick exactly s; None for formats without DCT scaling
        drafted = img.draft('RGB', (img.width // scale, img.height // scale))
        scale = full_width / drafted[1][2] if drafted else 1
    rgb = decode_rgb(img)
    # decoded pixel x covers full-size pixels [x * scale, (x + 1) * scale): the box scales by 1 / scale, and keeps
    # its fractions, which resize() takes as a box relative to the whole pixels cropped around it
    left, top, right, bottom = (c / scale for c in box)
    x0, y0 = math.floor(left), math.floor(top)
    x1, y1 = min(math.ceil(right), rgb.width), min(math.ceil(bottom), rgb.height)
    return rgb.crop((x0, y0, x1, y1)).resize(size, resample, box=(left - x0, top - y0, right - x0, bottom - y0))


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


class DecodeRGB:
    """Full-size decoding to RGB, as the first step of a transform that expects decoded images."""
    takes_opened_image = True

    def __call__(self, img: Image.Image) -> Image.Image:
        return decode_rgb(img)

    def __repr__(self) -> str:
        return f'{self.__class__.__name__}()'


def with_draft_crop(transform: transforms.Compose) -> transforms.Compose:
    """timm's training transform with its RandomResizedCropAndInterpolation decoding at reduced size."""
    return transforms.Compose([DraftRandomResizedCrop.like(t) if type(t) is RandomResizedCropAndInterpolation else t
                               for t in transform.transforms])


def decoding_first(transform: Optional[Callable]) -> Callable:
    """`transform`, preceded by full-size RGB decoding unless its first step decodes an opened image itself."""
    if transform is None:
        return DecodeRGB()
    first = transform.transforms[0] if isinstance(transform, transforms.Compose) else transform
    if getattr(first, 'takes_opened_image', False):
        return transform
    return transforms.Compose([DecodeRGB(), transform])


def seed_sample(seed: int):
    """Seed the generators timm's transforms draw from: Python's, NumPy's global one and torch's CPU generator.

    torch.manual_seed() would also queue a seed for CUDA, formatting a stack trace each time: 0.1 to 1 ms a sample
    in a loader worker (measured), a tenth of all its work at 160 px; this takes 10 us.
    """
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.default_generator.manual_seed(seed)


class BadImageReport(NamedTuple):
    count: int  # bad files met since the previous report (each counted once)
    files: tuple  # (path, reason) of the files first found bad since the previous report


class BadImages:
    """The bad files of a dataset, in shared memory: written by whichever process (loader worker or main) meets one,
    read by the main process to name each once and count them per pass.

    Created with the dataset, so before any worker forks; with num_workers 0 the main process writes it itself.
    """

    def __init__(self, paths: Sequence[str]):
        self.paths = paths
        self.reason = torch.zeros(len(paths), dtype=torch.uint8).share_memory_()
        self.met_in_pass = torch.zeros(len(paths), dtype=torch.int32).share_memory_()
        self.current_pass = torch.ones(1, dtype=torch.int32).share_memory_()  # loads outside a loader count too
        # main process only
        self._named = set()
        self._named_since_report = []
        self._report_from_pass = 1

    # written where a sample is loaded
    def known(self, index: int) -> bool:
        return bool(self.reason[index])

    def met(self, index: int, reason: int = 0):
        """Record that this pass met bad file `index` (for the first time when `reason` is given)."""
        if reason:
            self.reason[index] = reason
        self.met_in_pass[index] = self.current_pass[0]

    # the main process
    def start_pass(self):
        self.current_pass += 1

    def count_in_pass(self) -> int:
        return int((self.met_in_pass == self.current_pass).sum())

    def name_new(self) -> list:
        """Log each bad file not logged before, once, and return their (path, reason)."""
        new = [i for i in self.reason.nonzero().flatten().tolist() if i not in self._named]
        files = [(self.paths[i], REASONS[int(self.reason[i])]) for i in new]
        for path, reason in files:
            _logger.warning(f'Bad image {path}: {reason}; replaced by the next readable image')
        self._named.update(new)
        self._named_since_report += files
        return files

    def epoch_report(self) -> BadImageReport:
        """What was met since the previous report (the files are logged by then)."""
        self.name_new()
        current = int(self.current_pass)
        count = int(((self.met_in_pass >= self._report_from_pass) & (self.met_in_pass <= current)).sum())
        report = BadImageReport(count, tuple(self._named_since_report))
        self._named_since_report, self._report_from_pass = [], current + 1
        return report


def first_readable(index: int, num_samples: int, bad_images: BadImages, load: Callable[[int], object]):
    """load(index), or load() of the next index (wrapping) whose file is not bad; each bad file met is recorded."""
    for step in range(MAX_BAD_IN_A_ROW):
        candidate = (index + step) % num_samples
        if bad_images.known(candidate):
            bad_images.met(candidate)
            continue
        try:
            return load(candidate)
        except BadImage as e:
            bad_images.met(candidate, e.reason)
    raise TooManyBadImages(f'{MAX_BAD_IN_A_ROW} consecutive bad images from index {index}')


class LazyImageFolder(torch.utils.data.Dataset):
    """Images in class folders, labelled as timm's create_dataset labels them, handed to the transform undecoded.

    Why not timm's ImageDataset: it converts every image to RGB before the transform runs, which decodes it at full
    size, so the crop cannot choose a reduced-size decode; and it replaces an unreadable file by the next one with a
    warning that names only an index, seeded by whatever ran before. timm's folder reader still finds the files and
    orders the classes, so labels are timm's.

    A transform whose first step does not take an opened image (timm's own, as create_loader sets them) gets a
    full-size RGB decode in front of it: any transform sees RGB.
    """

    def __init__(self, root: str, transform: Optional[Callable] = None):
        self.reader = create_reader('', root=root)
        self.samples = self.reader.samples  # (path, class index)
        self.transform = transform
        self.bad_images = BadImages([path for path, _ in self.samples])

    @property
    def transform(self) -> Callable:
        return self._transform

    @transform.setter
    def transform(self, transform: Optional[Callable]):
        self._transform = decoding_first(transform)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple:
        return self.load(index)

    def load(self, index: int, seed: Optional[int] = None) -> tuple:
        """(image, label) of sample `index`, or of its replacement if its file is bad; each try starts from `seed`."""
        def attempt(candidate: int) -> tuple:
            if seed is not None:
                seed_sample(seed)
            path, target = self.samples[candidate]
            return self.transform(open_image(path)), target
        return first_readable(index, len(self), self.bad_images, attempt)


class CheckedLoader:
    """A DataLoader's batches, as `batches` (timm's PrefetchLoader, or the GPU path's decoder) delivers them, with
    the bad-image check and the end of the workers.

    Every CHECK_EVERY batches and at the end of each pass, bad files met so far are logged and counted; more than
    `max_bad` in one pass raises UserError. Workers persist across passes: close() ends them (also called at exit).
    """

    def __init__(self, loader: torch.utils.data.DataLoader, batches, bad_images: Optional[BadImages],
                 max_bad: Optional[float]):
        self.loader = loader
        self.batches = batches
        self.bad_images = bad_images
        self.max_bad = max_bad
        atexit.register(_close_if_alive, weakref.ref(self))

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def batch_sampler(self):
        return self.loader.batch_sampler

    def __iter__(self):
        if self.bad_images is None:
            yield from self.batches
            return
        self.bad_images.start_pass()
        try:
            for i, batch in enumerate(self.batches, 1):
                yield batch
                if i % CHECK_EVERY == 0:
                    self.check()
        except TooManyBadImages:
            self.bad_images.name_new()
            raise UserError(f'{MAX_BAD_IN_A_ROW} images in a row are unreadable (logged above): the data set looks '
                            'damaged') from None
        self.check()

    def check(self):
        """Log bad files not logged yet; UserError if this pass met more than max_bad."""
        self.bad_images.name_new()
        count = self.bad_images.count_in_pass()
        if (self.max_bad is not None) and (count > self.max_bad):
            raise UserError(f'{count} unreadable image(s) in this pass over the data (logged above), more than '
                            f'max_bad_images allows ({self.max_bad:g}): repair or remove them, or raise '
                            'max_bad_images')

    def epoch_report(self) -> BadImageReport:
        """Bad files met since the previous report; (0, ()) for datasets that do not track them."""
        if self.bad_images is None:
            return BadImageReport(0, ())
        return self.bad_images.epoch_report()

    def close(self):
        """End the worker processes.

        They ignore SIGTERM (see data._worker_init), and persist between passes, so the interpreter's exit, which
        stops daemon processes with SIGTERM and then waits for them, would wait forever. torch 2.14 keeps the
        persistent workers in the DataLoader's private `_iterator`; its `_shutdown_workers()` is what the iterator's
        own destructor calls.
        """
        iterator = getattr(self.loader, '_iterator', None)
        self.loader._iterator = None
        if iterator is not None:
            iterator._shutdown_workers()

    def __enter__(self) -> 'CheckedLoader':
        return self

    def __exit__(self, *exc):
        self.close()


def _close_if_alive(ref: weakref.ref):
    loader = ref()
    if loader is not None:
        loader.close()
