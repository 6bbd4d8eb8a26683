#!/usr/bin/env python
"""Evaluate a checkpoint on a validation set with the same evaluation code train.py uses.

    python validate.py --checkpoint output/rn50_130ep/model_best.pth.tar [--data-dir DIR] [--weights ema|raw|swa]

Model, class count and preprocessing come from the checkpoint (ours, or one written by timm's train.py); a plain state
dict needs --model, and --num-classes where its classifier does not tell. The dataset's class
folders must be those the checkpoint was trained on, in the same label order (--allow-other-classes: evaluate anyway).
Prints top-1, top-5, loss, images and img/s, and writes them as JSON with --results-file, with the top-1 of each class;
--per-class-csv writes the top-1 of each class as train.py's per_class.csv.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch
from timm.models import create_model, get_pretrained_cfg

import model_defs  # noqa: F401  registers resnet50_custom
from training import checkpoint, per_class
from training.config import OneLineParser, UserError, architecture_options
from training.data import classes_of, create_eval_loader, data_config, locate_dataset, open_image_folder
from training.distributed import Processes, keep_freed_cpu_memory, pick_device
from training.engine import evaluate


def positive(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError(value)
    return number


def parse_args(argv=None):
    parser = OneLineParser(prog='validate.py', description=__doc__.splitlines()[0])
    parser.add_argument('--checkpoint', required=True, help='training checkpoint or state dict file')
    parser.add_argument('--model', help='model name (default: from the checkpoint; required for a state dict)')
    parser.add_argument('--num-classes', type=int, help='class count of a state dict (default: its classifier)')
    parser.add_argument('--data-dir', help="dataset root (default: the checkpoint's, or $IMAGENET_DIR)")
    parser.add_argument('--dataset', help="dataset type (default: the checkpoint's)")
    parser.add_argument('--split', default='validation', help='split to evaluate (default: validation = val/)')
    parser.add_argument('--weights', choices=('ema', 'raw', 'swa'),
                        help='weights to evaluate (default: those that earned the checkpoint its metric)')
    parser.add_argument('--img-size', type=int, help='image size (default: the checkpoint\'s validation size)')
    parser.add_argument('--crop-pct', type=float, help='center crop fraction (default: the checkpoint\'s)')
    parser.add_argument('-b', '--batch-size', type=positive, default=128)
    parser.add_argument('-j', '--workers', type=int, default=min(4, os.cpu_count() or 1),
                        help='data loading processes (default: 4, or the CPU count when lower)')
    parser.add_argument('--device', default='auto', help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument('--amp', action=argparse.BooleanOptionalAction,
                        help="mixed precision (default: as in training)")
    parser.add_argument('--amp-dtype', choices=('bfloat16', 'float16'), help="(default: as in training)")
    parser.add_argument('--channels-last', action=argparse.BooleanOptionalAction, help="(default: as in training)")
    parser.add_argument('--eval-flip', action=argparse.BooleanOptionalAction,
                        help="average each image's logits with its horizontal flip's (default: as in training)")
    parser.add_argument('--blur-pool', action=argparse.BooleanOptionalAction,
                        help="the model's BlurPool option (default: the checkpoint's; a state dict does not tell, and "
                             'loads either way)')
    parser.add_argument('--attn-layer', choices=('se', 'none'),
                        help="the model's attention blocks (attn_layer; default: the checkpoint's; a state dict does "
                             'not tell)')
    parser.add_argument('--decode', choices=('auto', 'cpu', 'gpu'),
                        help="where JPEGs are decoded (default: as in training; auto: the GPU on CUDA where it can)")
    parser.add_argument('--allow-other-classes', action='store_true',
                        help="evaluate even when the dataset's class folders are not the ones the checkpoint was "
                             'trained on (a warning names the first that differ)')
    parser.add_argument('--results-file', help='write the results to this JSON file, with the top-1 of each class')
    parser.add_argument('--per-class-csv', help="write the top-1 of each class to this CSV file (train.py's "
                                                'per_class.csv: class_index, class_name, images, top1, weights)')
    return parser.parse_strict(argv)


def load_model(args, state: dict):
    """The model named by the checkpoint (or --model) with the chosen weights; also returns its training config."""
    config = state.get('config') or checkpoint.timm_run_config(state.get('args'))
    name = config.get('model')
    if args.model and name and args.model != name:
        raise UserError(f'{args.checkpoint} holds {name}, not {args.model}')
    name = args.model or name
    weights_kind = args.weights or state.get('metric_weights') or ('ema' if 'state_dict_ema' in state else 'raw')
    weights = checkpoint.weights_from(state, weights_kind, args.checkpoint, '--weights raw')
    if not name:
        raise UserError(f'{args.checkpoint} is a plain state dict: pass --model')
    classifier = weights.get(f'{get_pretrained_cfg(name).classifier}.weight') if get_pretrained_cfg(name) else None
    num_classes = (args.num_classes or (state.get('data') or {}).get('classes') or config.get('num_classes') or
                   (classifier.shape[0] if classifier is not None else None))
    if num_classes is None:
        raise UserError(f'cannot tell the class count of {args.checkpoint}: pass --num-classes')
    if args.blur_pool is not None:
        config = dict(config, blur_pool=args.blur_pool)
    if args.attn_layer is not None:
        config = dict(config, attn_layer=None if args.attn_layer == 'none' else args.attn_layer)
    try:
        model = create_model(name, num_classes=num_classes, **architecture_options(config))
    except RuntimeError as e:
        raise UserError(str(e).splitlines()[0]) from None
    except TypeError as e:  # a model without one of the options, such as blur_pool
        raise UserError(f'model {name} does not take these options: {e}') from None
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        detail = ' '.join(str(e).split())[:240]
        raise UserError(f'{args.checkpoint} does not fit {name}: {detail}') from None
    return model, weights_kind, config


def check_classes(state: dict, names: list, where: str, allow_other: bool):
    """Refuse a dataset whose class names, in label order, are not those the checkpoint was trained on: its labels
    would mean other classes (renamed or swapped folders, another dataset with as many classes)."""
    trained = (state.get('data') or {}).get('class_names')
    if not trained:
        print("validate.py: note: the checkpoint holds no class names (timm's train.py and older versions of ours save "
              'none), so only the class count is checked', file=sys.stderr)
        return
    if (not names) or (names == trained):
        return
    differing = [(i, a, b) for i, (a, b) in enumerate(zip(trained, names)) if a != b]
    example = '; '.join(f'label {i}: {a!r} in training, {b!r} here' for i, a, b in differing[:3])
    problem = (f'{where} holds other classes than the checkpoint was trained on: {len(differing)} of {len(trained)} '
               f'labels differ ({example})')
    if not allow_other:
        raise UserError(f'{problem}; pass --allow-other-classes to evaluate anyway')
    print(f'validate.py: warning: {problem}; evaluating anyway (--allow-other-classes)', file=sys.stderr)


def check_writable(path: str, option: str):
    """Refuse an output file that cannot be written before the evaluation rather than after it."""
    folder = Path(path).parent
    if Path(path).is_dir():
        raise UserError(f'{option} {path} is a directory, not a file')
    if not folder.is_dir():
        raise UserError(f'{option} {path}: no folder {folder}')
    if not os.access(folder, os.W_OK):
        raise UserError(f'{option} {path}: folder {folder} is not writable')


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        return validate(args)
    except UserError as e:
        print(f'validate.py: error: {e}', file=sys.stderr)
        return 2


def validate(args) -> int:
    for path, option in ((args.results_file, '--results-file'), (args.per_class_csv, '--per-class-csv')):
        if path:
            check_writable(path, option)
    state = checkpoint.load(args.checkpoint)
    model, weights_kind, config = load_model(args, state)
    device = pick_device(args.device)
    keep_freed_cpu_memory(device)
    procs = Processes(0, 1, 0, device)

    dataset_kind = args.dataset if args.dataset is not None else config.get('dataset', '')
    root, dataset_kind = locate_dataset(args.data_dir or config.get('data_dir'), dataset_kind)
    dataset = open_image_folder(root, args.split, dataset_kind)
    names = classes_of(dataset)
    if names and (len(names) != model.num_classes):
        raise UserError(f'{root} {args.split} has {len(names)} class folders but the model predicts '
                        f'{model.num_classes} classes')
    check_classes(state, names, f'{root} {args.split}', args.allow_other_classes)

    img_size = args.img_size or config.get('val_img_size') or config.get('img_size')
    data_cfg = data_config(config, model, img_size, args.crop_pct)
    decode = args.decode or config.get('decode', 'cpu')

    # numerics as in training unless told otherwise, so that the numbers match the ones it logged
    channels_last = config.get('channels_last', False) if args.channels_last is None else args.channels_last
    amp = config.get('amp', False) if args.amp is None else args.amp
    amp_dtype = getattr(torch, args.amp_dtype or config.get('amp_dtype', 'bfloat16')) if amp else None
    eval_flip = config.get('eval_flip', False) if args.eval_flip is None else args.eval_flip
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    with create_eval_loader(dataset, data_cfg, args.batch_size, args.workers, device, decode=decode) as loader:
        results, = evaluate([model], loader, procs, amp_dtype, channels_last, eval_flip=eval_flip,
                            num_classes=model.num_classes)
    classes = per_class.class_rows(results, names or [''] * model.num_classes, weights_kind)
    del results['class_images'], results['class_hits']  # the JSON has them as per_class
    results.update(checkpoint=str(args.checkpoint), model=getattr(model, 'pretrained_cfg', {}).get('architecture'),
                   weights=weights_kind, img_size=data_cfg['input_size'][-1], crop_pct=data_cfg['crop_pct'],
                   eval_flip=eval_flip, blur_pool=bool(config.get('blur_pool')), data=str(root), split=args.split,
                   decode=decode, per_class=[{k: v for k, v in row.items() if k != 'weights'} for row in classes])
    print(f"{results['model']} ({weights_kind} weights) on {results['images']} images of {root} {args.split}: "
          f"top-1 {results['top1']:.3f}  top-5 {results['top5']:.3f}  loss {results['loss']:.4f}  "
          f"{results['img_per_sec']:.0f} img/s")
    if args.results_file:
        Path(args.results_file).write_text(json.dumps(results, indent=2) + '\n')
    if args.per_class_csv:
        per_class.write_csv(Path(args.per_class_csv), classes)
    return 0


if __name__ == '__main__':
    sys.exit(main())
