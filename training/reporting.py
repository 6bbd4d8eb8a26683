"""What a run reports: the log, a terminal progress line, summary.csv, curves.png, and Weights & Biases."""
import csv
import io
import logging
import logging.handlers
import math
import netrc
import os
import secrets
import string
import sys
import threading
import time
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from . import per_class

_logger = logging.getLogger(__name__)

SUMMARY_COLUMNS = (
    'epoch', 'train_loss', 'lr', 'img_size',
    'val_loss', 'val_top1', 'val_top5',
    'ema_val_loss', 'ema_val_top1', 'ema_val_top5',
    'swa_val_loss', 'swa_val_top1', 'swa_val_top5',  # empty before swa_start_epoch
    'epoch_seconds', 'img_per_sec', 'data_wait', 'bad_images',
    'gpu_hours', 'total_gpu_hours', 'cost', 'total_cost',  # the epoch's and the run's so far; cost: with price_per_hour
)
TIMING_COLUMNS = ('epoch_seconds', 'img_per_sec', 'data_wait', 'gpu_hours', 'total_gpu_hours', 'cost', 'total_cost')
WANDB_START_WAIT = 300  # seconds the end of a run waits for a W&B start still under way
CURVES_INTERVAL = 60  # seconds between drawings of curves.png during a run: each costs training ~0.3 s of CPU


class TerminalProgress:
    """A progress line with ETA, redrawn in place on an interactive terminal; nothing at all elsewhere, so log files
    and pipes get only whole log lines."""

    def __init__(self, stream=sys.stderr, wanted: bool = True, min_interval: float = 0.25):
        self.stream = stream
        self.enabled = wanted and stream.isatty()
        self.min_interval = min_interval
        self.shown = False
        self.last = 0.0

    def show(self, text: str, force: bool = False):
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < self.min_interval):
            return
        self.stream.write('\r\x1b[K' + text)
        self.stream.flush()
        self.shown, self.last = True, now

    def clear(self):
        if self.shown:
            self.stream.write('\r\x1b[K')
            self.stream.flush()
            self.shown = False


class _ConsoleHandler(logging.StreamHandler):
    """Clears the progress line before a log line, so the two never mix."""

    def __init__(self, stream, progress: TerminalProgress):
        super().__init__(stream)
        self.progress = progress

    def emit(self, record):
        self.progress.clear()
        super().emit(record)


LOG_FORMAT = logging.Formatter('%(asctime)s %(message)s', datefmt='%Y-%m-%d %H:%M:%S')


def setup_logging(is_primary: bool, rank: int = 0) -> TerminalProgress:
    """Log to the terminal; other ranks log warnings only. Until log_to_file() names the run folder, rank 0's lines
    are also kept in memory, so that log.txt gets them all.

    Returns:
        The terminal progress line (disabled when not on a terminal, and on ranks other than 0).
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    progress = TerminalProgress(wanted=is_primary)
    console = _ConsoleHandler(sys.stdout, progress)
    console.setFormatter(LOG_FORMAT if is_primary else logging.Formatter(f'[rank {rank}] %(message)s'))
    root.addHandler(console)
    if is_primary:
        root.addHandler(logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1))
    root.setLevel(logging.INFO if is_primary else logging.WARNING)
    logging.getLogger('timm.utils.checkpoint_saver').setLevel(logging.WARNING)  # lists its files every epoch
    return progress


def log_to_file(run_dir: Path):
    """From now on also log to run_dir/log.txt (appended on resume), starting with the lines kept so far."""
    root = logging.getLogger()
    file_handler = logging.FileHandler(run_dir / 'log.txt')
    file_handler.setFormatter(LOG_FORMAT)
    for handler in [h for h in root.handlers if isinstance(h, logging.handlers.MemoryHandler)]:
        handler.setTarget(file_handler)
        handler.flush()
        root.removeHandler(handler)
        handler.close()
    root.addHandler(file_handler)


def duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f'{days}d{hours:02d}h'
    return f'{hours}h{minutes:02d}m' if hours else f'{minutes}m{seconds:02d}s'


def step_line(m: dict) -> str:
    parts = f" (task {m['task_loss']:.5f}, kd {m['kd_loss']:.5f})" if 'kd_loss' in m else ''
    return (f"epoch {m['epoch']} step {m['step']}/{m['steps_per_epoch']}  loss {m['loss']:.5f}{parts}  "
            f"lr {m['lr']:.4g}  {m['img_per_sec']:.0f} img/s  data wait {100 * m['data_wait']:.0f}%  "
            f"eta epoch {duration(m['eta_epoch'])} run {duration(m['eta_run'])}")


def progress_line(epoch: int, epochs: int, step: int, steps: int, seconds_per_step: float) -> str:
    width = 24
    done = int(width * step / steps)
    left_epoch = (steps - step) * seconds_per_step
    left_run = left_epoch + (epochs - epoch - 1) * steps * seconds_per_step
    return (f'epoch {epoch} of {epochs} [{"=" * done}{" " * (width - done)}] {100 * step / steps:3.0f}% '
            f'{step}/{steps}  eta epoch {duration(left_epoch)} run {duration(left_run)}')


def cost_words(row: dict, unit: str = 'GPU') -> str:
    """'13.4 GPU-hours, $40.20': the run's total so far at a summary row (hours alone without a price)."""
    hours = row.get('total_gpu_hours') or 0.0
    words = f'{hours:,.1f} {unit}-hours' if hours >= 0.1 else f'{hours:.3f} {unit}-hours'
    return words + (f", ${row['total_cost']:,.2f}" if row.get('total_cost') is not None else '')


def epoch_line(row: dict, unit: str = 'GPU') -> str:
    line = (f"epoch {row['epoch']} done in {duration(row['epoch_seconds'])}: train loss {row['train_loss']:.4f}  "
            f"val top-1 {row['val_top1']:.2f} top-5 {row['val_top5']:.2f} loss {row['val_loss']:.4f}")
    for kind in ('ema', 'swa'):
        if row.get(f'{kind}_val_top1') is not None:
            line += f"  {kind.upper()} top-1 {row[f'{kind}_val_top1']:.2f} top-5 {row[f'{kind}_val_top5']:.2f}"
    if row.get('total_gpu_hours') is not None:
        line += f'  ({cost_words(row, unit)} so far)'
    return line


def write_summary(run_dir: Path, history: list):
    """Rewrite summary.csv from the run's history (kept in every checkpoint, so it matches the resumed state)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, lineterminator='\n')
    writer.writeheader()
    for row in history:
        writer.writerow({k: ('' if row.get(k) is None else row[k]) for k in SUMMARY_COLUMNS})
    tmp = run_dir / 'summary.csv.tmp'
    tmp.write_text(buffer.getvalue())
    os.replace(tmp, run_dir / 'summary.csv')


def read_summary(path) -> list:
    """summary.csv rows as dicts of floats (None where empty)."""
    with open(path, newline='') as f:
        return [{k: (float(v) if v not in ('', None) else None) for k, v in row.items()} for row in csv.DictReader(f)]


def ranking_metric(row: dict, metric: str) -> tuple:
    """(value, weights kind) of the best of the raw, EMA and SWA weights evaluated for the ranking metric; a tie
    goes to the first of raw, ema, swa."""
    candidates = [(row[f'val_{metric}'], 'raw')]
    for kind in ('ema', 'swa'):
        if row.get(f'{kind}_val_{metric}') is not None:
            candidates.append((row[f'{kind}_val_{metric}'], kind))
    return (min if metric == 'loss' else max)(candidates, key=lambda c: c[0])


def best_of(history: list, metric: str) -> tuple:
    """(value, weights kind, epoch) of the best epoch of a run."""
    ranked = [(*ranking_metric(row, metric), int(row['epoch'])) for row in history]
    return (min if metric == 'loss' else max)(ranked, key=lambda r: r[0])


def plot_runs(runs: dict, path: Path):
    """One PNG (1200x800 px) of per-epoch curves: val top-1 (raw solid, EMA dashed, SWA dotted), val loss, train
    loss, lr.

    Args:
        runs: {label: summary rows}; one run gives its curves.png, several are overlaid.
    """
    fig = Figure(figsize=(12, 8), dpi=100)  # not pyplot: its global state is not for threads
    axes = fig.subplots(2, 2)
    panels = [(axes[0, 0], 'val_top1', 'validation top-1 (%)'), (axes[0, 1], 'val_loss', 'validation loss'),
              (axes[1, 0], 'train_loss', 'train loss'), (axes[1, 1], 'lr', 'learning rate (end of epoch)')]
    for i, (label, rows) in enumerate(runs.items()):
        colour = f'C{i % 10}'
        epochs = [r['epoch'] for r in rows]
        for ax, column, _ in panels:
            ax.plot(epochs, [r[column] for r in rows], color=colour, marker='.', label=label)
            for kind, style in (('ema', '--'), ('swa', ':')):
                averaged = [r.get(f'{kind}_{column}') for r in rows]
                if column.startswith('val_') and any(v is not None for v in averaged):
                    # SWA starts late: its epochs before swa_start_epoch are gaps, and a lone epoch a marker
                    ax.plot(epochs, [math.nan if v is None else v for v in averaged], color=colour, linestyle=style,
                            marker='.', label=f'{label} ({kind.upper()})')
    for ax, _, title in panels:
        ax.set_title(title)
        ax.set_xlabel('epoch')
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize='small')
    fig.tight_layout()
    tmp = path.with_name(path.name + '.tmp.png')
    fig.savefig(tmp)
    os.replace(tmp, path)


def _has_wandb_key() -> bool:
    if os.environ.get('WANDB_API_KEY'):
        return True
    host = urlparse(os.environ.get('WANDB_BASE_URL', 'https://api.wandb.ai')).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def environment(world_size: int) -> dict:
    cuda = torch.cuda.is_available()
    return dict(gpu=torch.cuda.get_device_name(0) if cuda else None, gpus_per_node=torch.cuda.device_count(),
                world_size=world_size, cpus=os.cpu_count(), python=sys.version.split()[0])


def new_wandb_run_id() -> str:
    """A W&B run id (8 base-36 characters, as W&B makes them), chosen before W&B starts so that it is known at once."""
    return ''.join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _setup_wandb():
    import wandb
    wandb.setup()


def _start_wandb(init_args: dict):
    """wandb.init: online when there is an API key; offline without one, or when the online start fails (after W&B's
    init_timeout, 90 s unless WANDB_INIT_TIMEOUT says otherwise)."""
    import wandb
    settings = wandb.Settings(console='off')
    mode = os.environ.get('WANDB_MODE')
    if (mode is None) and not _has_wandb_key():
        mode = 'offline'
        _logger.warning('WARNING: no W&B API key found: logging to W&B offline')
    try:
        return wandb.init(mode=mode, settings=settings, **init_args)
    except Exception as e:
        if mode == 'offline':
            raise
        _logger.warning(f'WARNING: W&B online start failed ({str(e).splitlines()[0][:200]}); logging offline instead')
    wandb.teardown()  # W&B's service still holds the failed run's id, which the offline run reuses
    return wandb.init(mode='offline', settings=settings, **init_args)


class WandbLogger:
    """Weights & Biases logging for rank 0 that neither holds up nor stops training.

    W&B starts in a background thread, so a slow or unresponsive server never delays the first steps: what is logged
    before it is up waits here and is sent, in order, once it is. The run id is chosen up front, so checkpoints hold
    it from the first save and a resume continues the same W&B run. Runs are named by experiment and grouped by
    recipe, so the runs of one recipe line up. Without an API key, or when the online start fails, it logs offline
    into the run folder, to be uploaded with `wandb sync`. A failure warns once and turns W&B off.
    """

    def __init__(self, config: dict, run_dir: Path, run_id: Optional[str], extra_config: dict):
        # a sweep agent names the trial's run in WANDB_RUN_ID (and a user may, to continue a run of theirs)
        self.run_id = run_id or os.environ.get('WANDB_RUN_ID') or new_wandb_run_id()
        self.run = None
        self.offline = False
        self._off = False  # once W&B failed or finished: nothing more is sent
        self._waiting = []  # what was logged before the run was up, as calls to make on it
        self._lock = threading.Lock()  # orders the calls of the training thread and of the start
        init_args = dict(
            project=config['wandb_project'], entity=config['wandb_entity'], dir=str(run_dir),
            name=config['wandb_name'] or (None if os.environ.get('WANDB_SWEEP_ID') else config['experiment']),
            group=config['wandb_group'] or config['recipe'] or config['experiment'],
            tags=config['wandb_tags'], config=extra_config, id=self.run_id, resume='allow')
        self._starting = threading.Thread(target=self._start, args=(init_args,), name='wandb-start', daemon=True)
        try:
            # W&B's service process starts here, in this thread, before any loader worker is forked: a worker forked
            # while subprocess.Popen waits on its exec-error pipe inherits that pipe, and Popen then waits for the
            # worker to exit (the end of the run), holding W&B's start and its data
            _setup_wandb()
        except Exception as e:
            with self._lock:
                self._fail(e)
            return
        self._starting.start()

    def _start(self, init_args: dict):
        try:
            run = _start_wandb(init_args)
            run.define_metric('epoch')
            run.define_metric('epoch/*', step_metric='epoch')
        except Exception as e:
            with self._lock:
                self._fail(e)
            return
        with self._lock:
            if self._off:  # finish() stopped waiting for it
                return
            self.run, self.offline = run, (run.settings.mode == 'offline') or run.offline
            waiting, self._waiting = self._waiting, []
            for call in waiting:
                self._apply(call)

    def _fail(self, error: Exception):
        """Warn once and drop W&B for the rest of the run; called with the lock held."""
        if not self._off:
            _logger.warning(f'WARNING: W&B failed ({type(error).__name__}: {str(error)[:200]}); W&B logging is off '
                            'for the rest of this run, training goes on')
        self._off, self.run, self._waiting = True, None, []

    def _apply(self, call):
        if self._off:
            return
        try:
            call(self.run)
        except Exception as e:
            self._fail(e)

    def _send(self, call):
        """Make a call on the W&B run now, or once it is up."""
        with self._lock:
            if self._off:
                return
            if self.run is None:
                self._waiting.append(call)
            else:
                self._apply(call)

    def log_step(self, metrics: dict):
        """Training metrics of a log line, at step = global optimizer step."""
        data = {f'train/{k}': metrics[k] for k in ('loss', 'task_loss', 'kd_loss', 'lr', 'img_per_sec', 'data_wait')
                if k in metrics}
        data['epoch_progress'] = metrics['epoch'] + metrics['step'] / metrics['steps_per_epoch']
        self._send(lambda run: run.log(data, step=metrics['global_step']))

    def log_epoch(self, row: dict, global_step: int):
        """A summary.csv row as epoch/<column>, plotted against `epoch`."""
        data = {f'epoch/{k}': v for k, v in row.items() if k != 'epoch' and v is not None}
        data['epoch'] = row['epoch']
        self._send(lambda run: run.log(data, step=global_step))

    def set_best(self, metric: str, value: float, weights: str, epoch: int, global_step: int):
        """The best epoch so far by the metric that ranks checkpoints (eval_metric): best/<metric> and best/epoch in
        the history at the epoch's step (a sweep's metric, which Hyperband reads epoch by epoch), and with best/weights
        in the run's summary."""
        best = {f'best/{metric}': value, 'best/epoch': epoch}
        self._send(lambda run: (run.log(best, step=global_step), run.summary.update({'best/weights': weights})))

    def log_model(self, folder: Path, aliases: list, metadata: dict):
        """An export folder as the run's model artifact, model-<run id> of type model (W&B versions it, and moves
        each alias to the newest version that has it). The files are copied to W&B's staging area now, so a later
        export into the same folder cannot change what this one logs, even while W&B is still starting."""
        import wandb
        artifact = wandb.Artifact(f'model-{self.run_id}', type='model', metadata=metadata)
        artifact.add_dir(str(folder))
        self._send(lambda run: run.log_artifact(artifact, aliases=aliases))

    def log_table(self, key: str, rows: list, global_step: int):
        """Rows (dicts with the same keys) as a W&B Table under key, at global_step."""
        def send(run):
            import wandb
            run.log({key: wandb.Table(columns=list(rows[0]), data=[list(row.values()) for row in rows])},
                    step=global_step)
        self._send(send)

    def finish(self):
        """Close the W&B run, first waiting for a start still under way so that what was logged reaches it."""
        if self._starting.is_alive():
            _logger.info(f'Waiting for W&B to start (at most {WANDB_START_WAIT} s) to hand it what this run logged')
            self._starting.join(WANDB_START_WAIT)
        with self._lock:
            if self.run is None:
                self._fail(TimeoutError(f'W&B did not start within {WANDB_START_WAIT} s of the end of training'))
                return
            directory = self.run.dir.rsplit('/files', 1)[0] if self.run.dir else ''
            self._apply(lambda run: run.finish())
            offline = self.offline and not self._off
            self._off, self.run = True, None
        if offline:
            _logger.info(f'W&B logged offline; upload with: wandb sync {directory}')


class Reporter:
    """What a run reports as it goes, on rank 0 only: log lines, the terminal progress line, summary.csv,
    curves.png and W&B."""

    def __init__(self, run_dir: Path, is_primary: bool, progress: TerminalProgress, epochs: int,
                 wandb_logger: Optional[WandbLogger] = None, unit: str = 'GPU'):
        self.run_dir = run_dir
        self.unit = unit  # what the run's hours are hours of
        self.is_primary = is_primary
        self.progress = progress
        self.epochs = epochs
        self.wandb = wandb_logger
        self.step_time = None
        self.last_tick = None
        self.plotting = None  # the thread drawing curves.png
        self.plotted_at = None  # when the last drawing started
        self.undrawn = None  # summary rows newer than curves.png, drawn by finish()

    def step(self, metrics: dict):
        _logger.info(step_line(metrics))
        if self.wandb is not None:
            self.wandb.log_step(metrics)

    def tick(self, epoch: int, step: int, steps_per_epoch: int):
        """After every optimizer step: refresh the terminal progress line (costs nothing elsewhere)."""
        if not self.progress.enabled:
            return
        now = time.monotonic()
        if self.last_tick is not None:
            elapsed = now - self.last_tick
            self.step_time = elapsed if self.step_time is None else 0.9 * self.step_time + 0.1 * elapsed
        self.last_tick = now
        if self.step_time is not None:
            self.progress.show(progress_line(epoch, self.epochs, step, steps_per_epoch, self.step_time),
                               force=step == steps_per_epoch)

    def epoch(self, row: dict, history: list, global_step: int):
        self.last_tick = None  # evaluation time is not step time
        _logger.info(epoch_line(row, self.unit))
        if self.wandb is not None:
            self.wandb.log_epoch(row, global_step)
        self.files(history)

    def files(self, history: list):
        """summary.csv and curves.png of the run so far (also rewritten on resume, from the checkpoint).

        curves.png is drawn by a thread while training goes on, one drawing at a time, at most once every
        CURVES_INTERVAL seconds (short epochs would otherwise spend a few percent of their time drawing); finish()
        draws the newest rows.
        """
        if not self.is_primary:
            return
        write_summary(self.run_dir, history)
        if not history:
            return
        self.undrawn = [dict(row) for row in history]
        if (self.plotted_at is None) or (time.monotonic() - self.plotted_at >= CURVES_INTERVAL):
            self._draw()

    def _draw(self):
        self.wait_for_plot()
        self.plotting = threading.Thread(target=plot_runs, args=({self.run_dir.name: self.undrawn},
                                                                 self.run_dir / 'curves.png'))
        self.plotting.start()
        self.plotted_at, self.undrawn = time.monotonic(), None

    def wait_for_plot(self):
        if self.plotting is not None:
            self.plotting.join()
            self.plotting = None

    def best(self, metric: str, value: float, weights: str, epoch: int, global_step: int):
        if self.wandb is not None:
            self.wandb.set_best(metric, value, weights, epoch, global_step)

    def class_top1(self, rows: list, epoch: int, global_step: int):
        """Top-1 per class at the end of a run (per_class.class_rows): the worst classes in the log, per_class.csv,
        and the W&B table per_class."""
        if not self.is_primary:
            return
        _logger.info(per_class.worst_line(rows, f'final epoch {epoch}'))
        per_class.write_csv(self.run_dir / 'per_class.csv', rows)
        if self.wandb is not None:
            self.wandb.log_table('per_class', rows, global_step)

    def finish(self):
        self.progress.clear()
        if self.undrawn:
            self._draw()
        self.wait_for_plot()
        if self.wandb is not None:
            self.wandb.finish()
