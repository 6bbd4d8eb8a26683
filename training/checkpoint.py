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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

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
    torch.load(weights_only=True) refuses. Its _replace() deletes the old file before renaming the new one over
    it, without fsync, so a crash can leave no `last`, and a power loss an empty file under the new name. We write
    the full state as plain types, rename atomically with fsync of file and folder, and keep the previous epoch end
    as `previous`, so that two resumable states always exist.
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
        try:
            fsync_write(state, save_path)
        except BaseException:
            if os.path.exists(save_path):  # a partial file would only take space a retry needs
                os.remove(save_path)
            raise

    def _replace(self, src, dst):
        """Atomic rename of a complete file; the `last` it replaces becomes `previous`."""
        folder = os.path.dirname(dst) or '.'
        if os.path.basename(dst) == 'last' + self.extension and os.path.exists(dst):
            link = os.path.join(folder, 'previous.tmp' + self.extension)
            if os.path.exists(link):
                os.remove(link)
            os.link(dst, link)
            os.replace(link, os.path.join(folder, 'previous' + self.extension))
        os.replace(src, dst)
        _fsync_dir(folder)

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
        state['cuda'] = torch.cuda.get_rng_state()  # this process's GPU: the resumed run may have fewer
    return state


def set_rng_state(state: dict):
    random.setstate(state['python'])
    kind, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


def versions() -> dict:
    try:
        commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {'torch': str(torch.__version__), 'timm': str(timm.__version__), 'git': commit}


class DamagedCheckpoint(UserError):
    """A file that is not, or no longer, a whole checkpoint (truncated, overwritten, not a zip)."""


def _torch_load(path: Path, **kwargs) -> dict:
    """torch.load(weights_only=True) with its failures sorted: a refusal of pickled objects, or damage."""
    with open(path, 'rb') as f:
        if f.read(4) != b'PK\x03\x04':  # torch.save writes a zip archive
            raise DamagedCheckpoint(f'{path} is not a PyTorch checkpoint')
    try:
        return torch.load(path, map_location='cpu', weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        refused = next((line for line in str(e).splitlines() if 'Unsupported' in line), 'unsupported content')
        refused = refused.split('Unsupported global: ')[-1].split(' was not')[0]
        raise UserError(f'{path} holds objects that a safe load refuses ({refused.strip()[:160]})') from None
    except Exception as e:
        reason = ' '.join(str(e).split()).split('. ')[0][:160] or type(e).__name__
        raise DamagedCheckpoint(f'{path} is damaged or incomplete ({reason})') from None


def load(path) -> dict:
    """A checkpoint's contents, loaded safely, or a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f'checkpoint not found: {path}')
    state = _torch_load(path)
    if not isinstance(state, dict):
        raise UserError(f'{path} is not a checkpoint: it holds a {type(state).__name__}, not a dict')
    return state


def run_files(run_dir: Path, suffix: str = EXTENSION) -> list:
    """The checkpoints of a run folder (set-aside ones with suffix '.corrupt'), without unfinished writes."""
    return sorted(p for p in run_dir.glob('*' + suffix) if 'tmp' not in p.name) if run_dir.is_dir() else []


def newest_valid(run_dir: Path) -> tuple:
    """(path, state) of the newest checkpoint in run_dir that loads, or (None, None) when there is none.

    Checkpoints are ordered by the training progress they hold, not by file time. A damaged one (truncated,
    corrupt) is renamed to *.corrupt with a warning, and the next newest is tried. A checkpoint that a safe load
    refuses is not damaged: that stops the run rather than setting good checkpoints aside.
    """
    ranked = []
    for path in run_files(run_dir):
        try:
            progress = _torch_load(path, mmap=True)['progress']
            ranked.append(((progress['epoch'], progress['step']), path.name == 'last' + EXTENSION, path))
        except DamagedCheckpoint as e:
            _set_aside(path, e)
    for _, _, path in sorted(ranked, reverse=True):  # on a tie, `last`
        try:
            return path, load(path)
        except DamagedCheckpoint as e:
            _set_aside(path, e)
    return None, None


def _set_aside(path: Path, error):
    _logger.warning(f'WARNING: skipping checkpoint {path.name}, it does not load ({str(error)[:160]}); '
                    f'kept as {path.name}.corrupt')
    os.replace(path, path.with_name(path.name + '.corrupt'))


def check_compatible(state: dict, path, model_name: str, num_classes: int):
    """Stop with one line when a checkpoint cannot hold this run's model."""
    if 'progress' not in state:
        raise UserError(f'{path} holds weights but no training state to resume; use --initial-checkpoint')
    arch, classes = state.get('arch'), state['data']['classes']
    if (arch != model_name) or (classes != num_classes):
        raise UserError(f'{path} holds {arch} with {classes} classes; this run trains {model_name} with '
                        f'{num_classes} classes')


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
