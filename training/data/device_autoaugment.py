"""Batched, on-device versions of timm's auto-augment ops (RandAugment, AutoAugment) and torchvision's
TrivialAugmentWide ops: each sample of a float32 [N, 3, H, W] batch of uint8 values gets its own op and argument. Only
applying is owned here; the ops are drawn in loader workers.

Each op redoes Pillow's uint8 arithmetic (float32 blends, doubles and 16.16 fixed point in the geometry, PIL's a = -1
bicubic). Measured against timm's and torchvision's PIL functions (Pillow 13, x86-64, CPU): 0 levels of 255, mean and
max, for every op, argument and filter tested. Left over: torch's cos/sin may differ from libm's in the last bit, which
moves a rotated pixel only where it sits exactly on a rounding boundary; posterize to 0 bits gives black where
Pillow 13 raises (as training/data/cpu_path.py's posterize does).
"""
import math

import torch

OPS = ('identity', 'auto_contrast', 'equalize', 'invert', 'rotate', 'posterize', 'solarize', 'solarize_add',
       'contrast', 'color', 'brightness', 'sharpness', 'shear_x', 'shear_y', 'translate_x_rel', 'translate_y_rel',
       'translate_x_abs', 'translate_y_abs')  # names = timm.data.auto_augment's aug_fn function names
NEAREST, BILINEAR, BICUBIC = 0, 2, 3  # PIL's resample codes, as timm passes them


# ---------------------------------------------------------------------------------------------------------------------
# Colour and histogram ops: x [n, 3, H, W] float32, per-sample arguments [n].

def _per_sample(arg: torch.Tensor, x: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return arg.to(x.device, dtype).view(-1, 1, 1, 1)


def _blend(degenerate, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Image.blend(degenerate, x, factor): float32 arithmetic, truncated and clipped to uint8."""
    return (degenerate + _per_sample(factor, x) * (x - degenerate)).floor_().clamp_(0, 255)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L conversion, [n, H, W]; every intermediate is an integer below 2**24, exact in float32."""
    r, g, b = x.unbind(1)
    return torch.floor((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536)


def auto_contrast(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.amin((2, 3), keepdim=True).double(), x.amax((2, 3), keepdim=True).double()
    # PIL builds its lookup table in doubles with these roundings (number / tensor would multiply by a reciprocal)
    scale = torch.full_like(hi, 255) / (hi - lo)
    stretched = (x.double() * scale + -lo * scale).floor_().clamp_(0, 255).float()
    return torch.where(hi > lo, stretched, x)


def equalize(x: torch.Tensor) -> torch.Tensor:
    n, _, h, w = x.shape
    values = x.reshape(n * 3, h * w).long()
    hist = torch.zeros(n * 3, 256, dtype=torch.long, device=x.device).scatter_add_(1, values, torch.ones_like(values))
    step = (h * w - hist.gather(1, values.amax(1, keepdim=True))) // 255
    lut = (step // 2 + hist.cumsum(1) - hist).div(step.clamp(min=1), rounding_mode='floor').clamp_(max=255)
    # step 0 (a single value, or too few pixels below the top one) is PIL's "leave the channel as it is"
    return torch.where(step > 0, lut.gather(1, values), values).float().view_as(x)


def invert(x: torch.Tensor) -> torch.Tensor:
    return 255 - x


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keeps the top `bits` bits; 0 bits gives black (Pillow 13 rejects 0, older Pillow gave black)."""
    step = (256 >> _per_sample(bits, x, torch.long).clamp(0, 8)).float()  # integers: exact on any device
    return torch.floor(x / step) * step


def solarize(x: torch.Tensor, thresh: torch.Tensor) -> torch.Tensor:
    return torch.where(x < _per_sample(thresh, x, torch.float64), x, 255 - x)


def solarize_add(x: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    return torch.where(x < 128, (x + _per_sample(add, x)).clamp(0, 255), x)


def contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    pixels = x.shape[2] * x.shape[3]
    mean = (2 * _luma(x).long().sum((1, 2)) + pixels) // (2 * pixels)  # int(mean + 0.5), exactly
    return _blend(_per_sample(mean, x), x, factor)


def color(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(_luma(x).unsqueeze(1), x, factor)


def brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(0.0, x, factor)


def sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with ImageFilter.SMOOTH ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, rounded; the 1-pixel border stays)."""
    rows = x[..., :-2, :] + x[..., 1:-1, :] + x[..., 2:, :]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    smooth = x.clone()
    # sum / 13 is never within 1/26 of a rounding boundary, so float32 rounds it exactly as PIL does
    smooth[..., 1:-1, 1:-1] = torch.floor((box + 4 * x[..., 1:-1, 1:-1] + 6.5) / 13)
    return _blend(smooth, x, factor)


# ---------------------------------------------------------------------------------------------------------------------
# Geometric ops: PIL's Image.transform(size, AFFINE, (a, b, c, d, e, f)), which maps output pixel centre (x + 0.5,
# y + 0.5) to input point (a x + b y + c, d x + e y + f) and fills where that point lies outside the image.

def _gather(flat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """flat [n, 3, H*W], index [n, H, W] (flat pixel index, float) -> [n, 3, H, W]."""
    n, h, w = index.shape
    return flat.gather(2, index.long().view(n, 1, h * w).expand(-1, 3, -1)).view(n, 3, h, w)


def _nearest_source(a, b, c, d, e, f, xs, ys):
    """Source pixel indices as PIL picks them: 16.16 fixed point (affine_fixed) for rotations and shears, doubles
    (ImagingScaleAffine) when b == d == 0."""
    def fix(v):
        return torch.floor(v * 65536 + 0.5)
    fixed_x = torch.floor((fix(c + a * 0.5 + b * 0.5) + fix(b) * ys + fix(a) * xs) / 65536)
    fixed_y = torch.floor((fix(f + d * 0.5 + e * 0.5) + fix(e) * ys + fix(d) * xs) / 65536)
    scaled = (b == 0) & (d == 0)
    return (torch.where(scaled, torch.floor(c + a * 0.5 + a * xs), fixed_x),
            torch.where(scaled, torch.floor(f + e * 0.5 + e * ys), fixed_y))


def _linear(v: list, d: torch.Tensor) -> torch.Tensor:
    return v[0] + (v[1] - v[0]) * d  # PIL's BILINEAR macro, in doubles


def _cubic(v: list, d: torch.Tensor) -> torch.Tensor:
    """PIL's BICUBIC macro (cubic convolution with a = -1, not resize's -0.5), same operation order, in doubles."""
    p2 = -v[0] + v[2]
    p3 = 2 * (v[0] - v[1]) + v[2] - v[3]
    p4 = -v[0] + v[1] - v[2] + v[3]
    return v[1] + d * (p2 + d * (p3 + d * p4))


def _interpolate(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, resample: int) -> torch.Tensor:
    """Separable interpolation at pixel coordinates (u, v) [n, H, W], reading edge pixels beyond the border."""
    n, _, h, w = x.shape
    kernel, offsets = (_linear, (0, 1)) if resample == BILINEAR else (_cubic, (-1, 0, 1, 2))
    flat = x.double().reshape(n, 3, h * w)
    left, top = torch.floor(u), torch.floor(v)
    dx, dy = (u - left).unsqueeze(1), (v - top).unsqueeze(1)
    cols = [(left + k).clamp_(0, w - 1) for k in offsets]
    rows = [(top + k).clamp_(0, h - 1) * w for k in offsets]
    out = kernel([kernel([_gather(flat, row + col) for col in cols], dx) for row in rows], dy)
    return out.clamp_(0, 255).floor_().float()


def _affine(x: torch.Tensor, coeffs: tuple, resample: int, fill) -> torch.Tensor:
    """coeffs: PIL's six AFFINE coefficients, each a per-sample tensor [n] or a number; fill: (r, g, b)."""
    if resample not in (NEAREST, BILINEAR, BICUBIC):
        raise ValueError(f'resample must be NEAREST, BILINEAR or BICUBIC (0, 2, 3), not {resample}')
    n, _, h, w = x.shape
    ref = next(v for v in coeffs if torch.is_tensor(v)).to(x.device, torch.float64)
    a, b, c, d, e, f = (v.to(ref).view(n, 1, 1) if torch.is_tensor(v) else torch.full_like(ref, v).view(n, 1, 1)
                        for v in coeffs)
    xs = torch.arange(w, device=x.device, dtype=torch.float64).view(1, 1, w)
    ys = torch.arange(h, device=x.device, dtype=torch.float64).view(1, h, 1)
    if resample == NEAREST:
        u, v = _nearest_source(a, b, c, d, e, f, xs, ys)
        inside = (u >= 0) & (u < w) & (v >= 0) & (v < h)
        out = _gather(x.reshape(n, 3, h * w), v.clamp(0, h - 1) * w + u.clamp(0, w - 1))
    else:
        u = a * (xs + 0.5) + b * (ys + 0.5) + c
        v = d * (xs + 0.5) + e * (ys + 0.5) + f
        inside = (u >= 0) & (u < w) & (v >= 0) & (v < h)
        out = _interpolate(x, u - 0.5, v - 0.5, resample)
    fill = torch.as_tensor(fill, dtype=x.dtype).to(x.device).view(1, 3, 1, 1)
    return torch.where(inside.unsqueeze(1), out, fill)


def _split(v):
    """Veltkamp's split of a double into two halves whose products with another split are exact."""
    c = v * 134217729.0  # 2**27 + 1
    high = c - (c - v)
    return high, v - high


def _round_15(v: torch.Tensor) -> torch.Tensor:
    """Python's round(v, 15), which rounds the exact decimal value. torch.round(v, decimals=15) rounds v * 1e15
    first and so misses near-ties (cos 45 degrees is one); here the product's rounding error is recovered exactly
    (Dekker's product)."""
    scaled = v * 1e15
    (vh, vl), (sh, sl) = _split(v), _split(1e15)
    error = ((vh * sh - scaled) + vh * sl + vl * sh) + vl * sl
    k = torch.round(scaled)
    residual = (scaled - k) + error
    k = k + (residual > 0.5).double() - (residual < -0.5).double()
    return k / torch.full_like(k, 1e15)  # a tensor divisor: a number divisor may become a reciprocal multiply


def rotate(x: torch.Tensor, degrees: torch.Tensor, resample: int, fill) -> torch.Tensor:
    """Counter-clockwise around (W/2, H/2), with the matrix PIL's Image.rotate builds (cos, sin rounded to 15
    places)."""
    h, w = x.shape[2:]
    angle = -torch.deg2rad(torch.remainder(degrees.to(x.device, torch.float64), 360))
    cos, sin = _round_15(torch.cos(angle)), _round_15(torch.sin(angle))
    c = cos * (-w / 2) + sin * (-h / 2) + w / 2
    f = -sin * (-w / 2) + cos * (-h / 2) + h / 2
    return _affine(x, (cos, sin, c, -sin, cos, f), resample, fill)


def shear_x(x: torch.Tensor, factor: torch.Tensor, resample: int, fill) -> torch.Tensor:
    return _affine(x, (1, factor, 0, 0, 1, 0), resample, fill)


def shear_y(x: torch.Tensor, factor: torch.Tensor, resample: int, fill) -> torch.Tensor:
    return _affine(x, (1, 0, 0, factor, 1, 0), resample, fill)


def translate_x_abs(x: torch.Tensor, pixels: torch.Tensor, resample: int, fill) -> torch.Tensor:
    return _affine(x, (1, 0, pixels, 0, 1, 0), resample, fill)


def translate_y_abs(x: torch.Tensor, pixels: torch.Tensor, resample: int, fill) -> torch.Tensor:
    return _affine(x, (1, 0, 0, 0, 1, pixels), resample, fill)


def translate_x_rel(x: torch.Tensor, pct: torch.Tensor, resample: int, fill) -> torch.Tensor:
    return translate_x_abs(x, pct * x.shape[3], resample, fill)


def translate_y_rel(x: torch.Tensor, pct: torch.Tensor, resample: int, fill) -> torch.Tensor:
    return translate_y_abs(x, pct * x.shape[2], resample, fill)


# ---------------------------------------------------------------------------------------------------------------------
# Dispatch

_GEOMETRIC = {'rotate': rotate, 'shear_x': shear_x, 'shear_y': shear_y,
              'translate_x_rel': translate_x_rel, 'translate_y_rel': translate_y_rel,
              'translate_x_abs': translate_x_abs, 'translate_y_abs': translate_y_abs}
_WITH_ARG = {'posterize': posterize, 'solarize': solarize, 'solarize_add': solarize_add, 'contrast': contrast,
             'color': color, 'brightness': brightness, 'sharpness': sharpness}
_NO_ARG = {'auto_contrast': auto_contrast, 'equalize': equalize, 'invert': invert}
_IS_GEOMETRIC = torch.tensor([name in _GEOMETRIC for name in OPS])


def _apply(name: str, x: torch.Tensor, arg: torch.Tensor, resample: int, fill) -> torch.Tensor:
    if name in _GEOMETRIC:
        return _GEOMETRIC[name](x, arg, resample, fill)
    if name in _WITH_ARG:
        return _WITH_ARG[name](x, arg)
    return _NO_ARG[name](x)


def apply_ops(x: torch.Tensor, layers: torch.Tensor, fill: tuple) -> torch.Tensor:
    """x: float32 [N, 3, H, W], integral values in [0, 255], on any device.
    layers: float64 host (CPU) tensor [N, L, 3]: per sample and layer (op index into OPS, the op's argument, resample
      code); the argument is the one timm's aug_fn takes after the image, 0 for ops without one; resample is only used
      by the geometric ops.
    fill: (r, g, b) ints, the fillcolor of the geometric ops.
    Returns x with each sample's layers applied in order (layer 0 first), each op's result integral in [0, 255] as
    PIL's uint8 result would be. May modify x in place."""
    n, num_layers = layers.shape[:2]
    codes, resamples = layers[..., 0].long(), layers[..., 2].long()
    geometric = _IS_GEOMETRIC[codes]
    if not torch.isin(resamples[geometric], torch.tensor([NEAREST, BILINEAR, BICUBIC])).all():
        raise ValueError('resample codes of geometric ops must be NEAREST, BILINEAR or BICUBIC (0, 2, 3)')
    # a geometric op's filters are different computations, so samples are grouped by (op, filter)
    groups = codes * 4 + torch.where(geometric, resamples, 0)
    order = torch.argsort(groups, dim=0, stable=True)
    # the arguments, which samples form each group, and fill go to the device in one copy
    host = torch.cat([layers[..., 1].T.reshape(-1), order.T.reshape(-1).double(), torch.tensor(fill).double()])
    if x.is_cuda:
        host = host.pin_memory()
    packed = host.to(x.device, non_blocking=True)
    args, samples, fill = packed[:n * num_layers], packed[n * num_layers:-3].long(), packed[-3:]
    for layer in range(num_layers):
        keys, counts = torch.unique(groups[:, layer], return_counts=True)
        starts = counts.cumsum(0) - counts
        for key, start, count in zip(keys.tolist(), starts.tolist(), counts.tolist()):
            name = OPS[key // 4]
            if name == 'identity':
                continue
            idx = samples[layer * n + start:layer * n + start + count]
            x[idx] = _apply(name, x[idx], args[layer * n + idx], key % 4, fill)
    return x


def ta_wide_op(op_name: str, magnitude: float) -> tuple:
    """torchvision's TrivialAugmentWide op (name, signed magnitude) -> (index into OPS, argument) giving the same PIL
    result; fill (0, 0, 0) matches torchvision's fill=None."""
    if op_name in ('ShearX', 'ShearY'):
        # torchvision hands F.affine the angle atan(m) in degrees; these are the coefficients it then gives PIL
        shear = math.radians(math.degrees(math.atan(magnitude)))
        if op_name == 'ShearX':
            return OPS.index('shear_x'), math.tan(shear)
        return OPS.index('shear_y'), -(math.sin(-shear) / math.cos(shear))
    if op_name in ('TranslateX', 'TranslateY'):
        # torchvision moves the content by +int(m); PIL's matrix maps output to input, hence the sign
        return OPS.index('translate_x_abs' if op_name == 'TranslateX' else 'translate_y_abs'), -int(magnitude)
    name, arg = {'Identity': ('identity', 0), 'Rotate': ('rotate', magnitude),
                 'Brightness': ('brightness', 1.0 + magnitude), 'Color': ('color', 1.0 + magnitude),
                 'Contrast': ('contrast', 1.0 + magnitude), 'Sharpness': ('sharpness', 1.0 + magnitude),
                 'Posterize': ('posterize', int(magnitude)), 'Solarize': ('solarize', magnitude),
                 'AutoContrast': ('auto_contrast', 0), 'Equalize': ('equalize', 0), 'Invert': ('invert', 0)}[op_name]
    return OPS.index(name), arg
