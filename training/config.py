"""Recipe configuration: the option schema, YAML + command line parsing and validation, save and replay.

A recipe is a YAML file whose keys are option names. Values resolve as defaults < recipe < command line, every
value is converted to its option's type, and an unknown key or flag stops the run with the closest known name.
"""
import argparse
import difflib
import math
import os
import re
import shlex
import sys
from collections.abc import Hashable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import yaml


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


# value converters: each takes a YAML or command line value and returns it typed, or raises ValueError

def number(value) -> float:
    # PyYAML reads 1e-4 (no dot) as a string; accept it as the number it means
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError('expected a number')
    try:
        result = float(value)
    except ValueError:
        raise ValueError('expected a number') from None
    if not math.isfinite(result):
        raise ValueError('expected a finite number')
    return result


def integer(value) -> int:
    if isinstance(value, bool):
        raise ValueError('expected an integer')
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError('expected an integer')
        return int(value)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError('expected an integer') from None


def text(value) -> str:
    if isinstance(value, (list, dict)):
        raise ValueError('expected a string')
    return str(value)


def flag(value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ('true', 'yes', '1', 'false', 'no', '0'):
        return value.lower() in ('true', 'yes', '1')
    raise ValueError('expected true or false')


def listof(convert: Callable, lengths: Optional[tuple] = None) -> Callable:
    def convert_list(value) -> list:
        values = value if isinstance(value, (list, tuple)) else [value]
        if lengths and len(values) not in lengths:
            raise ValueError(f"expected {' or '.join(map(str, lengths))} values, got {len(values)}")
        return [convert(v) for v in values]
    convert_list.__name__ = f'list of {convert.__name__}'
    return convert_list


def number_or_list(value):
    """Colour jitter: one strength for brightness, contrast and saturation, or 3-4 values (the 4th is hue)."""
    if isinstance(value, (list, tuple)) and len(value) != 1:
        return listof(number, (3, 4))(value)
    return number(value[0] if isinstance(value, (list, tuple)) else value)


def _limited(convert: Callable, ok: Callable, requirement: str) -> Callable:
    def convert_limited(value):
        result = convert(value)
        if not ok(result):
            raise ValueError(f'expected {requirement}')
        return result
    convert_limited.__name__ = convert.__name__
    return convert_limited


def positive(convert: Callable) -> Callable:
    return _limited(convert, lambda v: v > 0, f'a positive {convert.__name__}')


def non_negative(convert: Callable) -> Callable:
    article = 'an' if convert.__name__[0] in 'aeiou' else 'a'
    return _limited(convert, lambda v: v >= 0, f'{article} {convert.__name__} of 0 or more')


fraction = _limited(number, lambda v: 0.0 <= v <= 1.0, 'a number between 0 and 1')
decay = _limited(number, lambda v: 0.0 <= v < 1.0, 'a number in [0, 1)')


def log_model(value) -> str:
    """wandb_log_model: YAML's false (a bool) or the word."""
    if (value is False) or (isinstance(value, str) and value.lower() in ('false', 'no', 'off')):
        return 'false'
    if isinstance(value, str) and value.lower() in ('best', 'end'):
        return value.lower()
    raise ValueError('expected false, best or end')


def eval_interpolation(value) -> str:
    # timm's 'random' picks a mode per training image; an evaluation transform needs one mode
    value = text(value)
    if value == 'random':
        raise ValueError('expected bilinear, bicubic or nearest (random is for training only: set '
                         'train_interpolation to random)')
    return value


@dataclass(frozen=True)
class Option:
    name: str  # YAML key and argparse destination
    default: Any
    convert: Callable
    help: str
    flags: tuple = ()  # short flags besides --name-with-dashes
    choices: Optional[tuple] = None
    optional: bool = False  # None (YAML null, 'none' on the command line) is a valid value
    role: str = 'experiment'  # EXPERIMENT: changing it changes results; RUN: how or where it runs; ACTION
    group: str = ''  # --help section, set by _grouped() from the title above it in OPTIONS

    @property
    def flag(self) -> str:
        return '--' + self.name.replace('_', '-')


EXPERIMENT, RUN, ACTION = 'experiment', 'run', 'action'


def _grouped(*items) -> tuple:
    """Options in schema order, each in the --help group of the title (a string) that precedes it."""
    group, options = None, []
    for item in items:
        if isinstance(item, str):
            group = item
        else:
            options.append(replace(item, group=group))
    return tuple(options)


# auto_augment's one value that is not a timm string: torchvision's TrivialAugmentWide, named as torchvision's
# references name it (train.py --auto-augment ta_wide)
TA_WIDE = 'ta_wide'

OPTIONS = _grouped(
    'data',
    Option('data_dir', None, text, 'dataset root holding train/ and val/ (default: $IMAGENET_DIR, else data/imagenet)',
           optional=True, role=RUN),
    Option('dataset', '', text, "dataset type: '' for class folders, 'builtin' for the generated shapes, "
                                "or a timm dataset name such as 'torch/cifar10'"),
    Option('train_split', 'train', text, 'training split'),
    Option('val_split', 'validation', text, "validation split ('validation' finds a val/ folder)"),
    Option('num_classes', None, positive(integer), 'number of classes (default: the number of class folders)',
           optional=True),
    'model',
    Option('model', 'resnet50_custom', text, 'timm model name'),
    Option('drop_rate', 0.0, fraction, 'dropout before the classifier'),
    Option('drop_path_rate', 0.0, fraction, 'stochastic depth rate of the last block (rises linearly from 0)'),
    Option('zero_init_last', True, flag, "zero-init each block's last BN gamma"),
    Option('blur_pool', False, flag, 'BlurPool anti-aliasing: blur the inputs of the strided convs (resnet50_custom, '
           "FFCV's placement; adds no parameters)"),
    Option('attn_layer', None, text, "channel attention in each block: 'se' for Squeeze-and-Excitation after the "
           "last BN, before the residual add (resnet50_custom; timm's seresnet50 layout)", optional=True,
           choices=('se',)),
    Option('initial_checkpoint', None, text, 'start a new schedule from the weights of this checkpoint',
           optional=True),
    Option('initial_weights', 'ema', text, 'which weights --initial-checkpoint provides',
           choices=('ema', 'raw', 'swa')),
    'input size and preprocessing',  # defaults from the model's pretrained cfg
    Option('img_size', None, positive(integer), 'training image size (default: the model default, 224)',
           optional=True),
    Option('img_size_start', None, positive(integer), 'progressive resizing (FFCV): training image size up to epoch '
           'resize_epochs[0], ramping linearly to img_size at resize_epochs[1] in multiples of 32. With torchcompile '
           'the model compiles twice: for the first size, then at the second with the size dynamic (torch\'s '
           'automatic dynamic shapes), which serves the later sizes', optional=True),
    Option('resize_epochs', None, listof(non_negative(number), (2,)), 'progressive resizing: [start, end] epochs of '
           'the ramp from img_size_start to img_size', optional=True),
    Option('val_img_size', None, positive(integer), 'validation image size (default: img_size)', optional=True),
    Option('crop_pct', None, positive(number), 'validation center crop fraction (default: the model default, 0.875)',
           optional=True),
    Option('interpolation', None, eval_interpolation, 'resize interpolation of evaluation, and of training unless '
           'train_interpolation is set (default: the model default, bilinear)',
           optional=True, choices=('bilinear', 'bicubic', 'nearest')),
    Option('train_interpolation', None, text, "training resize interpolation; 'random' picks bilinear or bicubic per "
           'image (default: interpolation)', optional=True, choices=('bilinear', 'bicubic', 'nearest', 'random')),
    Option('decode', 'auto', text, "where JPEGs are decoded and augmented: 'cpu' (loader workers, timm's transforms), "
           "'gpu' (workers read bytes, the training device decodes and augments the batch), or 'auto': gpu on CUDA "
           "where it runs the settings, else cpu; a resumed run keeps its checkpoint's choice",
           choices=('auto', 'cpu', 'gpu'), role=RUN),
    Option('gpu_decoder', 'torchvision', text, "decode: gpu on CUDA: 'torchvision' (nvjpeg) or 'nvimgcodec' "
           "(nvImageCodec, pip nvidia-nvimgcodec-cu13: its hardware JPEG decoders where the GPU and the host expose "
           "them; on our H200 it was slower, see docs/input-pipeline.md)", choices=('torchvision', 'nvimgcodec'),
           role=RUN),
    Option('cpu_decode_share', None, fraction, 'the device path: share of the training images that the loader '
           'workers decode, crop and resize instead (chosen by sample seed), to split the decoding between CPU and '
           'GPU (default: on CUDA the fastest, timed over trial steps before the first one; a resumed run keeps it)',
           optional=True, role=RUN),
    Option('jpeg_draft', True, flag, 'CPU path: decode a JPEG at reduced size (DCT scaling) when the sampled crop '
           'allows it', role=RUN),
    Option('max_bad_images', 0.001, fraction, 'share of an epoch\'s images that may be unreadable (each replaced and '
           'logged) before the run stops', role=RUN),
    Option('mean', None, listof(number, (1, 3)), 'normalisation mean (default: ImageNet)', optional=True),
    Option('std', None, listof(positive(number), (1, 3)), 'normalisation std (default: ImageNet)', optional=True),
    'augmentation and regularisation',
    Option('scale', [0.08, 1.0], listof(number, (2,)), 'RandomResizedCrop area range'),
    Option('ratio', [0.75, 4.0 / 3.0], listof(positive(number), (2,)), 'RandomResizedCrop aspect ratio range'),
    Option('hflip', 0.5, fraction, 'horizontal flip probability'),
    Option('vflip', 0.0, fraction, 'vertical flip probability'),
    Option('color_jitter', 0.4, number_or_list, 'colour jitter strength, or [brightness, contrast, saturation, hue]'),
    Option('auto_augment', None, text, "timm auto-augment string: 'rand-m9-mstd0.5-inc1' (RandAugment), "
           "'rand-n1-m10-mstd101-inc1-p1.0' (TrivialAugment-like), 'original' (AutoAugment); or 'ta_wide': "
           "torchvision's TrivialAugmentWide at the training interpolation; turns colour jitter off", optional=True),
    Option('re_prob', 0.0, fraction, 'random erasing probability'),
    Option('re_mode', 'pixel', text, 'random erasing fill', choices=('pixel', 'rand', 'const')),
    Option('re_count', 1, positive(integer), 'random erasing regions per image'),
    Option('mixup', 0.0, non_negative(number), 'Mixup alpha (0 = off)'),
    Option('cutmix', 0.0, non_negative(number), 'CutMix alpha (0 = off)'),
    Option('cutmix_minmax', None, listof(number, (2,)), 'CutMix box size range (overrides cutmix alpha)',
           optional=True),
    Option('mixup_prob', 1.0, fraction, 'probability of mixing a batch'),
    Option('mixup_switch_prob', 0.5, fraction, 'probability of CutMix instead of Mixup when both are on'),
    Option('mixup_mode', 'batch', text, 'mixing unit', choices=('batch', 'pair', 'elem')),
    Option('smoothing', 0.1, fraction, 'label smoothing'),
    Option('bce_loss', False, flag, 'binary cross-entropy loss instead of softmax cross-entropy'),
    Option('bce_target_thresh', None, fraction, "BCE loss: targets above this become 1, the others 0 (timm's "
           'target_threshold, after Mixup/CutMix and smoothing)', optional=True),
    Option('aug_repeats', 0, non_negative(integer), "repeated augmentation (timm's --aug-repeats): each sample drawn "
           'trains this many times per epoch, each copy augmented differently and on another process where there are '
           'enough; an epoch keeps its length, so it draws 1/aug_repeats of the dataset (0 or 1 = off)'),
    'optimisation and schedule',
    Option('batch_size', 128, positive(integer), 'GLOBAL batch size: images per optimizer step over all processes',
           flags=('-b',)),
    Option('lr', 0.1, positive(number), 'peak learning rate at batch_size'),
    Option('lr_scale', 'linear', text, 'how lr follows a batch_size given on the command line',
           choices=('linear', 'sqrt', 'none')),
    Option('opt', 'sgd', text, "timm optimizer: 'momentum' (SGD), 'sgd' (SGD + Nesterov), 'adamw', 'lamb', ..."),
    Option('momentum', 0.9, non_negative(number), 'SGD momentum'),
    Option('weight_decay', 1.0e-4, non_negative(number), 'weight decay (never on norm layers and biases)'),
    Option('opt_eps', None, positive(number), 'optimizer epsilon', optional=True),
    Option('opt_betas', None, listof(number, (2,)), 'optimizer betas', optional=True),
    Option('clip_grad', None, positive(number), 'gradient clipping threshold (off when null)', optional=True),
    Option('clip_mode', 'norm', text, 'gradient clipping mode', choices=('norm', 'value', 'agc')),
    # schedule: a pure function of the optimizer step
    Option('epochs', 100, positive(integer), 'epochs to train'),
    Option('sched', 'cosine', text, "learning rate schedule, updated every step; 'triangular' is FFCV's cyclic one: "
           "linear from warmup_lr to lr at warmup_epochs, then linear to min_lr at the end; 'ffcv_step' is FFCV's "
           'step one: decay_rate every decay_epochs, each decay (and the fall to 0 at the end) spread over the epoch '
           "before it, no warmup; 'onecycle' is torch's OneCycleLR (see the onecycle_ options), its own warmup",
           choices=('cosine', 'step', 'multistep', 'poly', 'constant', 'triangular', 'ffcv_step', 'onecycle')),
    Option('warmup_epochs', 0, non_negative(number), 'linear warmup length in epochs (triangular: the peak epoch)'),
    Option('warmup_lr', 1.0e-5, non_negative(number), 'learning rate at the start of warmup'),
    Option('min_lr', 0.0, non_negative(number), 'learning rate at the end of the schedule'),
    Option('decay_epochs', 30.0, positive(number), 'step schedule: epochs between decays'),
    Option('decay_milestones', [30, 60, 90], listof(non_negative(integer)), 'multistep schedule: epochs to decay at'),
    Option('decay_rate', 0.1, positive(number), 'step/multistep decay factor (poly: the power)'),
    Option('onecycle_pct_start', 0.3, fraction, "onecycle: share of the steps over which the lr rises to lr "
           "(torch's pct_start)"),
    Option('onecycle_div_factor', 25.0, positive(number), 'onecycle: the lr starts at lr / onecycle_div_factor'),
    Option('onecycle_final_div_factor', 1.0e4, positive(number), 'onecycle: the lr ends at lr / onecycle_div_factor '
           '/ onecycle_final_div_factor'),
    Option('onecycle_momentum', [0.85, 0.95], listof(fraction, (2,)), 'onecycle: [base, max] momentum (SGD\'s, or '
           'Adam\'s beta1), cycled against the lr: max at the start and end, base at the peak; null keeps the '
           'optimizer\'s', optional=True),
    Option('seed', 42, non_negative(integer), 'seed of the sample order, augmentation, Mixup, drop path and init'),
    'EMA and SWA',
    Option('model_ema', False, flag, 'keep an exponential moving average of the weights (timm ModelEmaV3)'),
    Option('model_ema_decay', 0.9998, decay, 'EMA decay per EMA update, at batch_size and model_ema_interval '
           '(a batch_size or interval given on the command line rescales it: the same horizon in images)'),
    Option('model_ema_interval', 1, positive(integer), 'update the EMA every N optimizer steps'),
    Option('swa_start_epoch', None, non_negative(integer), 'stochastic weight averaging (torch\'s AveragedModel): '
           'the equal-weight average of the weights at the end of each epoch from this one on, evaluated and saved '
           'beside raw and EMA (off when null)', optional=True),
    Option('swa_lr', None, positive(number), 'SWA: from swa_start_epoch on, the lr anneals (cosine, as torch\'s '
           'SWALR) from the schedule\'s value to this constant over swa_anneal_epochs (null: the run\'s schedule '
           'goes on)', optional=True),
    Option('swa_anneal_epochs', 1, non_negative(integer), 'SWA: epochs over which the lr anneals to swa_lr (0: at '
           'once)'),
    Option('swa_bn_batches', 64, positive(integer), 'SWA: training batches (of batch_size, the first of the epoch '
           'just trained) from which the BatchNorm statistics of the average are recomputed before each evaluation '
           '(torch\'s update_bn); at most an epoch'),
    'knowledge distillation',
    Option('kd_teacher', None, text, "teacher of a distillation: a timm model name with pretrained weights "
           "('resnet152.tv2_in1k', downloaded by timm), an export folder as 'local-dir:FOLDER', or a checkpoint of "
           'ours (its metric\'s weights); it sees each batch as the student does, after Mixup/CutMix', optional=True),
    Option('kd_weight', None, non_negative(number), "weight of the distillation loss, T^2 KL(teacher || student) "
           "(timm's distill_loss_weight; default: 1 - kd_task_weight when that is set, else 1)", optional=True),
    Option('kd_task_weight', None, non_negative(number), "weight of the task loss (the run's own: cross-entropy, "
           "BCE, soft targets) (timm's task_loss_weight; default 1; 0 for distillation alone)", optional=True),
    Option('kd_temperature', 4.0, positive(number), 'softmax temperature of the distillation loss (timm\'s default)'),
    'evaluation and checkpoints',
    Option('eval_metric', 'top1', text, 'metric that ranks checkpoints (the best of raw, EMA and SWA weights)',
           choices=('top1', 'top5', 'loss')),
    Option('eval_flip', False, flag, 'per-epoch evaluation averages the logits of each image and of its horizontal '
           'flip (FFCV\'s test-time augmentation); validate.py follows it'),
    Option('checkpoint_hist', 3, positive(integer), 'number of best epoch checkpoints to keep', role=RUN),
    Option('recovery_interval', 0, non_negative(integer), 'recovery checkpoint every N optimizer steps (0 = off)',
           role=RUN),
    Option('recovery_minutes', 15.0, non_negative(number), 'recovery checkpoint every M minutes of training (0 = off)',
           role=RUN),
    Option('validation_batch_size', None, positive(integer),
           'validation batch per process (default: training micro-batch)',
           flags=('-vb',), optional=True, role=RUN),
    'execution and distributed',  # how and where it runs, free to change when resuming
    Option('output', 'output', text, 'root of the run folders', role=RUN),
    Option('experiment', None, text, 'run folder name (default: the recipe name)', optional=True, role=RUN),
    Option('recipe', None, text, 'name of the recipe this run follows (set from -c)', optional=True, role=RUN),
    Option('device', 'auto', text, "'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'", role=RUN),
    Option('workers', 4, non_negative(integer), 'data loading processes per training process', flags=('-j',),
           role=RUN),
    Option('max_batch_per_device', None, positive(integer), 'largest micro-batch per process; more is accumulated',
           optional=True, role=RUN),
    Option('amp', False, flag, 'mixed precision', role=RUN),
    Option('amp_dtype', 'bfloat16', text, 'mixed precision type (float16 uses a grad scaler)',
           choices=('bfloat16', 'float16'), role=RUN),
    Option('channels_last', False, flag, 'channels-last memory layout', role=RUN),
    Option('torchcompile', False, flag, 'torch.compile the training model', role=RUN),
    Option('deterministic', False, flag, 'deterministic algorithms where torch has them (bit-exact repeats on CPU; on '
           'GPU some kernels, such as average pooling backward, stay non-deterministic)', role=RUN),
    Option('sync_bn', False, flag, 'synchronise BatchNorm statistics across processes'),
    Option('dist_timeout', 30.0, positive(number), 'minutes before a stalled collective aborts the job', role=RUN),
    'cost estimate (--dry-run)',
    Option('throughput', None, positive(number), 'training images per second per GPU (measure it with '
           'tools/benchmark.py)', optional=True, role=RUN),
    Option('price_per_hour', None, non_negative(number), 'price of one GPU-hour', optional=True, role=RUN),
    'logging',
    Option('log_interval', 50, positive(integer), 'optimizer steps between log lines', role=RUN),
    Option('log_wandb', False, flag, 'log to Weights & Biases', role=RUN),
    Option('wandb_log_model', 'false', log_model, "the model as a W&B artifact (model-<run id>, type model): the "
           "export of the best checkpoint (tools/export.py's folder, also written to the run folder's model/), "
           "'best': at each new best epoch, 'end': once, at the end of the run", choices=('false', 'best', 'end'),
           role=RUN),
    Option('wandb_project', 'rn50-imagenet', text, 'W&B project', role=RUN),
    Option('wandb_entity', None, text, 'W&B entity (default: your default entity)', optional=True, role=RUN),
    Option('wandb_group', None, text, 'W&B group (default: the recipe name)', optional=True, role=RUN),
    Option('wandb_name', None, text, 'W&B run name (default: the experiment)', optional=True, role=RUN),
    Option('wandb_tags', [], listof(text), 'W&B tags', role=RUN),
    'actions',  # what to do with the run folder; never saved
    Option('resume', None, text, 'resume from this checkpoint instead of the newest one in the run folder',
           optional=True, role=ACTION),
    Option('start_over', False, flag, 'delete the run in the run folder and start again', role=ACTION),
    Option('allow_config_change', False, flag, 'resume even though the experiment settings changed', role=ACTION),
    Option('dry_run', False, flag, 'print the batch layout, scaled lr and EMA decay, steps, image sizes, expected time '
           'and cost, then exit without touching the run folder (for 1 GPU, or WORLD_SIZE=N GPUs)', role=ACTION),
)
BY_NAME = {o.name: o for o in OPTIONS}


def _check_value(option: Option, value, source: str):
    if isinstance(value, list) and len(value) == 1 and str(value[0]).lower() in ('none', 'null'):
        value = None  # '--mean none' on the command line
    if value is None or (option.optional and isinstance(value, str) and value.lower() in ('none', 'null')):
        if option.optional:
            return None
        raise UserError(f'{source}: {option.name} must be set (it cannot be null)')
    try:
        value = option.convert(value)
    except ValueError as e:
        raise UserError(f'{source}: {option.name}: {e}, got {value!r}') from None
    if option.choices and value not in option.choices:
        raise UserError(f"{source}: {option.name} must be one of {', '.join(option.choices)}, got {value!r}")
    return value


# other scripts' names for our options, which no spelling distance finds
OTHER_NAMES = {'learning_rate': 'lr', 'num_workers': 'workers', 'batch': 'batch_size', 'max_epochs': 'epochs',
               'wd': 'weight_decay', 'label_smoothing': 'smoothing'}


def unknown_option(key: str, known: list, source: str) -> UserError:
    dashes = '--' if key.startswith('--') else ''
    other = OTHER_NAMES.get(key.lstrip('-').replace('-', '_'))
    if other is not None:
        close = [dashes + (other.replace('_', '-') if dashes else other)]
    else:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f'; did you mean {close[0]}?' if close else ''
    return UserError(f'{source}: unknown option {key}{hint}')


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad arguments as a UserError (one line) and accepts no abbreviated flags."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message):
        raise UserError(message)

    def parse_strict(self, argv=None) -> argparse.Namespace:
        args, unknown = self.parse_known_args(argv)
        if unknown:
            flags = [flag for action in self._actions for flag in action.option_strings]
            raise unknown_option(unknown[0].split('=')[0], flags, 'command line')
        return args


def _build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog='train.py', argument_default=argparse.SUPPRESS, usage='train.py -c RECIPE.yaml [--option VALUE ...]',
        description='Train an image classifier from a YAML recipe; command line flags override the recipe. Every '
                    'option below is also a recipe key (--weight-decay is weight_decay).')
    parser.add_argument('-c', '--config', help="recipe YAML (or a run folder's config.yaml: see its header)")
    groups = {}
    for option in OPTIONS:
        if option.group not in groups:
            groups[option.group] = parser.add_argument_group(option.group)
        default = f' (default: {option.default})' if option.default not in (None, '', []) else ''
        kwargs = dict(dest=option.name, help=option.help + default)
        if option.convert is flag:
            kwargs['action'] = argparse.BooleanOptionalAction
        elif option.convert.__name__.startswith('list') or option.convert is number_or_list:
            kwargs.update(nargs='+', metavar='V')
        else:
            kwargs['metavar'] = '{' + ','.join(option.choices) + '}' if option.choices else option.name.upper()
        groups[option.group].add_argument(option.flag, *option.flags, **kwargs)
    return parser


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        lines = {}
        for key_node, _ in node.value:
            if key_node.tag == 'tag:yaml.org,2002:merge':  # '<<' merges another mapping; its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # SafeLoader refuses it, with its own message
            line = key_node.start_mark.line + 1
            if key in lines:
                raise yaml.constructor.ConstructorError(
                    None, None, f'{key} is given twice (lines {lines[key]} and {line})', key_node.start_mark)
            lines[key] = line
        return super().construct_mapping(node, deep)


def load_yaml(path) -> dict:
    path = Path(path)
    if path.is_dir():
        hint = f'; its configuration is {path / "config.yaml"}' if (path / 'config.yaml').is_file() else ''
        raise UserError(f'recipe {path} is a directory, not a YAML file{hint}')
    if not path.is_file():
        raise UserError(f'recipe not found: {path}')
    try:
        data = yaml.load(path.read_text(), Loader=_RecipeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f' (line {mark.line + 1}, column {mark.column + 1})' if mark else ''
        problem = getattr(e, 'problem', None) or str(e).splitlines()[0]
        raise UserError(f'{path} is not valid YAML{where}: {problem}') from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f'{path} must hold a mapping of option: value')
    return data


# timm's train.py names. Its args.yaml (written into every timm run folder, and the form timm publishes hparams in)
# holds all of its ~180 options; read as a recipe, each key is ours, a timm name of ours, consumed here, or a timm
# option we do not have, accepted only at timm's default, where it changes nothing.

TIMM_RENAMED = {'aa': 'auto_augment', 'reprob': 're_prob', 'remode': 're_mode', 'recount': 're_count',
                'drop': 'drop_rate', 'drop_path': 'drop_path_rate', 'data': 'data_dir', 'kd_model_name': 'kd_teacher',
                'distill_loss_weight': 'kd_weight', 'task_loss_weight': 'kd_task_weight'}
# how timm's process ran, not what it trained: any value is accepted and ignored (apex_amp and native_amp: which AMP
# implementation timm 0.6 and older used)
TIMM_IGNORED = {'local_rank', 'no_ddp_bb', 'pin_mem', 'no_prefetcher', 'use_multi_epochs_loader', 'synchronize_step',
                'save_images', 'wandb_resume_id', 'dataset_download', 'apex_amp', 'native_amp'}
# read together into lr and lr_scale (see _timm_lr)
TIMM_LR_KEYS = {'lr_base', 'lr_base_size', 'lr_base_scale'}
# timm's defaults (timm 1.0.31, and bn_tf, jsd, aot_autograd of older versions) of the options we do not have;
# aug_repeats and bce_target_thresh are ours where OPTIONS holds them
TIMM_DEFAULTS = dict(
    bn_tf=False, jsd=False, aot_autograd=False,
    aug_repeats=0, aug_splits=0, bce_pos_weight=None, bce_sum=False, bce_target_thresh=None, bn_eps=None,
    bn_momentum=None, class_map='', color_jitter_prob=None, cooldown_epochs=0, dataset_trust_remote_code=False,
    device_modules=None, dist_bn='reduce', drop_block=None, drop_connect=None,
    epoch_repeats=0.0, fast_norm=False, fuser='', gaussian_blur_prob=None, gp=None, grad_accum_steps=1,
    grad_checkpointing=False, grayscale_prob=None, head_init_bias=None, head_init_scale=None, in_chans=None,
    input_img_mode=None, input_key=None, jsd_loss=False, kd_distill_type='logit', kd_loss_type='kl',
    kd_student_feature_dim=None, kd_teacher_feature_dim=None,
    kd_token_distill_type='soft', layer_decay=None, layer_decay_min_scale=0, layer_decay_no_opt_scale=None,
    lr_cycle_decay=0.5, lr_cycle_limit=1, lr_cycle_mul=1.0, lr_k_decay=1.0, lr_noise=None, lr_noise_pct=0.67,
    lr_noise_std=1.0, mixup_off_epoch=0, model_dtype=None, model_ema_force_cpu=False, model_ema_warmup=False,
    model_kwargs={}, naflex_loader=False, naflex_loss_scale='linear', naflex_max_seq_len=576,
    naflex_patch_size_probs=None, naflex_patch_sizes=None, naflex_patchify_channels_first=False,
    naflex_train_seq_lens=[128, 256, 576, 784, 1024], no_aug=False, no_resume_opt=False, opt_kwargs={},
    patience_epochs=10, pretrained=False, pretrained_path=None, resplit=False, sched_on_updates=False,
    split_bn=False, start_epoch=None, target_key=None, torchcompile_mode=None,
    torchscript=False, train_batch_sizes=None, train_batches_per_epoch=None, train_crop_mode=None,
    train_img_sizes=None, train_num_samples=None, train_size_probs=None, train_size_random_mix=0.1,
    train_size_schedule='constant', train_size_schedule_spread=0.65, tta=0, val_interval=1, val_num_samples=None,
    variable_batch_loss_scale='none', warmup_prefix=False, worker_seeding='all',
)
TIMM_ONLY = set(TIMM_RENAMED) | TIMM_IGNORED | TIMM_LR_KEYS | set(TIMM_DEFAULTS) | {'input_size'}


def is_timm_args(data: dict) -> bool:
    """A recipe holding any name that only timm's train.py uses is read in timm's terms."""
    return any((key in TIMM_ONLY) and (key not in BY_NAME) for key in data)


def from_timm_args(data: dict, source: str) -> dict:
    """A timm args.yaml (or any recipe in timm's names) as a recipe in ours; one-line UserError for what we lack."""
    recipe = {}
    for key, value in data.items():
        if (key in TIMM_IGNORED) or (key in TIMM_LR_KEYS) or (key == 'input_size' and value is None):
            continue
        if key == 'sched_on_updates':  # train.py always sets the lr per update; parse_config notes timm's false
            continue
        if (key in TIMM_DEFAULTS) and _same(value, TIMM_DEFAULTS[key]):
            continue  # timm's default is off, and so is ours where we have the option
        if (key in TIMM_DEFAULTS) and (key not in BY_NAME):
            raise UserError(f'{source}: timm option {key}: {value!r} is not supported by train.py (only timm\'s '
                            f'default, {TIMM_DEFAULTS[key]!r}, is accepted: it changes nothing)')
        if value is None or value == '':  # timm's "not set": our default
            continue
        name = TIMM_RENAMED.get(key, key)
        if key == 'input_size':
            name, value = 'img_size', _timm_input_size(value, source)
        elif key == 'torchcompile':  # timm's is a backend name
            if value != 'inductor':
                raise UserError(f'{source}: torchcompile: {value!r}: train.py compiles with inductor only')
            value = True
        elif key == 'resume':
            raise UserError(f'{source}: resume {value!r}: resuming is an action, give --resume on the command line')
        recipe[name] = value
    if 'lr_scale' not in data:
        recipe['lr'], recipe['lr_scale'] = _timm_lr(data, recipe.get('opt', BY_NAME['opt'].default), source)
    return recipe


def _same(value, default) -> bool:
    return (list(value) if isinstance(value, tuple) else value) == default


def _timm_input_size(value, source: str) -> int:
    if (not isinstance(value, list)) or (len(value) != 3) or (value[0] != 3) or (value[1] != value[2]):
        raise UserError(f'{source}: input_size {value!r}: train.py takes 3-channel square images, [3, N, N]')
    return value[1]


def _timm_lr(data: dict, opt: str, source: str) -> tuple:
    """(lr, lr_scale) as timm reads them: an lr given is used at any batch size; no lr means lr_base per
    lr_base_size images, scaled to the batch linearly (square root for Adam-like and LAMB optimizers)."""
    if data.get('lr') is not None:
        return data['lr'], 'none'
    rule = data.get('lr_base_scale') or ('sqrt' if any(o in str(opt).lower() for o in ('ada', 'lamb')) else 'linear')
    if rule not in ('linear', 'sqrt'):
        raise UserError(f'{source}: lr_base_scale must be linear or sqrt, got {rule!r}')
    base, size, batch = data.get('lr_base', 0.1), data.get('lr_base_size', 256), data.get('batch_size', 128)
    try:
        return scaled_lr(number(base), positive(number)(size), positive(integer)(batch), rule), rule
    except ValueError as e:
        raise UserError(f'{source}: lr_base, lr_base_size, batch_size: {e}') from None


def agent_arguments(argv: list) -> list:
    """Flags as W&B's sweep agent writes them, as ours: it passes each sweep parameter as --name=value, under the
    sweep file's name (a recipe key: --weight_decay) and in Python's spelling (--model_ema=True, --scale=[0.5, 1.0],
    --num_classes=None). Anything else passes unchanged; a name that is no option stays for argparse to refuse."""
    translated = []
    for arg in argv:
        match = re.fullmatch(r'--([A-Za-z][\w-]*)=(.*)', arg, re.DOTALL)
        option = BY_NAME.get(match.group(1).replace('-', '_')) if match else None
        if option is None:
            translated.append(arg)
            continue
        value = match.group(2)
        if option.convert is flag:
            try:
                on = flag(value)
            except ValueError:
                raise UserError(f'command line: {option.name}: expected true or false, got {value!r}') from None
            translated.append(option.flag if on else f'--no-{option.flag[2:]}')
        elif option.convert.__name__.startswith('list') or option.convert is number_or_list:
            try:
                values = yaml.safe_load(value)
            except yaml.YAMLError:
                values = value
            translated += [option.flag, *(map(str, values) if isinstance(values, list) else [value])]
        else:
            translated.append(f'{option.flag}={value}')
    return translated


def sweep_trial() -> Optional[tuple]:
    """(sweep id, run id) when W&B's sweep agent started this process (its WANDB_SWEEP_ID and WANDB_RUN_ID)."""
    sweep, run = os.environ.get('WANDB_SWEEP_ID'), os.environ.get('WANDB_RUN_ID')
    return (sweep, run) if (sweep and run) else None


def parse_config(argv: Optional[list] = None) -> dict:
    """Resolve the configuration from defaults, an optional recipe (-c) and command line flags.

    A recipe in timm's names (its args.yaml) is first translated to ours (from_timm_args). Every value is converted
    and range-checked where it is read (so a recipe's batch_size: 0 is refused even when -b
    overrides it), the options are checked against each other, and only then is lr rescaled to a new batch size.

    Returns:
        A plain dict with one typed value per option, plus 'lr_rescaled_from' ((lr, batch) of the recipe when a
        batch_size given on the command line rescaled lr, else None) and 'ema_decay_rescaled_from' ((decay, batch,
        interval) of the recipe when a batch_size or model_ema_interval given on the command line rescaled
        model_ema_decay, else None).
    """
    cli = vars(_build_parser().parse_strict(agent_arguments(sys.argv[1:] if argv is None else argv)))
    recipe_path = cli.pop('config', None)

    config = {o.name: o.default for o in OPTIONS}
    timm_run, timm_batch, timm_per_epoch = False, None, False
    if recipe_path:
        recipe = load_yaml(recipe_path)
        timm_run = is_timm_args(recipe)
        if timm_run:
            timm_batch = recipe.get('batch_size')
            timm_per_epoch = not recipe.get('sched_on_updates', False)
            recipe = from_timm_args(recipe, str(recipe_path))
        for key, value in recipe.items():
            if key not in BY_NAME:
                raise unknown_option(str(key), list(BY_NAME), str(recipe_path))
            if BY_NAME[key].role == ACTION:
                raise UserError(f'{recipe_path}: {key} is an action, give it on the command line')
            config[key] = _check_value(BY_NAME[key], value, str(recipe_path))
        if not config['recipe']:
            # every timm run writes an args.yaml; its folder is named after the run
            named_by_folder = timm_run and (Path(recipe_path).name == 'args.yaml')
            config['recipe'] = Path(recipe_path).resolve().parent.name if named_by_folder else Path(recipe_path).stem
    recipe_batch, recipe_lr = config['batch_size'], config['lr']
    recipe_ema = (config['model_ema_decay'], recipe_batch, config['model_ema_interval'])
    for key, value in cli.items():
        config[key] = _check_value(BY_NAME[key], value, 'command line')

    config['experiment'] = config['experiment'] or config['recipe'] or config['model']
    trial = sweep_trial()
    if trial is not None:  # each trial in its own run folder, named after its W&B run: a re-run of it continues it
        sweep, run = trial
        config['output'] = str(Path(config['output']) / f"{config['experiment']}-sweep-{sweep}")
        config['experiment'] = run
    if timm_run and (run_folder_of(config) / 'args.yaml').is_file():
        raise UserError(f'the run folder {run_folder_of(config)} is a timm run (it holds args.yaml); give --output or '
                        '--experiment for a run folder of train.py')
    validate(config)
    if timm_batch and ('batch_size' not in cli) and (os.environ.get('RANK', '0') == '0'):
        print(f"train.py: note: timm's batch_size {timm_batch} is per GPU; read as the global batch (to repeat a "
              f'timm run on N GPUs, give -b N*{timm_batch})', file=sys.stderr)
    if timm_per_epoch and (os.environ.get('RANK', '0') == '0'):
        print("train.py: note: timm's sched_on_updates false sets the lr once per epoch; train.py sets it after "
              'every update (the same schedule, in finer steps)', file=sys.stderr)
    config['lr_rescaled_from'] = None
    if 'batch_size' in cli and 'lr' not in cli and config['batch_size'] != recipe_batch:
        config['lr'] = scaled_lr(recipe_lr, recipe_batch, config['batch_size'], config['lr_scale'])
        config['lr_rescaled_from'] = (recipe_lr, recipe_batch)
    config['ema_decay_rescaled_from'] = None
    decay, batch, interval = recipe_ema
    images_per_update = config['batch_size'] * config['model_ema_interval']
    if (config['model_ema'] and ({'batch_size', 'model_ema_interval'} & cli.keys()) and ('model_ema_decay' not in cli)
            and (images_per_update != batch * interval)):
        config['model_ema_decay'] = scaled_ema_decay(decay, batch * interval, images_per_update)
        config['ema_decay_rescaled_from'] = recipe_ema
    return config


def run_folder_of(config: dict) -> Path:
    return Path(config['output']) / config['experiment']


def scaled_lr(lr: float, from_batch: int, to_batch: int, rule: str) -> float:
    ratio = to_batch / from_batch
    return lr * {'linear': ratio, 'sqrt': math.sqrt(ratio), 'none': 1.0}[rule]


def scaled_ema_decay(decay: float, from_images: int, to_images: int) -> float:
    """The decay per update that keeps the EMA's horizon in images when each update follows to_images images instead
    of from_images: after n images the old weights keep decay ** (n / from_images) either way."""
    return decay ** (to_images / from_images)


def validate(config: dict):
    """Checks between options (each value's own range is checked as it is read); see BatchLayout for the rest."""
    def require(ok: bool, message: str):
        if not ok:
            raise UserError(message)
    require(config['warmup_epochs'] < config['epochs'], 'warmup_epochs must be shorter than epochs')
    require(config['scale'][0] <= config['scale'][1], 'scale must be [min, max]')
    require(config['ratio'][0] <= config['ratio'][1], 'ratio must be [min, max]')
    require(not (config['start_over'] and config['resume']), 'start_over and resume exclude each other')
    require((config['img_size_start'] is None) == (config['resize_epochs'] is None),
            'img_size_start and resize_epochs go together: set both for progressive resizing, or neither')
    if config['resize_epochs'] is not None:
        first, last = config['resize_epochs']
        require(first <= last, f'resize_epochs must be [start, end] with start <= end, got [{first:g}, {last:g}]')
        require(last <= config['epochs'], f"resize_epochs ends at epoch {last:g}, after the last epoch "
                                          f"(epochs {config['epochs']})")
    require((config['sched'] != 'onecycle') or (config['warmup_epochs'] == 0),
            'sched onecycle warms up by itself (onecycle_pct_start): set warmup_epochs 0')
    require((config['sched'] != 'onecycle') or (config['onecycle_momentum'] is None)
            or (config['onecycle_momentum'][0] <= config['onecycle_momentum'][1]),
            'onecycle_momentum is [base, max], base <= max')
    require((config['sched'] != 'ffcv_step') or ((config['warmup_epochs'] == 0) and (config['min_lr'] == 0)),
            'sched ffcv_step has no warmup and ends at 0, as FFCV\'s: set warmup_epochs 0 and min_lr 0')
    require(config['bce_target_thresh'] is None or config['bce_loss'],
            'bce_target_thresh applies to the BCE loss: set bce_loss true, or drop bce_target_thresh')
    require(not (config['auto_augment'] == TA_WIDE and config['train_interpolation'] == 'random'),
            'auto_augment ta_wide rotates and shears at one interpolation: set train_interpolation to bilinear, '
            'bicubic or nearest, not random')
    require((config['swa_start_epoch'] is None) or (config['swa_start_epoch'] < config['epochs']),
            f"swa_start_epoch {config['swa_start_epoch']} is not before the end of the schedule (epochs "
            f"{config['epochs']}, the last is {config['epochs'] - 1}): SWA would average nothing")
    require((config['swa_lr'] is None) or (config['swa_start_epoch'] is not None),
            'swa_lr anneals the lr from swa_start_epoch on: set swa_start_epoch, or drop swa_lr')
    kd_set = [name for name in ('kd_weight', 'kd_task_weight') if config[name] is not None]
    require((config['kd_teacher'] is not None) or not kd_set, f'{", ".join(kd_set)} weigh a distillation: set '
            'kd_teacher, or drop them')
    distill_weight = config['kd_weight'] if config['kd_weight'] is not None else 1 - (config['kd_task_weight'] or 0)
    require((config['kd_teacher'] is None) or (distill_weight > 0),
            f'the distillation loss has weight {distill_weight:g} (kd_weight, else 1 - kd_task_weight): a teacher '
            'needs a positive one; drop kd_teacher to train without it')
    require((config['wandb_log_model'] == 'false') or config['log_wandb'],
            f"wandb_log_model {config['wandb_log_model']} logs the model to W&B: set log_wandb true as well")
    require((config['cpu_decode_share'] is None) or (config['decode'] != 'cpu'),
            'cpu_decode_share splits the decoding of the device path (with decode: cpu the workers decode every image)')


def architecture_options(config: dict) -> dict:
    """Model keyword arguments of a run's config besides those of training only (dropout, init): what train.py builds
    and validate.py rebuilds. blur_pool and attn_layer are passed only when on, so that timm models without the options
    build."""
    options = {'blur_pool': True} if config.get('blur_pool') else {}
    if config.get('attn_layer'):
        options['attn_layer'] = config['attn_layer']
    return options


def saved_config(config: dict) -> dict:
    """The options that define and place a run, in schema order: what config.yaml and checkpoints hold."""
    return {o.name: config[o.name] for o in OPTIONS if o.role != ACTION}


def replay_command(config: dict, path) -> str:
    """The command that trains a run's configuration again, in a new run folder next to it."""
    return f"python train.py -c {shlex.quote(str(path))} --experiment {shlex.quote(config['experiment'] + '-replay')}"


def save_config(config: dict, path):
    text = yaml.safe_dump(saved_config(config), sort_keys=False, default_flow_style=None)
    header = (f"# resolved configuration of run {config['experiment']}\n"
              f'# replay it in a new run folder: {replay_command(config, path)}\n'
              f'# (python train.py -c {shlex.quote(str(path))} alone resumes this run, and does nothing once it has '
              'finished)\n')
    tmp = Path(f'{path}.tmp')
    try:
        tmp.write_text(header + text)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk leaves no empty config.yaml.tmp behind
        raise


def experiment_changes(old: dict, new: dict) -> list:
    """Differences in the options that change results, as 'key: old -> new' lines."""
    return [f'{o.name}: {old.get(o.name)!r} -> {new[o.name]!r}'
            for o in OPTIONS if o.role == EXPERIMENT and old.get(o.name, o.default) != new[o.name]]
