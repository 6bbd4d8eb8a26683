"""Built-in data: an ImageFolder tree of procedurally drawn JPEGs, so the loop runs with no download.

Ten classes, five shapes and five textures, each image with random colours, size, position and background noise.
The same seed gives the same files, byte for byte.
"""
import argparse
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ('circle', 'square', 'triangle', 'ring', 'cross',
           'hstripes', 'vstripes', 'checker', 'dots', 'diagonal')
SPLITS = {'train': 0, 'val': 1}


def _colours(rng: np.random.Generator) -> tuple:
    """A background and a foreground colour that differ clearly in brightness."""
    while True:
        bg, fg = rng.integers(0, 256, size=(2, 3))
        if abs(int(bg.mean()) - int(fg.mean())) > 60:
            return tuple(int(c) for c in bg), tuple(int(c) for c in fg)


def _draw_shape(draw: ImageDraw.ImageDraw, name: str, size: int, fg: tuple, bg: tuple, rng: np.random.Generator):
    r = rng.uniform(0.28, 0.45) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    box = (cx - r, cy - r, cx + r, cy + r)
    if name == 'circle':
        draw.ellipse(box, fill=fg)
    elif name == 'square':
        draw.rectangle(box, fill=fg)
    elif name == 'triangle':
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    elif name == 'ring':
        draw.ellipse(box, fill=fg)
        inner = r * 0.55
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=bg)
    elif name == 'cross':
        w = r * 0.35
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fg)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fg)


def _texture(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A boolean foreground mask of a periodic texture with random period and phase."""
    period = rng.uniform(0.28, 0.42) * size
    phase = rng.uniform(0, period)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    if name == 'hstripes':
        return ((y + phase) % period) < period / 2
    if name == 'vstripes':
        return ((x + phase) % period) < period / 2
    if name == 'diagonal':
        return ((x + y + phase) % period) < period / 2
    if name == 'checker':
        return (((x + phase) // (period / 2) + (y + phase) // (period / 2)) % 2) == 0
    # dots: discs on a grid
    dx = (x + phase) % period - period / 2
    dy = (y + phase) % period - period / 2
    return dx * dx + dy * dy < (period * 0.3) ** 2


def draw_image(class_idx: int, size: int, rng: np.random.Generator) -> Image.Image:
    name = CLASSES[class_idx]
    bg, fg = _colours(rng)
    if class_idx < 5:
        img = Image.new('RGB', (size, size), bg)
        _draw_shape(ImageDraw.Draw(img), name, size, fg, bg, rng)
        pixels = np.asarray(img, dtype=np.float32)
    else:
        mask = _texture(name, size, rng)[..., None]
        pixels = np.where(mask, np.float32(fg), np.float32(bg))
    pixels = pixels + rng.normal(0, 12, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def generate(root, seed: int = 0, train_per_class: int = 300, val_per_class: int = 50, image_size: int = 64) -> Path:
    """Write root/{train,val}/<class>/<n>.jpg. The tree appears at once, complete, or not at all."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f'.{root.name}-', dir=root.parent))
    try:
        for split, count in (('train', train_per_class), ('val', val_per_class)):
            for class_idx, name in enumerate(CLASSES):
                folder = staging / split / name
                folder.mkdir(parents=True)
                for i in range(count):
                    rng = np.random.default_rng([seed, SPLITS[split], class_idx, i])
                    draw_image(class_idx, image_size, rng).save(folder / f'{i:05d}.jpg', quality=90)
        os.replace(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('root', help='folder to create')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--train-per-class', type=int, default=300)
    parser.add_argument('--val-per-class', type=int, default=50)
    parser.add_argument('--image-size', type=int, default=64)
    args = parser.parse_args()
    generate(args.root, args.seed, args.train_per_class, args.val_per_class, args.image_size)
    print(f'wrote {args.root}')


if __name__ == '__main__':
    main()
