"""Checkpoints: timm's CheckpointSaver with durable writes and the full run state, and finding what to resume.

Files in a run folder (timm's layout): `last` and `previous` (the two newest epoch ends), `checkpoint-E` (the best
`checkpoint_hist` epochs), `model_best`, and `recovery-E-S` (the two newest mid-epoch states, S optimizer steps into
epoch E, deleted once the final epoch's checkpoint is saved). Every file holds everything needed to continue; the
newest one that loads is resumed.
"""
import argparse
import errno
import fcntl
import logging
import os
import pickle
import random
import re
import shutil
import socket
import subprocess
import threading
import weakref
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
# the checkpoints a run writes, by their names (timm's CheckpointSaver and `previous`); other files are the user's
CHECKPOINT_NAME = re.compile(r'(last|previous|model_best|checkpoint-\d+|recovery-\d+-\d+)' + re.escape(EXTENSION))
RECOVERY_NAME = re.compile(r'recovery-(\d+)-(\d+)' + re.escape(EXTENSION))


@dataclass
class Progress:
    """Where a run stands. `step` counts the optimizer steps done in `epoch`; steps_per_epoch of them means the
    epoch's training is done and its evaluation pending."""
    epoch: int = 0
    step: int = 0
    global_step: int = 0
    loss_sum: float = 0.0  # sum of this epoch's step losses (mean over processes)
    seconds: float = 0.0  # time spent on this epoch so far, over all the processes that worked on it
    device_seconds: float = 0.0  # the same times the processes (devices) that spent it: what the epoch was paid for
    history: list = field(default_factory=list)  # summary rows of the finished epochs

    def spend(self, seconds: float, processes: int):
        """Count `seconds` of this epoch, spent by `processes` processes (a resume may run on another number)."""
        self.seconds += seconds
        self.device_seconds += seconds * processes

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

    def __init__(self, *args, model_swa=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_swa = model_swa  # torch's AveragedModel, which timm's saver does not know
        self._run_state = None

    def snapshot(self) -> dict:
        """Weights (raw, EMA, and SWA once it has averaged an epoch), optimizer and scaler state as CPU copies that
        training no longer changes."""
        state = {'state_dict': get_state_dict(self.model, self.unwrap_fn), 'optimizer': self.optimizer.state_dict()}
        if self.model_ema is not None:
            state['state_dict_ema'] = get_state_dict(self.model_ema, self.unwrap_fn)
        if (self.model_swa is not None) and (self.model_swa.n_averaged > 0):
            # the module's state dict, which loads into the model as the raw one does; the count as a plain int
            state['state_dict_swa'] = get_state_dict(self.model_swa.module, self.unwrap_fn)
            state['swa_n_averaged'] = int(self.model_swa.n_averaged)
        if self.amp_scaler is not None:
            state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
        return cpu_copy(state)

    def save_epoch(self, epoch: int, metric: float, run_state: dict):
        """`last` (the old one becomes `previous`), plus `checkpoint-E` and `model_best` when it ranks. Once `last`
        holds the finished run, the recovery files go: nothing resumes from them any more.

        Args:
            run_state: snapshot() and the rest of the run's state (progress, RNG states, config, ...).
        """
        self._run_state = run_state
        try:
            self.save_checkpoint(epoch, metric)
        finally:
            self._run_state = None
        if run_state['progress']['epoch'] >= run_state['config']['epochs']:
            self.remove_recovery_files()

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
        names = [str(p) for p in sorted(_recovery_files(run_dir), key=_recovery_key)]
        self.prev_recovery_file = names[-2] if len(names) > 1 else ''
        self.curr_recovery_file = names[-1] if names else ''
        for stale in names[:-2]:
            os.remove(stale)

    def remove_recovery_files(self):
        """Delete this run's recovery files (each a full training state: hundreds of MB for ResNet-50).

        Called after `last` is renamed in and its folder fsync'ed. A failure to delete leaves files, never a run
        that looks unsaved: it is a warning, not an error of the save.
        """
        folder = Path(self.recovery_dir)
        unfinished = folder / ('recovery_tmp' + self.extension)  # timm's name for a write that a kill cut short
        found = sorted(_recovery_files(folder), key=_recovery_key) + ([unfinished] if unfinished.exists() else [])
        try:
            for path in found:
                path.unlink()
        except OSError as e:
            _logger.warning(f'WARNING: could not delete the recovery files of the finished run ({e})')
            return
        self.prev_recovery_file = self.curr_recovery_file = ''
        if found:
            _logger.info(f"Finished run saved: deleted its recovery files ({', '.join(p.name for p in found)})")


def _recovery_files(run_dir: Path) -> list:
    return [p for p in run_dir.glob('recovery-*' + EXTENSION) if RECOVERY_NAME.fullmatch(p.name)]


def _recovery_key(path: Path) -> tuple:
    epoch, step = RECOVERY_NAME.fullmatch(path.name).groups()
    return int(epoch), int(step)


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
        # torch names a refused class "GLOBAL module.name", in wording that varies by version and by why it refused
        name = re.search(r'GLOBAL ([\w.]+)', str(e))
        other = next((line.strip() for line in str(e).splitlines() if 'nsupported' in line), 'content it cannot check')
        refused = name.group(1) if name else other
        raise UserError(f'{path} holds objects that a safe load refuses ({refused[:160]})') from None
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


def run_files(run_dir: Path, suffix: str = '') -> list:
    """The checkpoints of a run folder by our names (set-aside ones with suffix '.corrupt'), without unfinished
    writes; a file of another name (a user's pretrained.pth.tar) is neither resumed nor set aside."""
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.glob('*' + EXTENSION + suffix)
                  if CHECKPOINT_NAME.fullmatch(p.name[:len(p.name) - len(suffix)]))


def not_ours(path, why: str) -> UserError:
    return UserError(f'{path} is not a checkpoint of train.py ({why}); move it out of the run folder, or use '
                     '--initial-checkpoint')


def _position(path: Path) -> tuple:
    """(epoch, step) that a checkpoint of the run folder holds; a one-line UserError for a file another program
    wrote under one of our names (a state dict, timm's checkpoint, a tensor)."""
    state = _torch_load(path, mmap=True)
    progress = state.get('progress') if isinstance(state, dict) else None
    if not (isinstance(progress, dict) and isinstance(progress.get('epoch'), int)
            and isinstance(progress.get('step'), int)):
        raise not_ours(path, 'it holds no training progress' if isinstance(state, dict) else
                       f'it holds a {type(state).__name__}, not a dict')
    return progress['epoch'], progress['step']


def newest_valid(run_dir: Path) -> tuple:
    """(path, state) of the newest checkpoint in run_dir that loads, or (None, None) when there is none.

    Checkpoints are ordered by the training progress they hold, not by file time. A damaged one (truncated,
    corrupt) is renamed to *.corrupt with a warning, and the next newest is tried. A checkpoint that a safe load
    refuses, or one without our training state, is not damaged: that stops the run rather than setting good
    checkpoints aside.
    """
    ranked = []
    for path in run_files(run_dir):
        try:
            ranked.append((_position(path), path.name == 'last' + EXTENSION, path))
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
        raise not_ours(path, 'it holds no record of its data')
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
    if saved.get('train_contents') and current.get('train_contents') \
            and saved['train_contents'] != current['train_contents'] and not changes:
        changes.append('data files: the images under the same names changed (of the first and last files of each '
                       'class, a size or first bytes differ: class folders swapped or images replaced)')
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


def restore(state: dict, model, model_ema, model_swa, optimizer, scaler, same_optimizer: bool) -> Progress:
    """Load a checkpoint's full training state into the components; returns where the run stands.

    Args:
        model_swa: torch's AveragedModel; a checkpoint without SWA weights leaves it empty, to average from the next
            epoch end on (a run saved before its swa_start_epoch, or one that had SWA off).
    """
    model.load_state_dict(state['state_dict'])
    if model_ema is not None:
        if 'state_dict_ema' in state:
            model_ema.module.load_state_dict(state['state_dict_ema'])
        else:
            _logger.warning('WARNING: the checkpoint has no EMA weights; the EMA starts from the current weights')
            model_ema.set(model)
    if (model_swa is not None) and ('state_dict_swa' in state):
        model_swa.module.load_state_dict(state['state_dict_swa'])
        model_swa.n_averaged.fill_(state['swa_n_averaged'])
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
# every name a run writes into its folder: train.py's files and their temporary names (config.save_config,
# reporting: name + '.tmp', curves.png + '.tmp.png'), W&B's folder, the export of wandb_log_model (model/ and the
# names it is swapped through), the checkpoints (set aside as name + '.corrupt')
# and the temporary names of their writes (timm's `tmp` and `recovery_tmp`, our `previous.tmp`)
RUN_FILE_NAME = re.compile('|'.join([
    r'(config\.yaml|summary\.csv|per_class\.csv)(\.tmp)?', r'curves\.png(\.tmp\.png)?', r'log\.txt', r'wandb',
    r'model(\.tmp|\.old)?',
    CHECKPOINT_NAME.pattern + r'(\.corrupt)?', r'(tmp|recovery_tmp|previous\.tmp)' + re.escape(EXTENSION)]))
CONFIG_HEADER = '# resolved configuration'


def run_folder(output: str, experiment: str) -> Path:
    """The run folder output/experiment; an experiment is a name, not a path."""
    if not experiment.strip():
        raise UserError(f'experiment must be a folder name, not blank: {experiment!r}')
    if (experiment in ('.', '..')) or ('/' in experiment) or (os.altsep and os.altsep in experiment) \
            or (os.sep in experiment):
        raise UserError(f'experiment must be a folder name, not a path: {experiment!r}')
    return Path(output) / experiment


class RunFolderLock:
    """Creates the run folder and holds the exclusive lock of one train.py on it: a POSIX record lock (lockf) on
    LOCK_FILE.

    A record lock belongs to the process that took it: the loader workers it forks do not inherit it, so it ends the
    moment the trainer ends, however it ends (an flock belongs to the open file, which the workers of a killed
    trainer kept open for seconds). Its catch: closing any descriptor of LOCK_FILE in this process releases it, so
    nothing else here opens that file.

    close() releases it; so does the garbage collector, for a run that stops with an error before it reaches its
    close(). A run folder that this run created and left empty apart from LOCK_FILE (bad input) is removed then.
    """

    def __init__(self, run_dir: Path):
        for _ in range(3):  # a claim that meets a folder being removed by the run that held it tries again
            created = _make_folder(run_dir)
            file = _open_lock_file(run_dir)
            try:
                fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                file.seek(0)
                holder = file.read().strip() or 'another process'
                file.close()
                if e.errno not in (errno.EACCES, errno.EAGAIN):  # no locks here (an NFS mount without its lock daemon)
                    raise UserError(f'cannot lock the run folder {run_dir}: {e.strerror or e}') from None
                raise UserError(f'{run_dir} is in use by another train.py ({holder}); wait for it to end or stop '
                                'it') from None
            if _same_file(file, run_dir / LOCK_FILE):
                break
            file.close()
        else:
            raise UserError(f'{run_dir} keeps being removed by another train.py; run again once it has ended')
        self._release = weakref.finalize(self, _release_run_folder, file, run_dir, created)
        file.seek(0)
        file.truncate()
        file.write(f'pid {os.getpid()} on {socket.gethostname()}\n')
        file.flush()

    def close(self):
        self._release()


def _make_folder(run_dir: Path) -> bool:
    """Create run_dir (and its parents); True when it did not exist."""
    try:
        run_dir.mkdir(parents=True)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        raise _unwritable(run_dir, e) from None


def _open_lock_file(run_dir: Path):
    try:
        return open(run_dir / LOCK_FILE, 'a+')
    except OSError as e:
        raise _unwritable(run_dir, e) from None


def _unwritable(run_dir: Path, error: OSError) -> Exception:
    """A one-line UserError (exit 2), except for a full disk: train.main() makes that exit 74, as a failed save."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return error
    return UserError(f'cannot write to the run folder {run_dir}: {error.strerror or error}')


def _same_file(file, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(file.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


def _release_run_folder(file, run_dir: Path, created: bool):
    """Release the lock; a run folder that this run created and wrote nothing into goes with it."""
    try:
        if created and ([p.name for p in run_dir.iterdir()] == [LOCK_FILE]):
            os.remove(run_dir / LOCK_FILE)  # while locked: a trainer that opened it already finds it gone, retries
            run_dir.rmdir()
    except OSError:  # another trainer's lock file, or a file written meanwhile: the folder stays
        pass
    finally:
        file.close()


def run_folder_files(run_dir: Path) -> list:
    """The files and folders in run_dir that a run writes, by their exact names."""
    return sorted(p for p in run_dir.iterdir() if RUN_FILE_NAME.fullmatch(p.name)) if run_dir.is_dir() else []


def start_over_files(run_dir: Path, initial_checkpoint: Optional[str]) -> list:
    """What --start-over deletes in run_dir: the files a run writes, and only in a run folder of ours (one whose
    config.yaml train.py wrote); a one-line UserError where it must delete nothing.

    Args:
        initial_checkpoint: the weights the new run starts from; deleting them would leave its config.yaml naming a
            file that is gone, or that the new run overwrites.
    """
    ours = run_folder_files(run_dir)
    if not ours:
        return []
    config = run_dir / 'config.yaml'
    if not (config.is_file() and config.read_text(errors='replace').startswith(CONFIG_HEADER)):
        raise UserError(f'{run_dir} is not a run folder of train.py (no config.yaml of ours): --start-over deletes '
                        'nothing there; pick another --experiment or remove its files yourself')
    if initial_checkpoint:
        given = Path(initial_checkpoint).absolute()
        deleted = {run_dir.resolve() / p.name for p in ours}
        # named through the run folder, or through a link elsewhere that points into it
        if ({given.parent.resolve() / given.name, given.resolve()} & deleted):
            raise UserError(f'--initial-checkpoint {initial_checkpoint} is a file of the run that --start-over '
                            f'deletes: copy it out of {run_dir} first and start from the copy')
    return ours


def clear_run_folder(run_dir: Path, initial_checkpoint: Optional[str] = None):
    """Delete the run in run_dir for --start-over (see start_over_files); anything else in it stays."""
    ours = start_over_files(run_dir, initial_checkpoint)
    for path in ours:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    if ours:
        _logger.info(f'--start-over: deleted the previous run in {run_dir} ({len(ours)} files)')


def weights_from(state: dict, which: str, path, raw_flag: str) -> dict:
    """The raw, EMA or SWA state dict of a checkpoint (or the file itself when it is a plain state dict).

    Args:
        raw_flag: the option that asks for the raw weights, named when the checkpoint has no EMA or SWA weights.
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
    if which == 'swa':
        if 'state_dict_swa' not in state:
            start = (state.get('config') or {}).get('swa_start_epoch')
            why = 'SWA was off in its run' if start is None else f'its run averages from epoch {start} on'
            raise UserError(f'{path} holds no SWA weights ({why}); pass {raw_flag} for its raw weights')
        return state['state_dict_swa']
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
