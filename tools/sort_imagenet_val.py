#!/usr/bin/env python
"""Sort ImageNet's flat validation folder into val/<synset>/ class folders, as training and validation expect.

    python tools/sort_imagenet_val.py data/imagenet/val LOC_val_solution.csv
    python tools/sort_imagenet_val.py data/imagenet/val imagenet_2012_validation_synset_labels.txt

LABELS is either Kaggle's LOC_val_solution.csv (ImageId,PredictionString: the synset comes first) or a text file of
50,000 synsets, one per line, in the order of the files ILSVRC2012_val_00000001.JPEG ... 00050000.JPEG.
"""
import argparse
import csv
import sys
from pathlib import Path


def read_labels(path: Path) -> dict:
    """{file name: synset} from either label format."""
    with open(path, newline='') as f:
        first = f.readline()
        f.seek(0)
        if first.startswith('ImageId'):
            return {f"{row['ImageId']}.JPEG": row['PredictionString'].split()[0] for row in csv.DictReader(f)}
        synsets = [line.strip() for line in f if line.strip()]
    return {f'ILSVRC2012_val_{i:08d}.JPEG': synset for i, synset in enumerate(synsets, start=1)}


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
    moved = sort_folder(args.val_dir, read_labels(args.labels))
    classes = sum(1 for p in args.val_dir.iterdir() if p.is_dir())
    print(f'moved {moved} images into {classes} class folders under {args.val_dir}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
