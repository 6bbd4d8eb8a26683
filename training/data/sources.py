"""Where the images come from and what identifies them: folders of class folders (or timm's named datasets), the
built-in shapes, the manifest of a prepared ImageNet, and the fingerprint a checkpoint records of the data."""
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.utils.data
from PIL import Image
from timm.data import create_dataset, create_reader
from torchvision import transforms

from .. import builtin_data
from ..config import UserError
from .bad_images import BadImages, first_readable
from .files import decode_rgb, open_image
from .sampling import seed_sample

_logger = logging.getLogger(__name__)

BUILTIN_ROOT = Path('data/shapes')


class DecodeRGB:
    """Full-size decoding to RGB, as the first step of a transform that expects decoded images."""
    takes_opened_image = True

    def __call__(self, img: Image.Image) -> Image.Image:
        return decode_rgb(img)

    def __repr__(self) -> str:
        return f'{self.__class__.__name__}()'


def decoding_first(transform: Optional[Callable]) -> Callable:
    """`transform`, preceded by full-size RGB decoding unless its first step decodes an opened image itself."""
    if transform is None:
        return DecodeRGB()
    first = transform.transforms[0] if isinstance(transform, transforms.Compose) else transform
    if getattr(first, 'takes_opened_image', False):
        return transform
    return transforms.Compose([DecodeRGB(), transform])


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


def split_folder(root: Path, split: str) -> Path:
    """The folder of a split, as timm's create_dataset finds it ('validation' also finds val/)."""
    names = {'train': ('train', 'training'), 'validation': ('val', 'validation', 'valid'),
             'val': ('val', 'validation', 'valid')}.get(split, (split,))
    for name in names:
        if (root / name).is_dir():
            return root / name
    return root / names[0]


def open_image_folder(root: Path, split: str, dataset: str = ''):
    """One split: a LazyImageFolder for a folder of class folders, timm's dataset for a named one, with one-line
    errors for the usual layout mistakes."""
    if dataset:
        try:
            return create_dataset(dataset, root=str(root), split=split)
        except Exception as e:
            raise UserError(f'cannot open dataset {dataset!r} at {root}: {e}') from None
    folder = split_folder(root, split)
    if not folder.is_dir():
        raise UserError(f'no {split} split at {folder}: expected {folder}/<class>/<image>.JPEG')
    try:
        ds = LazyImageFolder(str(folder))
    except RuntimeError:  # timm's folder reader found no image files
        raise UserError(f'no images found under {folder}') from None
    classes = classes_of(ds)
    if '' in classes or '.' in classes:
        raise UserError(f'{folder} holds images but no class folders: expected {folder}/<class>/<image>.JPEG '
                        '(ImageNet\'s flat val folder must be sorted first, see docs/data.md)')
    return ds


def classes_of(dataset) -> list:
    reader = getattr(dataset, 'reader', None)
    if reader is not None and hasattr(reader, 'class_to_idx'):
        return list(reader.class_to_idx)
    return list(getattr(dataset, 'classes', []))


def locate_dataset(data_dir: Optional[str], dataset: str) -> tuple:
    """(root, timm dataset name) of a run's data; the one place that knows `dataset: builtin`.

    The built-in shapes are generated at data/shapes on first use. A --data-dir is never filled with them: a
    mistyped ImageNet path must fail, not train on shapes.
    """
    if dataset != 'builtin':
        return Path(data_dir or os.environ.get('IMAGENET_DIR') or 'data/imagenet'), dataset
    if data_dir:
        return Path(data_dir), ''
    if not BUILTIN_ROOT.exists():
        _logger.info(f'Generating the built-in shapes dataset in {BUILTIN_ROOT}')
        builtin_data.generate(BUILTIN_ROOT, seed=0)
    return BUILTIN_ROOT, ''


@dataclass(frozen=True)
class Datasets:
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    num_classes: int
    fingerprint: dict  # what a checkpoint records of the data: image and class counts, class names, manifest


def open_datasets(root: Path, dataset: str, train_split: str, val_split: str,
                  num_classes: Optional[int]) -> Datasets:
    """The training and validation datasets of a run, checked against each other and num_classes."""
    if not dataset and not root.is_dir():
        raise UserError(f'no dataset at {root} (set --data-dir or IMAGENET_DIR): expected '
                        f'{root}/train/<synset>/*.JPEG and {root}/val/<synset>/*.JPEG')
    train = open_image_folder(root, train_split, dataset)
    val = open_image_folder(root, val_split, dataset)
    train_classes, val_classes = classes_of(train), classes_of(val)
    if train_classes and val_classes and train_classes != val_classes:
        raise UserError(f'train has {len(train_classes)} classes and val {len(val_classes)}, or other names: '
                        'both need the same class folders')
    found = len(train_classes) or num_classes
    if num_classes and found != num_classes:
        raise UserError(f'num_classes is {num_classes} but {root} has {found} classes')
    if not found:
        raise UserError(f'cannot tell the number of classes of {dataset}: set num_classes')
    fingerprint = dict(train_images=len(train), val_images=len(val), classes=found,
                       class_names=train_classes or None, train_files=listing_sha256(train),
                       train_contents=contents_sha256(train), manifest=read_manifest(root))
    return Datasets(train, val, found, fingerprint)


def listing_sha256(dataset) -> Optional[str]:
    """sha256 of a folder dataset's (label, file) list: a swap of images between class folders changes it even when
    the class names and counts stay (ImageNet's file names carry their synset). None for other datasets."""
    reader = getattr(dataset, 'reader', None)
    samples = getattr(reader, 'samples', None)
    if samples is None:
        return None
    prefix = os.path.join(str(reader.root), '')  # the reader's paths start with its root: slicing is cheap for 1.28M
    digest = hashlib.sha256()
    for path, label in samples:
        digest.update(f'{label}\t{str(path)[len(prefix):]}\n'.encode())
    return digest.hexdigest()


def contents_sha256(dataset, per_class: int = 2, head: int = 4096) -> Optional[str]:
    """sha256 of the size and first `head` bytes of the first and last files of each class of a folder dataset: class
    folders swapped with the same file names (00000.jpg, ... in every class) change it where listing_sha256 stays.
    A few files per class, read in part: a second or less for ImageNet. None for other datasets."""
    samples = folder_samples(dataset)
    if samples is None:
        return None
    by_class = {}
    for path, label in samples:
        by_class.setdefault(label, []).append(path)
    digest = hashlib.sha256()
    for label in sorted(by_class):
        paths = by_class[label]
        for path in dict.fromkeys(paths[:per_class // 2] + paths[-(per_class - per_class // 2):]):
            with open(path, 'rb') as f:
                digest.update(f'{label}\t{os.path.getsize(path)}\t'.encode() + hashlib.sha256(f.read(head)).digest())
    return digest.hexdigest()


def read_manifest(root: Path) -> Optional[dict]:
    """The identity of a dataset prepared by tools/prepare_imagenet.py (counts, settings and the sha256 of its file
    listing), so that runs on different copies of ImageNet can be told apart; None for other datasets."""
    path = root / 'manifest.json'
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        splits = {name: dict(images=split['images'], classes=split['classes'], sha256=split['sha256'],
                             bad_files=len(split.get('bad_files', [])))
                  for name, split in manifest['splits'].items()}
        return dict(sha256=manifest['sha256'], imagenet=manifest['imagenet'], images=manifest['images'],
                    settings=manifest['settings'], splits=splits)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f'{path} is not a manifest of tools/prepare_imagenet.py ({type(e).__name__}: {e})') from None


def folder_samples(dataset) -> Optional[list]:
    """(path, label) pairs of a folder dataset; None for a named one."""
    return getattr(getattr(dataset, 'reader', None), 'samples', None)


def image_samples(dataset) -> list:
    """(path, label) pairs of a folder dataset, for loaders that read the files themselves (decode: gpu)."""
    samples = folder_samples(dataset)
    if samples is None:
        raise UserError('decode: gpu reads image files: it needs a folder of class folders, not a named dataset')
    return samples
