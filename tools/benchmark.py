#!/usr/bin/env python
"""Measurements quoted in the README and issue notes.

    python tools/benchmark.py throughput [--img-size 64 -b 32 --steps 40]   train.py vs a bare training loop
    python tools/benchmark.py checkpoint                                      size and write/load time of a checkpoint
    python tools/benchmark.py sigterm [--img-size 224 -b 16]                  SIGTERM to exit, with a recovery save
"""
import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV2

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import model_defs  # noqa: E402,F401
from training import builtin_data  # noqa: E402
from training.checkpoint import fsync_write  # noqa: E402


def bare_loop(img_size: int, batch: int, steps: int, ema: bool) -> float:
    """img/s of forward, backward and SGD step on random tensors: the compute-only ceiling."""
    torch.manual_seed(0)
    model = timm.create_model('resnet50_custom', num_classes=10)
    optimizer = create_optimizer_v2(model, opt='momentum', lr=0.01, weight_decay=1e-4)
    model_ema = ModelEmaV2(model, decay=0.999) if ema else None
    x, y = torch.randn(batch, 3, img_size, img_size), torch.randint(0, 10, (batch,))
    warmup = 5
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if model_ema is not None:
            model_ema.update(model)
    return steps * batch / (time.perf_counter() - start)


def train_py(img_size: int, batch: int, steps: int, workers: int, ema: bool, data: Path) -> tuple:
    """Steady-state img/s and data-wait share of train.py's log lines after the first window."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, str(REPO / 'train.py'), '--data-dir', str(data), '--output', out,
                   '--img-size', str(img_size), '-b', str(batch), '--epochs', '1', '--device', 'cpu',
                   '-j', str(workers), '--opt', 'momentum', '--lr', '0.01', '--log-interval', '5',
                   '--recovery-minutes', '0', '--model-ema' if ema else '--no-model-ema']
        log = subprocess.run(command, capture_output=True, text=True, cwd=REPO).stdout
    lines = re.findall(r'step (\d+)/\d+ .* (\d+) img/s  data wait (\d+)%', log)
    steady = [(float(speed), float(wait)) for step, speed, wait in lines if 5 < int(step) <= steps][:-1]
    if not steady:
        raise SystemExit(f'no step lines in the train.py output:\n{log}')
    return sum(s for s, _ in steady) / len(steady), sum(w for _, w in steady) / len(steady)


def throughput(args):
    with tempfile.TemporaryDirectory() as tmp:
        per_class = (args.steps + 10) * args.batch_size // 10 + 1
        data = builtin_data.generate(Path(tmp) / 'shapes', train_per_class=per_class, val_per_class=2,
                                     image_size=args.img_size)
        for ema in (False, True):
            ceiling = bare_loop(args.img_size, args.batch_size, args.steps, ema)
            speed, wait = train_py(args.img_size, args.batch_size, args.steps, args.workers, ema, data)
            print(f'{args.img_size} px, batch {args.batch_size}, EMA {ema}: bare loop {ceiling:.1f} img/s, '
                  f'train.py {speed:.1f} img/s ({100 * speed / ceiling:.0f}%), data wait {wait:.0f}%')


def checkpoint(args):
    model = timm.create_model('resnet50_custom')
    optimizer = create_optimizer_v2(model, opt='momentum', lr=0.1, weight_decay=1e-4)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    optimizer.step()  # creates the momentum buffers
    state = {'state_dict': model.state_dict(), 'state_dict_ema': ModelEmaV2(model).module.state_dict(),
             'optimizer': optimizer.state_dict()}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / 'checkpoint.pth.tar'
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fsync_write(state, path)
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        torch.load(path, map_location='cpu', weights_only=True)
        load_time = time.perf_counter() - start
        size = path.stat().st_size
    print(f'ResNet-50, 1000 classes, EMA and SGD momentum: {size / 1e6:.0f} MB, write + fsync '
          f'{min(times):.2f}-{max(times):.2f} s, load {load_time:.2f} s')


def sigterm(args):
    with tempfile.TemporaryDirectory() as tmp:
        data = builtin_data.generate(Path(tmp) / 'shapes', train_per_class=20, val_per_class=2, image_size=64)
        command = [sys.executable, str(REPO / 'train.py'), '--data-dir', str(data), '--output', tmp,
                   '--img-size', str(args.img_size), '-b', str(args.batch_size), '--epochs', '5', '--device', 'cpu',
                   '-j', '1', '--model-ema', '--log-interval', '1', '--num-classes', '10']
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        for line in proc.stdout:
            if 'step 2/' in line:
                break
        start = time.perf_counter()
        os.kill(proc.pid, signal.SIGTERM)
        rest = proc.stdout.read()
        code = proc.wait()
        elapsed = time.perf_counter() - start
    saved = re.search(r'Saving recovery checkpoint (\S+)', rest)
    print(f'{args.img_size} px, batch {args.batch_size}, EMA: SIGTERM to exit {elapsed:.1f} s, exit code {code}, '
          f'saved {saved.group(1) if saved else "nothing"}')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='what', required=True)
    p = sub.add_parser('throughput')
    p.add_argument('--img-size', type=int, default=64)
    p.add_argument('-b', '--batch-size', type=int, default=32)
    p.add_argument('--steps', type=int, default=40)
    p.add_argument('-j', '--workers', type=int, default=1)
    p = sub.add_parser('checkpoint')
    p.add_argument('--dir', default=None, help='where to write (default: the temp folder)')
    p = sub.add_parser('sigterm')
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('-b', '--batch-size', type=int, default=16)
    args = parser.parse_args()
    {'throughput': throughput, 'checkpoint': checkpoint, 'sigterm': sigterm}[args.what](args)


if __name__ == '__main__':
    main()
