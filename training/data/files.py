"""Image files: opened without decoding, decoded to RGB, or decoded at reduced size around a crop; what makes a file
bad.

Reduced-size decoding: libjpeg can decode a JPEG at 1/2, 1/4 or 1/8 of its size (DCT scaling, PIL's `draft`), which
skips most of the inverse DCT, colour conversion and memory traffic. The crop is drawn first, on the size read from the
file's header; the scale is the largest that still leaves the crop at least the output size (see `dct_scale`).

What is bad (the policy of the whole pipeline; docs/input-pipeline.md, "Unreadable images"):
- decoded anyway when PIL can: a PNG or GIF named .JPEG, CMYK and grayscale JPEGs, palette images all become RGB.
  So does a JPEG whose entropy data libjpeg resynchronises past: PIL does not report libjpeg's warnings.
- bad otherwise: an empty file, a file PIL cannot identify, truncated data (PIL's LOAD_TRUNCATED_IMAGES, which would
  fill the missing part with grey, is never set), a decoding error, an image above PIL's decompression-bomb limit
  (89 megapixels, where PIL warns; it refuses only at twice that).
What happens to a bad file is bad_images.py's.
"""
import math
import os
import warnings

from PIL import Image, UnidentifiedImageError

# why an image is bad; the position is the code shared with the main process (0: not bad)
REASONS = ('', 'empty file', 'not an image PIL can identify', 'truncated image data', 'corrupt image data',
           'above PIL\'s decompression-bomb limit', 'cannot be read from disk')
EMPTY, UNIDENTIFIED, TRUNCATED, CORRUPT, TOO_LARGE, UNREADABLE = range(1, len(REASONS))


class BadImage(Exception):
    """An image file that cannot be decoded; `reason` is a code into REASONS."""

    def __init__(self, path: str, reason: int):
        super().__init__(f'{path}: {REASONS[reason]}')
        self.path, self.reason = path, reason


def open_image(path: str) -> Image.Image:
    """The image at `path` with its header read and its pixels not yet decoded.

    Above PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS, 89 megapixels) an image is bad from its header: PIL
    itself only warns up to twice that limit, and would decode it (1.6 GB for 144 megapixels), printing its warning.
    """
    try:
        if os.path.getsize(path) == 0:
            raise BadImage(path, EMPTY)
        with warnings.catch_warnings():
            warnings.simplefilter('error', Image.DecompressionBombWarning)
            return Image.open(path)
    except UnidentifiedImageError:
        raise BadImage(path, UNIDENTIFIED) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
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
