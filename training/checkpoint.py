"""Checkpoints: timm's CheckpointSaver with durable writes and the full run state, and finding what to resume.

Files in a run folder (timm's layout): `last` and `previous` (the two newest epoch ends), `checkpoint-E` (the best
`checkpoint_hist` epochs), `model_best`, and `recovery-E-S` (the two newest mid-epoch states, S optimizer steps into
epoch E). Every file holds everything needed to continue; the newest one that loads is resumed.
"""
import argparse
import fcntl
import logging
import os
import pickle
import random
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

import numpy as np
import timm
import torch
from timm.utils import CheckpointSaver, get_state_dict

from .config import UserError, experiment_changes
from .distributed import on_primary

_logger = logging.getLogger(__name__)

EXTENSION = '.pth.tar'


@dataclass
class Progress:
    """Where a run stands. `step` counts the optimizer steps done in `epoch`; steps_per_epoch of them means the
    epoch's training is done and its evaluation pending."""
    epoch: int = 0
    step: int = 0
    global_step: int = 0
    loss_sum: float = 0.0  # sum of this epoch's step losses (mean over processes)
    seconds: float = 0.0  # time spent on this epoch so far, over all the processes that worked on it
    history: list = field(default_factory=list)  # summary rows of the finished epochs

    @classmethod
    def from_state(cls, saved: dict) -> 'Progress':
        """A checkpoint's progress; fields that older versions wrote and this one no longer keeps are dropped."""
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})


def fsync_write(obj, path):
    with open(path, 'wb') as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            # torch's zip writer turns a failed write (disk full, quota) into an internal error; report the OS's
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise
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

    timm's save_checkpoint() / save_recovery() take no extra state, so save_epoch() / save_mid_epoch() hand the
    run's state to the _save() they call. That state includes a snapshot() of the weights and optimizer taken
    beforehand, not the live tensors, so that a save can be written while training goes on (see BackgroundSave).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._run_state = None

    def snapshot(self) -> dict:
        """Weights (raw and EMA), optimizer and scaler state as CPU copies that training no longer changes."""
        state = {'state_dict': get_state_dict(self.model, self.unwrap_fn), 'optimizer': self.optimizer.state_dict()}
        if self.model_ema is not None:
            state['state_dict_ema'] = get_state_dict(self.model_ema, self.unwrap_fn)
        if self.amp_scaler is not None:
            state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
        return cpu_copy(state)

    def save_epoch(self, epoch: int, metric: float, run_state: dict):
        """`last` (the old one becomes `previous`), plus `checkpoint-E` and `model_best` when it ranks.

        Args:
            run_state: snapshot() and the rest of the run's state (progress, RNG states, config, ...).
        """
        self._run_state = run_state
        try:
            self.save_checkpoint(epoch, metric)
        finally:
            self._run_state = None

    def save_mid_epoch(self, epoch: int, step: int, run_state: dict):
        """`recovery-E-S`; the two newest are kept."""
        self._run_state = run_state
        try:
            self.save_recovery(epoch, step)
        finally:
            self._run_state = None

    def _save(self, save_path, epoch, metric=None):
        state = {'epoch': epoch, 'arch': self._run_state['config']['model'], 'version': 2}
        if metric is not None:
            state['metric'] = metric
        state['saver'] = self.state_dict(epoch, metric)
        state.update(self._run_state)
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


def cpu_copy(obj):
    """obj (nested dicts, lists, tuples) with every tensor copied to the CPU; a state dict keeps its `_metadata`."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to('cpu', copy=True)
    if isinstance(obj, dict):
        copied = type(obj)((k, cpu_copy(v)) for k, v in obj.items())
        if hasattr(obj, '_metadata'):  # BatchNorm & co. read their state-dict version from it on load
            copied._metadata = obj._metadata
        return copied
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


class BackgroundSave:
    """Runs one save at a time in a thread, so that training goes on while a checkpoint is serialised, written and
    fsync'ed (seconds for ImageNet's ResNet-50 on a slow disk, every epoch).

    The thread is not a daemon: the process does not end before the save in flight has finished. A kill during the
    save loses only the save itself, as a synchronous one would: the files it replaces stay until it is renamed in.
    """

    def __init__(self):
        self._thread = None
        self._outcome = None  # ('returned', value) or ('raised', exception)

    def start(self, save):
        """Run save() in the background; the previous save must have been waited for."""
        assert self._thread is None, 'wait() for the previous save first'

        def run():
            try:
                self._outcome = ('returned', save())
            except BaseException as e:  # a bug: raised again by wait(), in the training thread
                self._outcome = ('raised', e)
        self._thread = threading.Thread(target=run, name='checkpoint-save')
        self._thread.start()

    def wait(self):
        """Wait for the save in flight (if any) and return what it returned; what it raised is raised here."""
        if self._thread is None:
            return None
        self._thread.join()
        self._thread = None
        (how, value), self._outcome = self._outcome, None
        if how == 'raised':
            raise value
        return value


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


ZIP_MAGIC, LEGACY_MAGIC = b'PK\x03\x04', b'\x80\x02'  # torch.save's zip archive; its pre-1.6 pickle stream


def _torch_load(path: Path, mmap: bool = False) -> dict:
    """torch.load(weights_only=True) with its failures sorted: a refusal of pickled objects, or damage."""
    with open(path, 'rb') as f:
        head = f.read(4)
    if not (head == ZIP_MAGIC or head.startswith(LEGACY_MAGIC)):
        raise DamagedCheckpoint(f'{path} is not a PyTorch checkpoint')
    try:
        # timm's train.py stores its argparse.Namespace under 'args': that one class is allowed besides plain types
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap and head == ZIP_MAGIC)
    except pickle.UnpicklingError as e:
        refused = next((line for line in str(e).splitlines() if 'Unsupported' in line), 'unsupported content')
        refused = refused.split('Unsupported global: ')[-1].split(' was not')[0].replace('GLOBAL ', '')
        raise UserError(f'{path} holds objects that a safe load refuses ({refused.strip()[:160]})') from None
    except Exception as e:
        reason = ' '.join(str(e).split()).split('. ')[0][:160] or type(e).__name__
        raise DamagedCheckpoint(f'{path} is damaged or incomplete ({reason})') from None


def load(path) -> dict:
    """A checkpoint's contents, loaded safely, or a one-line UserError."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f'{path} is a directory, not a checkpoint file')
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
    if not isinstance(state.get('data'), dict) or 'classes' not in state['data']:
        raise UserError(f'{path} is not a checkpoint of train.py (it holds no record of its data); move it out of '
                        'the run folder, or use --initial-checkpoint')
    arch, classes = state.get('arch'), state['data']['classes']
    if (arch != model_name) or (classes != num_classes):
        raise UserError(f'{path} holds {arch} with {classes} classes; this run trains {model_name} with '
                        f'{num_classes} classes')


def data_changes(saved: dict, current: dict) -> list:
    """Differences between the data a checkpoint was trained on and this run's, as 'what: old -> new' lines.

    Class names are compared in label order: folders renamed or swapped with the same image counts would shift
    every label. Checkpoints of older versions hold no names; what they hold is compared.
    """
    changes = [f'data {key}: {saved[key]} -> {current[key]}' for key in ('train_images', 'val_images', 'classes')
               if key in saved and saved[key] != current[key]]
    old_names, new_names = saved.get('class_names'), current['class_names']
    if old_names is not None and old_names != new_names:
        differing = [(i, a, b) for i, (a, b) in enumerate(zip(old_names, new_names)) if a != b]
        example = '; '.join(f'label {i}: {a!r} -> {b!r}' for i, a, b in differing[:3])
        changes.append(f'class names: {len(differing)} of {len(old_names)} labels name another class ({example})')
    if saved.get('train_files') and current.get('train_files') and saved['train_files'] != current['train_files'] \
            and not changes:
        changes.append('data files: the list of training images and their labels changed')
    old_manifest, new_manifest = saved.get('manifest') or {}, current.get('manifest') or {}
    if old_manifest.get('sha256') and new_manifest.get('sha256') and old_manifest['sha256'] != new_manifest['sha256']:
        changes.append(f"data manifest sha256: {old_manifest['sha256'][:12]} -> {new_manifest['sha256'][:12]}")
    return changes


def check_resume(config: dict, state: dict, path, data_fingerprint: dict):
    """Stop when resuming `state` would silently change the experiment, unless --allow-config-change."""
    check_compatible(state, path, config['model'], data_fingerprint['classes'])
    changes = experiment_changes(state['config'], config) + data_changes(state.get('data') or {}, data_fingerprint)
    if changes and not config['allow_config_change']:
        raise UserError(f"resuming {path} would change the experiment ({'; '.join(changes)}); "
                        'pass --allow-config-change to resume anyway')
    for change in changes:
        _logger.warning(f'WARNING: resuming with a changed setting: {change}')


def find_resume_state(resume_path: Optional[str], run_dir: Path, procs) -> tuple:
    """(path, state) to resume from: --resume, else the newest valid checkpoint in the run folder, else (None, None).

    Rank 0 looks through the run folder (setting damaged files aside); every rank then loads the file it chose.
    """
    if resume_path:
        return resume_path, load(resume_path)
    found = {}

    def newest() -> Optional[str]:
        path, found['state'] = newest_valid(run_dir)
        if (path is None) and run_files(run_dir, '.corrupt'):
            raise UserError(f'{run_dir} holds checkpoints but none loads; pass --start-over to train from scratch')
        return None if path is None else str(path)
    path = on_primary(newest, procs)
    if path is None:
        return None, None
    return path, found.get('state') or load(path)  # rank 0 has loaded it already


def restore(state: dict, model, model_ema, optimizer, scaler, same_optimizer: bool) -> Progress:
    """Load a checkpoint's full training state into the components; returns where the run stands."""
    model.load_state_dict(state['state_dict'])
    if model_ema is not None:
        if 'state_dict_ema' in state:
            model_ema.module.load_state_dict(state['state_dict_ema'])
        else:
            _logger.warning('WARNING: the checkpoint has no EMA weights; the EMA starts from the current weights')
            model_ema.set(model)
    if same_optimizer:
        settings = [{k: v for k, v in group.items() if k != 'params'} for group in optimizer.param_groups]
        optimizer.load_state_dict(state['optimizer'])
        for group, setting in zip(optimizer.param_groups, settings):  # this run's weight decay, betas, ...
            group.update(setting)
    else:
        _logger.warning('WARNING: the optimizer changed, its state (momentum, moments) starts afresh')
    if scaler is not None and scaler.state_dict_key in state:
        scaler.load_state_dict(state[scaler.state_dict_key])
    set_rng_state(state['rng'])
    return Progress.from_state(state['progress'])


def load_initial_weights(model: torch.nn.Module, path: str, which: str):
    """Start from a checkpoint's weights (fine-tuning); a classifier of another class count starts from scratch."""
    weights = weights_from(load(path), which, path, '--initial-weights raw')
    head = model.pretrained_cfg['classifier']
    if weights.get(f'{head}.weight') is not None and weights[f'{head}.weight'].shape[0] != model.num_classes:
        weights = {k: v for k, v in weights.items() if not k.startswith(head + '.')}
        _logger.info(f'Classifier of {path} has another class count: it starts from scratch')
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # tensors of another shape: another architecture
        mismatch = next((line.strip() for line in str(e).splitlines() if 'size mismatch' in line), str(e))
        raise UserError(f'{path} does not fit {model.pretrained_cfg["architecture"]}: {mismatch[:200]}') from None
    if unexpected or [k for k in missing if not k.startswith(head + '.')]:
        raise UserError(f'{path} does not fit {model.pretrained_cfg["architecture"]}: missing {missing[:3]}, '
                        f'unexpected {unexpected[:3]}')
    _logger.info(f'Initial weights: {which} weights of {path}')


# the run folder: one trainer at a time, and --start-over deletes only what a run writes

LOCK_FILE = '.train.lock'
RUN_FILES = ('config.yaml', 'log.txt', 'summary.csv', 'curves.png', 'wandb', '*' + EXTENSION,
             '*' + EXTENSION + '.corrupt', '*.tmp', '*.tmp.png', '*.tmp' + EXTENSION)
CONFIG_HEADER = '# resolved configuration'


def run_folder(output: str, experiment: str) -> Path:
    """The run folder output/experiment; an experiment is a name, not a path."""
    if (experiment in ('', '.', '..')) or ('/' in experiment) or (os.altsep and os.altsep in experiment) \
            or (os.sep in experiment):
        raise UserError(f'experiment must be a folder name, not a path: {experiment!r}')
    return Path(output) / experiment


def lock_run_folder(run_dir: Path):
    """Create the run folder and hold an exclusive lock on it for the life of this process.

    The operating system releases the lock when the process ends, however it ends, so a killed run never blocks the
    next one. Returns the open lock file: the lock lasts as long as it stays open.
    """
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(run_dir / LOCK_FILE, 'a+')
    except OSError as e:
        raise UserError(f'cannot write to the run folder {run_dir}: {e.strerror or e}') from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or 'another process'
        lock.close()
        raise UserError(f'{run_dir} is in use by another train.py ({holder}); wait for it to end or stop it') \
            from None
    lock.seek(0)
    lock.truncate()
    lock.write(f'pid {os.getpid()} on {socket.gethostname()}\n')
    lock.flush()
    return lock


def run_folder_files(run_dir: Path) -> list:
    """The files and folders in run_dir that a run writes."""
    return sorted({p for pattern in RUN_FILES for p in run_dir.glob(pattern)})


def clear_run_folder(run_dir: Path):
    """Delete the run in run_dir for --start-over: only the files a run writes, and only in a run folder of ours
    (one whose config.yaml train.py wrote); anything else in it stays."""
    ours = run_folder_files(run_dir)
    if not ours:
        return
    config = run_dir / 'config.yaml'
    if not (config.is_file() and config.read_text(errors='replace').startswith(CONFIG_HEADER)):
        raise UserError(f'{run_dir} is not a run folder of train.py (no config.yaml of ours): --start-over deletes '
                        'nothing there; pick another --experiment or remove its files yourself')
    for path in ours:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    _logger.info(f'--start-over: deleted the previous run in {run_dir} ({len(ours)} files)')


def weights_from(state: dict, which: str, path, raw_flag: str) -> dict:
    """The raw or EMA state dict of a checkpoint (or the file itself when it is a plain state dict).

    Args:
        raw_flag: the option that asks for the raw weights, named when the checkpoint has no EMA weights.
    """
    if 'state_dict' not in state:
        if isinstance(state.get('model'), dict):  # DeiT / ConvNeXt training checkpoints, read by timm's loader too
            return state['model']
        if state and all(isinstance(v, torch.Tensor) for v in state.values()):
            return state
        keys = ', '.join(map(str, list(state)[:5])) or 'nothing'
        raise UserError(f'{path} holds no model weights (no state_dict; its keys: {keys})')
    if which == 'ema':
        if 'state_dict_ema' not in state:
            raise UserError(f'{path} holds no EMA weights; pass {raw_flag} for its raw weights')
        return state['state_dict_ema']
    return state['state_dict']


def timm_run_config(args) -> dict:
    """What evaluation needs of the settings of timm's train.py (the argparse.Namespace in its checkpoints), in our
    option names; {} for anything else."""
    if not isinstance(args, argparse.Namespace):
        return {}
    timm_args = vars(args)
    config = {key: timm_args.get(key) or None for key in ('model', 'num_classes', 'data_dir', 'img_size', 'crop_pct',
                                                           'interpolation', 'mean', 'std')}
    input_size = timm_args.get('input_size')
    if input_size:
        config['img_size'] = input_size[-1]
    config['dataset'] = timm_args.get('dataset') or ''
    config['channels_last'] = bool(timm_args.get('channels_last'))
    return config
