"""Colour on the device: timm's ColorJitter (torchvision's, per image in its own random order) and normalisation.

Colour jitter keeps torchvision's random order of brightness, contrast, saturation and hue per image (four passes,
each over the images whose k-th operation is that one): the augmentation distribution stays the CPU path's, for about
the cost of one full-batch pass per operation. The operations follow torchvision's tensor versions on floats.
"""
import torch

from .device_params import BRIGHTNESS, CONTRAST, FACTORS, HUE, ORDER, SATURATION, to_device

GRAY = (0.299, 0.587, 0.114)  # PIL's L conversion, which the CPU path's contrast and saturation use


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
