"""Cropping, resizing and flipping on the device: the training crop (RandomResizedCrop) and the evaluation resize and
centre crop, as one weight matrix per image and axis, applied by two batched matrix products.

Resampling uses PIL's filters (antialiased bilinear/bicubic, support scaled by the downscale factor): the crop, the
resize and the flip are all in the weights. Results differ from PIL's by its uint8 rounding between passes (under 1
level of 255 on average, see tests/test_device_path.py).
"""
import math
from dataclasses import dataclass

import torch

from ..config import UserError
from .device_params import BICUBIC, BILINEAR, CROP, INTERPOLATIONS, NEAREST, to_device

CHUNK_ELEMENTS = 2 ** 27  # floats in one padded group of crops (512 MiB): a few groups per batch of ImageNet images


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
