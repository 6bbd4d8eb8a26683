"""Knowledge distillation: the teacher, and timm's logit distillation task around the student.

The teacher (option kd_teacher) is one of:
- a timm model name with pretrained weights ('resnet152.tv2_in1k'), downloaded by timm on first use as timm does;
- 'local-dir:FOLDER': an export of ours (tools/export.py) or any folder timm's create_model reads;
- a checkpoint of ours (a file): the weights that earned it its metric (EMA or raw), so that a long run teaches a short
  one.

timm's LogitDistillationTask holds the loss (task_loss_weight * task loss + distill_loss_weight * T^2 KL) and its
DistillationTeacher the teacher: eval mode, no gradients, the input renormalised from the student's mean and std to
the teacher's. train.py calls the task on the batch after Mixup/CutMix and random erasing, in its AMP and memory
format: the teacher sees exactly what the student sees.
"""
import logging
import math
from pathlib import Path
from typing import Optional

import torch
from timm.models import create_model, get_pretrained_cfg
from timm.task import DistillationTeacher, LogitDistillationTask
from torch.utils.flop_counter import FlopCounterMode

from . import checkpoint
from .config import UserError, architecture_options

_logger = logging.getLogger(__name__)

LOCAL_DIR = 'local-dir:'


def is_checkpoint(spec: str) -> bool:
    """A teacher given as a file of ours, rather than a timm name or a local-dir: folder."""
    return (not spec.startswith(LOCAL_DIR)) and (Path(spec).is_file() or spec.endswith(('.pth', '.pth.tar', '.pt')))


def _checkpoint_teacher(path: str, device: Optional[torch.device] = None) -> tuple:
    """(model, mean, std) of a checkpoint of ours: its model and architecture, the weights that earned it its metric,
    and the normalisation it was trained with."""
    state = checkpoint.load(path)
    config = state.get('config') or checkpoint.timm_run_config(state.get('args'))
    if not config.get('model'):
        raise UserError(f'kd_teacher {path} is a plain state dict: a teacher checkpoint names its model (a checkpoint '
                        'of train.py or timm\'s train.py), or use an export folder as local-dir:FOLDER')
    which = state.get('metric_weights') or ('ema' if 'state_dict_ema' in state else 'raw')
    weights = checkpoint.weights_from(state, which, path, 'a checkpoint with raw weights')
    cfg = get_pretrained_cfg(config['model'])
    head = weights.get(f'{cfg.classifier}.weight') if cfg else None
    num_classes = ((state.get('data') or {}).get('classes') or config.get('num_classes') or
                   (head.shape[0] if head is not None else 1000))
    if (device is not None) and (device.type == 'meta'):
        weights = None
    with torch.device(device or 'cpu'):
        model = create_model(config['model'], num_classes=num_classes, **architecture_options(config))
    if weights is not None:
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:
            raise UserError(f'kd_teacher {path} does not fit {config["model"]}: {" ".join(str(e).split())[:200]}') \
                from None
    mean = config.get('mean') or model.pretrained_cfg.get('mean')
    std = config.get('std') or model.pretrained_cfg.get('std')
    return model, tuple(mean) * (3 // len(mean)), tuple(std) * (3 // len(std))


def teacher_model(spec: str, device: Optional[torch.device] = None) -> torch.nn.Module:
    """The teacher's network with its weights (on the meta device: its architecture alone), its pretrained_cfg
    holding the mean and std it expects; one-line UserError when it cannot be had."""
    if is_checkpoint(spec):
        model, mean, std = _checkpoint_teacher(spec, device)
        model.pretrained_cfg = dict(model.pretrained_cfg, mean=mean, std=std)
        return model
    if spec.startswith(LOCAL_DIR) and not (Path(spec[len(LOCAL_DIR):]) / 'config.json').is_file():
        raise UserError(f'kd_teacher {spec}: no config.json in that folder (an export of tools/export.py has one)')
    meta = (device is not None) and (device.type == 'meta')
    try:
        with torch.device(device or 'cpu'):
            return create_model(spec, pretrained=not meta)
    except RuntimeError as e:  # an unknown name; timm says which
        raise UserError(f'kd_teacher {spec}: {str(e).splitlines()[0]}') from None
    except Exception as e:  # the download (no network, no such weights) or the file: timm raises many kinds
        reason = ' '.join(str(e).split())[:200] or type(e).__name__
        raise UserError(f'kd_teacher {spec}: its pretrained weights could not be loaded ({reason})') from None


def build_teacher(spec: str, num_classes: int, device: torch.device, channels_last: bool) -> DistillationTeacher:
    """The teacher, on the run's device and memory format, frozen; refused when its classes are not the run's."""
    model = teacher_model(spec)
    if model.num_classes != num_classes:
        raise UserError(f'kd_teacher {spec} predicts {model.num_classes} classes and this run has {num_classes}: a '
                        'teacher needs the same classes, in the same order')
    teacher = DistillationTeacher(model.to(device), device=device)
    teacher.requires_grad_(False)
    if channels_last:
        teacher.to(memory_format=torch.channels_last)
    _logger.info(f'Teacher {spec}: {model.pretrained_cfg.get("architecture", type(model).__name__)}, '
                 f'{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, input mean '
                 f'{tuple(round(m, 3) for m in model.pretrained_cfg["mean"])}')
    return teacher


def build_distillation(config: dict, train_model: torch.nn.Module, loss_fn, teacher: DistillationTeacher,
                       mean: tuple, std: tuple, device: torch.device) -> LogitDistillationTask:
    """timm's task around the student as trained (DDP and/or compiled), with the run's loss as its task loss.

    timm reads the student's mean and std from its pretrained_cfg; the run's own (options mean and std) replace
    them, since the loader normalised the batch with those.
    """
    task = LogitDistillationTask(train_model, teacher, criterion=loss_fn, distill_loss_weight=config['kd_weight'],
                                 task_loss_weight=config['kd_task_weight'], temperature=config['kd_temperature'],
                                 device=device, verbose=False)
    task.student_mean.copy_(torch.tensor(mean).view(1, -1, 1, 1))
    task.student_std.copy_(torch.tensor(std).view(1, -1, 1, 1))
    _logger.info(f'Distillation: loss = {task.task_loss_weight:g} x task loss + {task.distill_loss_weight:g} x '
                 f'KL(teacher || student) at temperature {task.temperature:g}')
    return task


def forward_flops(model: torch.nn.Module, img_size: int) -> int:
    """FLOPs of one image's forward pass in eval mode, counted on the meta device (no weights, no compute)."""
    model.eval()
    with torch.device('meta'), FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, img_size, img_size))
    return counter.get_total_flops()


def step_cost(config: dict, student: torch.nn.Module, img_size: int) -> tuple:
    """(teacher's forward FLOPs per image, the student's, how many times a plain step a distillation step costs).

    A training step of the student is taken as three forwards (forward, and a backward of twice its cost).
    """
    teacher = forward_flops(teacher_model(config['kd_teacher'], torch.device('meta')), img_size)
    own = forward_flops(student, img_size)
    return teacher, own, 1 + teacher / (3 * own) if own else math.inf
