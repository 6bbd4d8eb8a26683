#!/usr/bin/env python
"""Sort ImageNet's flat validation folder into val/<synset>/ class folders, as training and validation expect.

    python tools/sort_imagenet_val.py data/imagenet/val LOC_val_solution.csv
    python tools/sort_imagenet_val.py data/imagenet/val imagenet_2012_validation_synset_labels.txt

LABELS is either Kaggle's LOC_val_solution.csv (ImageId,PredictionString: the synset comes first) or a text file of
50,000 synsets, one per line, in the order of the files ILSVRC2012_val_00000001.JPEG ... 00050000.JPEG.
tools/prepare_imagenet.py reads the same labels to write the sorted tree straight from ILSVRC2012_img_val.tar.
"""
import argparse
import csv
import io
import re
import sys
from pathlib import Path

SYNSET = re.compile(r'n\d{8}')
FORMATS = 'expected LOC_val_solution.csv or a list of synsets (n01440764 ...), one per line'


def read_labels(path: Path) -> dict:
    """{file name: synset} from either label format; ValueError says what is wrong with the file."""
    try:
        text = path.read_text(encoding='utf-8-sig')  # a BOM, as spreadsheet programs write, is not part of the header
    except UnicodeDecodeError:
        raise ValueError(f'{path} is not a text file: {FORMATS}') from None
    if text.startswith('ImageId'):
        return _read_kaggle_csv(path, text)
    synsets = [line.strip() for line in text.splitlines() if line.strip()]
    if synsets and all(s.isdigit() for s in synsets):
        raise ValueError(f"{path} holds class numbers (the devkit's ILSVRC2012_validation_ground_truth.txt?): their "
                         f"synsets are in the devkit's meta.mat, which we do not read; {FORMATS}")
    wrong = next((i for i, synset in enumerate(synsets, start=1) if not SYNSET.fullmatch(synset)), None)
    if not synsets or wrong:
        where = f'entry {wrong} is {synsets[wrong - 1]!r}' if wrong else 'it is empty'
        raise ValueError(f'{path}: {where}: {FORMATS}')
    return {f'ILSVRC2012_val_{i:08d}.JPEG': synset for i, synset in enumerate(synsets, start=1)}


def _read_kaggle_csv(path: Path, text: str) -> dict:
    """A row repeated with the same synset labels its image all the same; with another synset the image's class would
    depend on the order of the rows of a damaged or merged file: refused."""
    labels, first_line = {}, {}
    for line, row in enumerate(csv.DictReader(io.StringIO(text, newline='')), start=2):
        synset = (row.get('PredictionString') or '').split()[:1]
        if not row.get('ImageId') or not synset or not SYNSET.fullmatch(synset[0]):
            raise ValueError(f'{path} line {line}: expected ImageId,PredictionString with the synset first')
        name = f"{row['ImageId']}.JPEG"
        if labels.setdefault(name, synset[0]) != synset[0]:
            raise ValueError(f"{path} line {line}: {row['ImageId']} is labelled {synset[0]}, and {labels[name]} on "
                             f'line {first_line[name]}: one synset per image; damaged labels file?')
        first_line.setdefault(name, line)
    return labels


def sort_folder(val_dir: Path, labels: dict) -> int:
    """Move each labelled image of val_dir into val_dir/<synset>/; returns the number moved."""
    images = sorted(p for p in val_dir.iterdir() if p.is_file() and p.suffix.lower() in ('.jpeg', '.jpg'))
    unlabelled = [p.name for p in images if p.name not in labels]
    if unlabelled:
        raise SystemExit(f'error: {len(unlabelled)} images have no label, e.g. {unlabelled[0]}: wrong labels file?')
    for image in images:
        folder = val_dir / labels[image.name]
        folder.mkdir(exist_ok=True)
        image.rename(folder / image.name)
    return len(images)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('val_dir', type=Path, help='the flat validation folder')
    parser.add_argument('labels', type=Path, help="LOC_val_solution.csv or a list of 50,000 synsets")
    args = parser.parse_args(argv)
    for path in (args.val_dir, args.labels):
        if not path.exists():
            raise SystemExit(f'error: not found: {path}')
    try:
        labels = read_labels(args.labels)
    except ValueError as e:
        raise SystemExit(f'error: {e}') from None
    moved = sort_folder(args.val_dir, labels)
    classes = sum(1 for p in args.val_dir.iterdir() if p.is_dir())
    print(f'moved {moved} images into {classes} class folders under {args.val_dir}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
