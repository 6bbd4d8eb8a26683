"""Checkpoints: timm's CheckpointSaver with durable writes and the full run state, and finding what to resume.

Files in a run folder (timm's layout): `last` and `previous` (the two newest epoch ends), `checkpoint-E` (the best
`checkpoint_hist` epochs), `model_best`, and `recovery-E-S` (the two newest mid-epoch states, S optimizer steps into
epoch E). Every file holds everything needed to continue; the newest one that loads is resumed.
"""
import logging
import os
import pickle
import random
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import timm
import torch
from timm.utils import CheckpointSaver, get_state_dict

from .config import UserError

_logger = logging.getLogger(__name__)

EXTENSION = '.pth.tar'


@dataclass
class Progress:
    """Where a run stands. `step` counts the optimizer steps done in `epoch`; steps_per_epoch of them means the
    epoch's training is done and its evaluation pending."""
    epoch: int = 0
    step: int = 0
    global_step: int = 0
    ema_updates: int = 0
    loss_sum: float = 0.0  # sum of this epoch's step losses (mean over processes)
    seconds: float = 0.0  # time spent on this epoch so far, over all the processes that worked on it
    history: list = field(default_factory=list)  # summary rows of the finished epochs

    def key(self) -> tuple:
        return self.epoch, self.step


def fsync_write(obj, path):
    with open(path, 'wb') as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RunCheckpointSaver(CheckpointSaver):
    """timm's CheckpointSaver, extended where it falls short of an exact, crash-safe resume.

    Its _save() writes model, EMA, optimizer, scaler and its own top-k state but not the rest of the run (schedule
    position, RNG states, place in the epoch, config), and it stores `args` as a pickled object, which
    torch.load(weights_only=True) refuses. Its files are renamed into place without fsync, so a machine that loses
    power can leave an empty file under the new name. We write the full state as plain types, fsync file and
    folder, and keep the previous epoch end as `previous` so that two resumable states always exist.
    """

    def __init__(self, *args, run_state: Callable[[], dict], **kwargs):
        super().__init__(*args, **kwargs)
        self.run_state = run_state

    def _save(self, save_path, epoch, metric=None):
        state = {
            'epoch': epoch,
            'arch': None,
            'version': 2,
            'state_dict': get_state_dict(self.model, self.unwrap_fn),
            'optimizer': self.optimizer.state_dict(),
        }
        if self.model_ema is not None:
            state['state_dict_ema'] = get_state_dict(self.model_ema, self.unwrap_fn)
        if self.amp_scaler is not None:
            state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
        if metric is not None:
            state['metric'] = metric
        state['saver'] = self.state_dict(epoch, metric)
        state.update(self.run_state())
        state['arch'] = state['config']['model']
        fsync_write(state, save_path)

    def _replace(self, src, dst):
        super()._replace(src, dst)
        _fsync_dir(os.path.dirname(dst) or '.')

    def save_checkpoint(self, epoch, metric=None):
        last = os.path.join(self.checkpoint_dir, 'last' + self.extension)
        if os.path.exists(last):
            self._duplicate(last, os.path.join(self.checkpoint_dir, 'previous' + self.extension))
        return super().save_checkpoint(epoch, metric)

    def restore_recovery_files(self, run_dir: Path):
        """Continue rotating the recovery files left by the interrupted process (timm forgets them)."""
        found = sorted(run_dir.glob('recovery-*' + EXTENSION), key=lambda p: _recovery_key(p.name))
        names = [str(p) for p in found]
        self.prev_recovery_file = names[-2] if len(names) > 1 else ''
        self.curr_recovery_file = names[-1] if names else ''
        for stale in names[:-2]:
            os.remove(stale)


def _recovery_key(name: str) -> tuple:
    parts = name[:-len(EXTENSION)].split('-')
    return int(parts[1]), int(parts[2])


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        'python': random.getstate(),
        'numpy': [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state['python'])
    kind, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def versions() -> dict:
    try:
        commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {'torch': str(torch.__version__), 'timm': str(timm.__version__), 'git': commit}


def load(path) -> dict:
    """A checkpoint's contents, loaded safely, or a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f'checkpoint not found: {path}')
    with open(path, 'rb') as f:
        if f.read(4) != b'PK\x03\x04':  # torch.save writes a zip archive
            raise UserError(f'{path} is not a PyTorch checkpoint')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        refused = next((line for line in str(e).splitlines() if 'Unsupported' in line), 'unsupported content')
        refused = refused.split('Unsupported global: ')[-1].split(' was not')[0]
        raise UserError(f'{path} holds objects that a safe load refuses ({refused.strip()[:160]})') from None
    except Exception as e:
        reason = ' '.join(str(e).split()).split('. ')[0][:160] or type(e).__name__
        raise UserError(f'{path} is damaged or incomplete ({reason})') from None
    if not isinstance(state, dict):
        raise UserError(f'{path} is not a checkpoint: it holds a {type(state).__name__}, not a dict')
    return state


def _progress_of(path: Path) -> tuple:
    meta = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    return tuple(meta['progress'][k] for k in ('epoch', 'step'))


def newest_valid(run_dir: Path) -> tuple:
    """(path, state) of the newest checkpoint in run_dir that loads, or (None, None) when there is none.

    Checkpoints are ordered by the training progress they hold, not by file time. One that does not load
    (truncated, corrupt) is renamed to *.corrupt with a warning, and the next newest is tried.
    """
    ranked = []
    for path in run_dir.glob('*' + EXTENSION):
        if 'tmp' in path.name:
            continue
        try:
            ranked.append((_progress_of(path), path.name == 'last' + EXTENSION, path))  # last wins a tie
        except Exception as e:
            _set_aside(path, e)
    for _, _, path in sorted(ranked, reverse=True):
        if not path.exists():  # a hard link of a file already set aside
            continue
        try:
            return path, load(path)
        except UserError as e:
            _set_aside(path, e)
    return None, None


def _set_aside(path: Path, error):
    _logger.warning(f'WARNING: skipping checkpoint {path.name}, it does not load ({str(error)[:160]}); '
                    f'kept as {path.name}.corrupt')
    os.replace(path, path.with_name(path.name + '.corrupt'))


def run_files(run_dir: Path) -> list:
    return sorted(p for p in run_dir.glob('*' + EXTENSION)) if run_dir.is_dir() else []


def check_compatible(state: dict, path, model_name: str, num_classes: int):
    """Stop with one line when a checkpoint cannot hold this run's model."""
    config = state.get('config') or {}
    arch = state.get('arch') or config.get('model')
    fc = state.get('state_dict', {}).get('fc.weight')
    classes = fc.shape[0] if fc is not None else config.get('num_classes')
    if arch != model_name or classes != num_classes:
        raise UserError(f'{path} holds {arch} with {classes} classes; this run trains {model_name} with '
                        f'{num_classes} classes')
    if 'progress' not in state:
        raise UserError(f'{path} holds weights but no training state to resume; use --initial-checkpoint')


def progress_from(state: dict) -> Progress:
    return Progress(**state['progress'])


def progress_state(progress: Progress) -> dict:
    return asdict(progress)


def weights_from(state: dict, which: str, path) -> dict:
    """The raw or EMA state dict of a checkpoint (or the file itself when it is a plain state dict)."""
    if 'state_dict' not in state:
        if all(isinstance(v, torch.Tensor) for v in state.values()):
            return state
        raise UserError(f'{path} holds no state_dict')
    if which == 'ema':
        if 'state_dict_ema' not in state:
            raise UserError(f'{path} holds no EMA weights; use raw weights')
        return state['state_dict_ema']
    return state['state_dict']
