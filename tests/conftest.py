"""Shared fixtures: tiny generated datasets and helpers that run train.py / validate.py in-process or as processes."""
import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# One intra-op thread in every test process and in the processes they start: the suite's tensors are too small for a
# second thread to help (tests/test_train.py's runs took 19.9 s with one, 19.3 s with two, on 2 idle cores), and
# pytest-xdist runs one test process per core (pytest.ini), which two threads each would oversubscribe.
os.environ.setdefault('OMP_NUM_THREADS', '1')
import torch  # noqa: E402

import train  # noqa: E402
from training import builtin_data  # noqa: E402
from training.reporting import read_summary  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# timm's model for tests: a ResNet of BasicBlocks (BatchNorm, drop path) with 0.37 M parameters. A step of 16 images of
# 32 px takes 13 ms (resnet18: 51 ms) and a checkpoint with EMA and AdamW's state 6 MB (resnet18: 180 MB), which most
# tests write several times. The tests of our own architecture's path name it: --model resnet50_custom
MODEL = 'test_resnet'
# well under a second per epoch on 2 CPU cores: 80 training images of 32 px, 5 steps of 16
TINY = ['--model', MODEL, '--img-size', '32', '--crop-pct', '1.0', '-b', '16', '--epochs', '2', '--device', 'cpu',
        '-j', '0', '--opt', 'adamw', '--lr', '1.0e-3', '--weight-decay', '0.05', '--warmup-epochs', '0',
        '--log-interval', '1', '--recovery-minutes', '0', '--model-ema', '--model-ema-decay', '0.8', '--scale', '0.5',
        '1.0', '--checkpoint-hist', '1']


@pytest.fixture(scope='session')
def shapes(tmp_path_factory) -> Path:
    """10 classes, 8 training and 5 validation images each, 32 px."""
    root = tmp_path_factory.mktemp('data') / 'shapes'
    return builtin_data.generate(root, seed=0, train_per_class=8, val_per_class=5, image_size=32)


def run_args(data: Path, output: Path, *args: str, experiment: str = 'run') -> list:
    return ['--data-dir', str(data), '--output', str(output), '--experiment', experiment, *TINY, *args]


def run_train(data: Path, output: Path, *args: str, experiment: str = 'run') -> int:
    """train.py in this process; returns its exit code."""
    return train.main(run_args(data, output, *args, experiment=experiment))


def run_captured(data: Path, output: Path, *args: str) -> tuple:
    """train.py in this process, with what it prints: (exit code, output). For a run to its end, which needs no
    process of its own (no signal to send it), and so no process start-up (3 s: torch, torchvision and timm)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = run_train(data, output, *args)
    return rc, out.getvalue()


def spawn_train(data: Path, output: Path, *args: str, experiment: str = 'run', env: dict = None) -> subprocess.Popen:
    """train.py as a child process whose output (stdout + stderr) can be read line by line."""
    command = [sys.executable, str(REPO / 'train.py'), '--data-dir', str(data), '--output', str(output),
               '--experiment', experiment, *TINY, *args]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})


def run_until(data: Path, output: Path, pattern: str, sig: int, *args: str) -> tuple:
    """train.py as a child process, sent `sig` once a line it prints matches `pattern`: (exit code, output)."""
    proc = spawn_train(data, output, *args)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.search(pattern, line):
            proc.send_signal(sig)
            break
    lines.append(proc.stdout.read())
    return proc.wait(), ''.join(lines)


def summary(run_dir: Path) -> list:
    return read_summary(run_dir / 'summary.csv')


def load(path: Path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def lr_schedule(config: dict, steps_per_epoch: int):
    """step -> the lr of that optimizer step under the run's scheduler, as train() and the loop set it."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config['lr'])
    scheduler = train.build_scheduler(config, optimizer, steps_per_epoch)

    def lr_at(step: int) -> float:
        scheduler.step_update(num_updates=step)
        return optimizer.param_groups[0]['lr']
    return lr_at
