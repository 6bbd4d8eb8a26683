"""What a run reports: the log, summary.csv (one row per epoch), and the step log line."""
import csv
import io
import logging
import os
import sys
from pathlib import Path

SUMMARY_COLUMNS = (
    'epoch', 'train_loss', 'lr',
    'val_loss', 'val_top1', 'val_top5',
    'ema_val_loss', 'ema_val_top1', 'ema_val_top5',
    'epoch_seconds', 'img_per_sec', 'data_wait',
)
TIMING_COLUMNS = ('epoch_seconds', 'img_per_sec', 'data_wait')


def setup_logging(run_dir: Path, is_primary: bool, rank: int = 0):
    """Log to the terminal and to run_dir/log.txt (appended on resume); other ranks log warnings only."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter('%(asctime)s %(message)s', datefmt='%Y-%m-%d %H:%M:%S')
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(formatter if is_primary else logging.Formatter(f'[rank {rank}] %(message)s'))
    root.addHandler(console)
    if is_primary:
        file_handler = logging.FileHandler(run_dir / 'log.txt')
        file_handler.setFormatter(formatter)
        root.addHandler(file_handler)
    root.setLevel(logging.INFO if is_primary else logging.WARNING)
    logging.getLogger('timm.utils.checkpoint_saver').setLevel(logging.WARNING)  # lists its files every epoch


def duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f'{hours}h{minutes:02d}m' if hours else f'{minutes}m{seconds:02d}s'


def step_line(m: dict) -> str:
    return (f"epoch {m['epoch']} step {m['step']}/{m['steps_per_epoch']}  loss {m['loss']:.5f}  lr {m['lr']:.4g}  "
            f"{m['img_per_sec']:.0f} img/s  data wait {100 * m['data_wait']:.0f}%  "
            f"eta epoch {duration(m['eta_epoch'])} run {duration(m['eta_run'])}")


def epoch_line(row: dict) -> str:
    line = (f"epoch {row['epoch']} done in {duration(row['epoch_seconds'])}: train loss {row['train_loss']:.4f}  "
            f"val top-1 {row['val_top1']:.2f} top-5 {row['val_top5']:.2f} loss {row['val_loss']:.4f}")
    if row.get('ema_val_top1') is not None:
        line += f"  EMA top-1 {row['ema_val_top1']:.2f} top-5 {row['ema_val_top5']:.2f}"
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
