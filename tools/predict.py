#!/usr/bin/env python
"""Top-k classes of images with a trained checkpoint or a folder written by tools/export.py.

    python tools/predict.py --checkpoint output/rn50_130ep/model_best.pth.tar photo.jpg photos/ [--top-k 5]
                            [--weights ema|raw|swa] [--json predictions.json]

Model, weights and preprocessing (size, crop, interpolation, mean, std) come from the checkpoint as validate.py takes
them. Classes are named by ImageNet's synset table (shipped with timm) for ImageNet-1k checkpoints, by the class
folders the run trained on otherwise. Folders are searched recursively for image files; images that cannot be read are
listed, one line each, and skipped, as are images above PIL's decompression-bomb limit (89 megapixels), which are not
decoded. Exit code 2 when no image could be classified.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from timm.data import ImageNetInfo, get_img_extensions, infer_imagenet_subset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import model_defs  # noqa: E402,F401  registers resnet50_custom
import validate  # noqa: E402
from demo.classifier import Classifier, top_k_lines  # noqa: E402
from training import checkpoint  # noqa: E402
from training.config import OneLineParser, UserError  # noqa: E402
from training.data import REASONS, BadImage, data_config, open_rgb  # noqa: E402
from training.distributed import pick_device  # noqa: E402


def parse_args(argv=None):
    parser = OneLineParser(prog='predict.py', description=__doc__.splitlines()[0])
    parser.add_argument('images', nargs='+', metavar='IMAGE_OR_FOLDER', help='image files and folders of them')
    parser.add_argument('--checkpoint', required=True, help='training checkpoint, state dict, or export folder')
    parser.add_argument('--top-k', type=validate.positive, default=5, help='classes shown per image (default: 5)')
    parser.add_argument('--weights', choices=('ema', 'raw', 'swa'),
                        help='weights of a checkpoint (default: those that earned the checkpoint its metric)')
    parser.add_argument('--model', help='model name of a plain state dict')
    parser.add_argument('--num-classes', type=int, help='class count of a plain state dict (default: its classifier)')
    parser.add_argument('-b', '--batch-size', type=validate.positive, default=32)
    parser.add_argument('--device', default='cpu', help="'cpu', 'auto', 'cuda' or 'cuda:N' (default: cpu)")
    parser.add_argument('--json', help='also write the predictions to this JSON file')
    return parser.parse_strict(argv)


def labels_of(state: dict, num_classes: int) -> tuple:
    """(label names, descriptions or None) of a checkpoint: ImageNet's synsets and their lemmas for an ImageNet
    model, the class folder names otherwise (their indices for checkpoints that did not record them)."""
    trained = (state.get('data') or {}).get('class_names')
    subset = infer_imagenet_subset({'num_classes': num_classes})
    if subset:
        info = ImageNetInfo(subset)
        # a dataset of as many classes that is not ImageNet keeps its own names
        if (trained is None) or (list(trained) == info.label_names()):
            return list(info.label_names()), info.label_descriptions(as_dict=True)
    return (list(trained) if trained else [str(i) for i in range(num_classes)]), None


def checkpoint_classifier(path, weights=None, model_name=None, num_classes=None,
                          device=torch.device('cpu')) -> tuple:
    """(Classifier, checkpoint contents, weights kind) of a checkpoint, its model built as validate.py builds it."""
    state = checkpoint.load(path)
    if ('state_dict' not in state) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f'{path} is neither a checkpoint of train.py nor a state dict (no state_dict, no tensors)')
    args = argparse.Namespace(checkpoint=path, weights=weights, model=model_name, num_classes=num_classes,
                              blur_pool=None, attn_layer=None)  # the checkpoint's
    model, weights_kind, config = validate.load_model(args, state)
    data_cfg = data_config(config, model, config.get('val_img_size') or config.get('img_size'))
    names, descriptions = labels_of(state, model.num_classes)
    return Classifier(model, data_cfg, names, descriptions, device), state, weights_kind


def load_classifier(args) -> Classifier:
    path = Path(args.checkpoint)
    device = pick_device(args.device)
    if path.is_dir():
        if not (path / 'config.json').is_file():
            raise UserError(f'{path} is a folder but not one written by tools/export.py (no config.json)')
        return Classifier.from_export(path, device)
    return checkpoint_classifier(path, args.weights, args.model, args.num_classes, device)[0]


def image_files(inputs: list) -> tuple:
    """(image files to classify, [(input, reason)] for inputs that give none). Folders are searched recursively
    for files with an image extension; a file named on the command line is tried whatever its extension."""
    extensions = set(get_img_extensions())
    files, problems = [], []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob('*') if p.suffix.lower() in extensions and p.is_file())
            files += found
            if not found:
                problems.append((item, f"no image files ({', '.join(sorted(extensions))}) in this folder"))
        elif item.is_file():
            files.append(item)
        else:
            problems.append((item, 'not found'))
    return files, problems


def report_bad(path, reason: str):
    print(f'predict.py: skipped {path}: {reason}', file=sys.stderr)


def predict(classifier: Classifier, files: list, top_k: int, batch_size: int) -> list:
    """[{path, topk}] of the files that decode, in batches; the others are reported and skipped."""
    results = []
    for start in range(0, len(files), batch_size):
        images, paths = [], []
        for path in files[start:start + batch_size]:
            try:
                images.append(open_rgb(str(path)))
                paths.append(str(path))
            except BadImage as e:
                report_bad(path, REASONS[e.reason])
        if images:
            results += [dict(path=p, topk=top) for p, top in zip(paths, classifier.top_k(images, top_k))]
    return results


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        files, problems = image_files(args.images)
        for item, reason in problems:
            report_bad(item, reason)
        if not files:
            return 2
        results = predict(load_classifier(args), files, args.top_k, args.batch_size)
    except UserError as e:
        print(f'predict.py: error: {e}', file=sys.stderr)
        return 2
    for result in results:
        print(result['path'])
        for line in top_k_lines(result['topk']):
            print(f'  {line}')
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + '\n')
    return 0 if results else 2


if __name__ == '__main__':
    sys.exit(main())
