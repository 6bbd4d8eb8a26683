#!/usr/bin/env python
"""Measurements quoted in docs/benchmarks.md, docs/input-pipeline.md and issue notes.

    python tools/benchmark.py pipeline [--data DIR | --images N] [--img-size 224 -b 256 -j 14 --compile --out F.md]
            [--auto-augment rand-m6-mstd0.5-inc1] [--kd-teacher MODEL]
        compute ceiling, each loader alone and train.py's steady state (decode: auto's choice, each path of an
        auto-augment, with a distillation teacher's forward in each step), side by side, on the machine at hand
    python tools/benchmark.py workers [--sizes 160 224 --auto-augment STR]   loader workers' images per CPU-second
    python tools/benchmark.py augment-ops [--sizes 160 224 -b 256]   each auto-augment op: PIL per image, device per
        batch
    python tools/benchmark.py jpegs --images N [--cache DIR]      make (or find) the ImageNet-like JPEG set
    python tools/benchmark.py vs-timm --timm-train PATH [--epochs 20 -b 64 --img-size 32 -j 2]
        timm's own train.py and ours on the same recipe and data: wall time, step speed, overhead, top-1
    python tools/benchmark.py methods [--img-size 64 -b 16]        what SE, a distillation teacher and SWA add to a step
    python tools/benchmark.py checkpoint                           size and write/load time of a checkpoint
    python tools/benchmark.py sigterm [--img-size 224 -b 16]       SIGTERM to exit, with a recovery save
"""
import argparse
import gc
import importlib.util
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import PIL
import timm
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw, ImageFilter
from timm.data import create_loader
from timm.models import create_model
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import model_defs  # noqa: E402,F401  registers resnet50_custom
from train import build_optimizer  # noqa: E402
from training import builtin_data  # noqa: E402
from training.checkpoint import fsync_write  # noqa: E402
from training.config import UserError, parse_config  # noqa: E402
from training.data import (AUTO_AUGMENT_OPS, BatchLayout, apply_auto_augment_ops, create_train_loader,  # noqa: E402
                           data_config, open_image_folder)
from training.distributed import Processes, keep_freed_cpu_memory, pick_device  # noqa: E402
from training.reporting import read_summary  # noqa: E402

RECIPE = REPO / 'recipes' / 'rn50_130ep.yaml'  # the augmentation and model every pipeline row uses
QUICKSTART = REPO / 'recipes' / 'quickstart.yaml'  # the recipe of the vs-timm comparison
DEFAULT_CACHE = Path(tempfile.gettempdir()) / 'rn50-benchmark'

# ---------------------------------------------------------------------------------------------------------------
# ImageNet-like JPEGs: the size, file size and decoding cost of ImageNet's training images

WIDTHS, HEIGHTS = (300, 500), (250, 450)  # px, inclusive
JPEG_QUALITY = 90


def _smooth_field(rng: np.random.Generator, width: int, height: int, cell: int, sigma: float) -> np.ndarray:
    """Gaussian noise on a grid of `cell` px, interpolated: structure at that scale and no finer."""
    coarse = rng.normal(0, sigma, size=(height // cell + 2, width // cell + 2)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))


def draw_photo(rng: np.random.Generator) -> Image.Image:
    """A photo-like picture: a smooth colour background, blurred shapes, patches of multi-scale texture, mild
    noise. At quality 90 it encodes to ~70 KB like an ImageNet JPEG (plain random noise would give ~300 KB)."""
    width, height = int(rng.integers(WIDTHS[0], WIDTHS[1] + 1)), int(rng.integers(HEIGHTS[0], HEIGHTS[1] + 1))
    corners = rng.integers(0, 256, size=(int(rng.integers(2, 6)), int(rng.integers(2, 6)), 3), dtype=np.uint8)
    img = Image.fromarray(corners).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(8, 25))):
        x0, y0 = rng.uniform(-0.2, 1.0) * width, rng.uniform(-0.2, 1.0) * height
        x1, y1 = x0 + rng.uniform(0.05, 0.6) * width, y0 + rng.uniform(0.05, 0.6) * height
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.polygon([tuple(p) for p in rng.uniform((x0, y0), (x1, y1), size=(3, 2))], fill=colour)
    pixels = np.asarray(img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5))), dtype=np.float32)
    # foliage-like texture in some regions, as in real photos; it is what gives the file its size
    where = np.clip(_smooth_field(rng, width, height, 64, 1.0) + 0.8, 0.0, 2.0)
    texture = sum(_smooth_field(rng, width, height, cell, 28.0) for cell in (8, 3, 1)) * where
    pixels = pixels + texture[..., None] + rng.normal(0, 3.0, size=pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write_photos(job: tuple):
    folder, split, seed, first, last, classes = job
    for i in range(first, last):
        rng = np.random.default_rng([seed, int(split == 'val'), i])
        path = Path(folder) / split / f'n{i % classes:08d}' / f'{i:07d}.JPEG'
        draw_photo(rng).save(path, quality=JPEG_QUALITY)


def imagenet_like(cache: Path, images: int, seed: int = 0, processes: Optional[int] = None) -> Path:
    """Find or write cache/<parameters>/{train,val}/<class>/*.JPEG: `images` training images in min(1000, images // 20)
    classes and one validation image per class. Written in parallel; the folder appears complete or not at all."""
    classes = min(1000, max(2, images // 20))
    root = Path(cache) / f'jpegs-{images}-{classes}-q{JPEG_QUALITY}-seed{seed}'
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f'.{root.name}-', dir=root.parent))
    try:
        for split in ('train', 'val'):
            for c in range(classes):
                (staging / split / f'n{c:08d}').mkdir(parents=True)
        processes = processes or os.cpu_count()
        chunk = max(1, math.ceil(images / (4 * processes)))
        jobs = [(str(staging), 'train', seed, first, min(first + chunk, images), classes)
                for first in range(0, images, chunk)]
        jobs.append((str(staging), 'val', seed, 0, classes, classes))
        with ProcessPoolExecutor(processes) as pool:
            list(pool.map(_write_photos, jobs))
        os.replace(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


@dataclass
class JpegStats:
    count: int
    mean_kb: float
    mean_width: float
    mean_height: float


def jpeg_stats(folder: Path, sample: int = 200) -> JpegStats:
    """File count of a folder tree of JPEGs, and the sizes (bytes, pixels) of an evenly spread sample of them."""
    files = sorted(p for p in folder.rglob('*') if p.suffix.lower() in ('.jpeg', '.jpg'))
    if not files:
        raise UserError(f'no JPEGs under {folder}')
    picked = files[::max(1, len(files) // sample)]
    sizes = []
    for path in picked:
        with Image.open(path) as img:
            sizes.append(img.size)
    widths, heights = zip(*sizes)
    return JpegStats(len(files), float(np.mean([p.stat().st_size for p in picked])) / 1e3, float(np.mean(widths)),
                     float(np.mean(heights)))


def jpegs(args):
    start = time.perf_counter()
    root = imagenet_like(args.cache, args.images)
    stats = jpeg_stats(root / 'train')
    print(f'{root}: {stats.count} training JPEGs, mean {stats.mean_width:.0f} x {stats.mean_height:.0f} px, '
          f'{stats.mean_kb:.0f} KB ({time.perf_counter() - start:.1f} s)')


# ---------------------------------------------------------------------------------------------------------------
# pipeline: compute ceiling, loaders alone, train.py, side by side


@dataclass
class Row:
    what: str
    workers: Optional[int]
    img_per_sec: Optional[float] = None
    data_wait: Optional[float] = None
    note: str = ''  # how it was measured, or why it could not be
    seconds: float = 0.0  # what measuring it took


def recipe_config(data: Path, args, device: torch.device, *flags: str) -> dict:
    """The recipe's configuration at this run's size, batch, workers and device; on CPU without AMP and
    channels_last, as the ceiling runs there."""
    model = ['--model', args.model] if getattr(args, 'model', None) else []
    return parse_config(['-c', str(RECIPE), '--data-dir', str(data), '--img-size', str(args.img_size),
                         '-b', str(args.batch_size), '-j', str(args.workers), '--device', str(device),
                         *model, *cpu_flags(device), *flags])


def cpu_flags(device: torch.device) -> list:
    return ['--no-amp', '--no-channels-last'] if device.type == 'cpu' else []


def _sync(device: torch.device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def step_ceiling(config: dict, device: torch.device, steps: int, compiled: bool,
                 teacher: Optional[str] = None) -> float:
    """img/s of the bare training step on device tensors: forward, backward, optimizer step and EMA update of the
    recipe's model with 1000 classes, in its precision and memory layout. train.py's optimizer and ModelEmaV3; with
    a teacher (a timm name, random weights: the same speed), its forward on the batch first, without gradients."""
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    layout = torch.channels_last if config['channels_last'] else torch.contiguous_format
    model = create_model(config['model'], num_classes=1000, drop_path_rate=config['drop_path_rate'])
    model.to(device=device, memory_format=layout)
    optimizer = build_optimizer(config, model)
    model_ema = ModelEmaV3(model, decay=config['model_ema_decay'])
    train_model = torch.compile(model) if compiled else model
    teacher_model = None
    if teacher:
        teacher_model = create_model(teacher, num_classes=1000).to(device=device, memory_format=layout).eval()
        teacher_model.requires_grad_(False)
    size, batch = config['img_size'], config['batch_size']
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=layout)
    y = torch.randint(0, 1000, (batch,), device=device)
    amp = torch.autocast(device.type, dtype=getattr(torch, config['amp_dtype'])) if config['amp'] else nullcontext()
    # compiling takes the first steps (forward, then backward); cudnn autotunes in the first; the CPU needs neither
    warmup = 5 if compiled else (3 if device.type == 'cuda' else 1)
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        with amp:
            if teacher_model is not None:
                with torch.no_grad():
                    teacher_model(x)
            loss = F.cross_entropy(train_model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model_ema.update(model)
    _sync(device)
    return steps * batch / (time.perf_counter() - start)


def loader_speed(loader, workers: int, device: torch.device, timed_batches: int) -> tuple:
    """(img/s, batches timed) of a loader alone.

    Its workers start together, deliver their first batches together and stay in step: the clock starts once two
    rounds of batches (one per worker) have arrived, and runs over whole rounds.
    """
    rounds = max(workers, 1)
    skip = 2 * rounds
    timed_batches = rounds * math.ceil(timed_batches / rounds)
    images = batches = 0
    start = None
    for i, (x, _) in enumerate(loader):
        if i == skip - 1:
            _sync(device)
            start = time.perf_counter()
        elif i >= skip:
            images, batches = images + len(x), batches + 1
            if batches == timed_batches:
                break
    _sync(device)
    if not batches:
        raise UserError(f'too few images for {skip + 1} batches')
    return images / (time.perf_counter() - start), batches


def our_loader(config: dict, data_cfg: dict, device: torch.device):
    layout = BatchLayout.create(config['batch_size'], 1, None)
    loader, sampler = create_train_loader(open_image_folder(Path(config['data_dir']), 'train'), config, data_cfg,
                                          layout, 0, device)
    sampler.set_position(0, 0)
    return loader


def timm_loader(config: dict, data_cfg: dict, device: torch.device):
    """timm's create_loader as its train.py builds it: random sampler, persistent workers, prefetcher on."""
    return create_loader(
        open_image_folder(Path(config['data_dir']), 'train'),
        input_size=data_cfg['input_size'], batch_size=config['batch_size'], is_training=True, use_prefetcher=True,
        scale=tuple(config['scale']), ratio=tuple(config['ratio']), hflip=config['hflip'], vflip=config['vflip'],
        color_jitter=config['color_jitter'], auto_augment=config['auto_augment'],
        interpolation=data_cfg['interpolation'], mean=data_cfg['mean'], std=data_cfg['std'],
        num_workers=config['workers'], pin_memory=device.type == 'cuda', device=device,
        re_prob=0.0)  # ours erases in the training step, not in the loader


def step_windows(log: str) -> list:
    """(step, steps per epoch, img/s, data wait share) of each of train.py's step lines."""
    found = re.findall(r'step (\d+)/(\d+)\s.*?([\d.]+) img/s\s+data wait (\d+)%', log)
    return [(int(step), int(steps), float(speed), int(wait) / 100) for step, steps, speed, wait in found]


def steady_windows(windows: list, wait_threshold: float = 0.02) -> list:
    """The windows of train.py's step lines in which it ran at its steady speed.

    The first window holds the start (workers' first batches, cudnn autotuning). While the workers' prefetched
    batches last, the steps need not wait even when the loader is the slower side: once a window waits for data, the
    buffer is empty, and the windows after it are steady. A run that never waits is bound by compute from the start.
    """
    later = windows[1:]
    waiting = [i for i, w in enumerate(later) if w[3] >= wait_threshold]
    return later[waiting[0] + 1:] if (waiting and waiting[0] + 1 < len(later)) else later


def train_py_speed(config: dict, device: torch.device, decode: str, out: Path, *flags: str) -> Row:
    """train.py's steady img/s and data-wait share over one epoch of the data, from its step lines; `flags` are
    train.py's own (e.g. --gpu-decoder torchvision). With decode: auto the note says what it chose."""
    what = ' '.join([f'train.py, decode {decode}', *flags])
    steps_per_epoch = len(open_image_folder(Path(config['data_dir']), 'train')) // config['batch_size']
    interval = max(1, steps_per_epoch // 25)
    experiment = re.sub(r'[^\w.-]+', '-', what.replace('train.py, ', '')).strip('-')
    command = [sys.executable, str(REPO / 'train.py'), '-c', str(RECIPE), '--data-dir', config['data_dir'],
               '--output', str(out), '--experiment', experiment, '--img-size', str(config['img_size']),
               '-b', str(config['batch_size']), '-j', str(config['workers']), '--device', str(device),
               '--decode', decode, '--epochs', '1', '--log-interval', str(interval), '--recovery-minutes', '0',
               '--checkpoint-hist', '1', '--no-log-wandb', '--model', config['model'], *cpu_flags(device), *flags]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip().splitlines() or ['no output']
        print('\n'.join([f'{what} failed:', *output[-20:]]), file=sys.stderr)
        return Row(what, config['workers'], note=f'exit code {done.returncode}: {output[-1][:150]}')
    windows = step_windows(done.stdout)
    steady = steady_windows(windows)
    if not steady:
        return Row(what, config['workers'], note=f'no step lines after the first ({steps_per_epoch} steps)')
    speed = len(steady) / sum(1 / w[2] for w in steady)  # the speed of the mean step time
    wait = sum(w[3] for w in steady) / len(steady)
    first = windows[windows.index(steady[0]) - 1][0] + 1  # a window starts after the step of the one before
    note = f'steps {first}-{steady[-1][0]} of {steps_per_epoch}'
    chose = re.search(r'Input path: (decode \S+(, cpu_decode_share [\d.]+)?)(.*)', done.stdout)
    if decode == 'auto' and chose:
        note += f'; chose {chose.group(1)}' + (f' ({chose.group(3).strip(" ,()")})' if chose.group(3) else '')
    return Row(what, config['workers'], speed, wait, note)


def measured(what: str, workers: Optional[int], measure) -> Row:
    """The row of measure() -> Row or (img/s, note), timed; any failure becomes its 'n/a' with the reason, so that
    one measurement that cannot run here (no CUDA, no compiler, out of memory) leaves the others standing."""
    start = time.perf_counter()
    try:
        result = measure()
        row = result if isinstance(result, Row) else Row(what, workers, result[0], note=result[1])
    except Exception as e:
        row = Row(what, workers, note=(str(e).strip().splitlines() or [type(e).__name__])[0][:150])
    row.seconds = time.perf_counter() - start
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # train.py, run next as a process of its own, needs the GPU memory this one cached
    return row


def compiled_rows(data: Path, args, device: torch.device, out: Path):
    """Yields the compiled ceiling, then train.py with --torchcompile and decode: gpu."""
    config = recipe_config(data, args, device)
    yield measured('step + ModelEmaV3 on device tensors, torch.compile', None, lambda: (
        step_ceiling(config, device, args.steps, compiled=True), f'{args.steps} steps'))
    yield measured(' '.join(['train.py, decode auto --torchcompile', *args.compile_flags]), config['workers'],
                   lambda: train_py_speed(config, device, 'auto', out, '--torchcompile', *args.compile_flags))


def nvimgcodec_missing() -> Optional[str]:
    if importlib.util.find_spec('nvidia') is None or importlib.util.find_spec('nvidia.nvimgcodec') is None:
        return 'nvImageCodec is not installed'
    return None


def not_here(reason):
    raise UserError(reason)


def random_teacher(model: str, classes: int, path: Path) -> Path:
    """A checkpoint of ours of `model` with random weights, for kd_teacher: a teacher's speed, not its knowledge."""
    torch.save(dict(state_dict=create_model(model, num_classes=classes).state_dict(),
                    config=dict(model=model, num_classes=classes)), path)
    return path


def pipeline_rows(data: Path, args, device: torch.device, out: Path):
    """Yields the rows one by one as they are measured: eager ceiling, loaders alone, train.py."""
    config = recipe_config(data, args, device)
    workers = config['workers']
    yield measured('step + ModelEmaV3 on device tensors, eager', None, lambda: (
        step_ceiling(config, device, args.steps, compiled=False), f'{args.steps} steps'))
    yield measured('train.py, decode auto', workers, lambda: train_py_speed(config, device, 'auto', out))
    if args.kd_teacher:  # the teacher's forward in each step; random weights, saved as a checkpoint of ours
        yield measured(f'step + ModelEmaV3 + teacher {args.kd_teacher} forward, eager', None, lambda: (
            step_ceiling(config, device, args.steps, compiled=False, teacher=args.kd_teacher), f'{args.steps} steps'))
        teacher = random_teacher(args.kd_teacher, len(open_image_folder(data, 'train').reader.class_to_idx),
                                 out / 'teacher.pth.tar')
        yield measured(f'train.py, decode auto, teacher {args.kd_teacher}', workers,
                       lambda: train_py_speed(config, device, 'auto', out, '--kd-teacher', str(teacher)))
    if args.auto_augment:  # the input paths of an auto-augment recipe: the CPU path, the split, the device's ops
        augment = ['--auto-augment', args.auto_augment]
        for decode, flags in (('cpu', []), ('gpu', ['--cpu-decode-share', '1']), ('gpu', ['--cpu-decode-share', '0'])):
            yield measured(' '.join([f'train.py, decode {decode}', *augment, *flags]), workers,
                           lambda: train_py_speed(config, device, decode, out, *augment, *flags))
    if args.quick:
        for share in args.cpu_shares:
            flags = ['--cpu-decode-share', str(share)]
            yield measured(' '.join(['train.py, decode gpu', *flags]), workers,
                           lambda: train_py_speed(config, device, 'gpu', out, *flags))
        return
    data_cfg = data_config(config, create_model(config['model']), config['img_size'])
    timed = max(2 * max(workers, 1), args.steps)

    def ours(*flags):
        loader = our_loader(recipe_config(data, args, device, *flags), data_cfg, device)
        try:
            speed, batches = loader_speed(loader, workers, device, timed)
        finally:
            loader.close()  # its workers persist across passes; the next row needs the cores
        return speed, f'{batches} batches'

    def timm_alone():
        speed, batches = loader_speed(timm_loader(config, data_cfg, device), workers, device, timed)
        return speed, f'{batches} batches'

    yield measured('loader alone: ours, decode cpu, jpeg_draft off', workers,
                   lambda: ours('--decode', 'cpu', '--no-jpeg-draft'))
    yield measured('loader alone: ours, decode cpu, jpeg_draft on', workers, lambda: ours('--decode', 'cpu'))
    yield measured('loader alone: ours, decode gpu', workers, lambda: ours('--decode', 'gpu'))
    yield measured("loader alone: timm's create_loader", workers, timm_alone)
    # train.py with decode: gpu as configured, nvImageCodec's decoder where that is installed, then each
    # cpu_decode_share asked for
    gpu_variants = [[]]
    if device.type == 'cuda' and not nvimgcodec_missing():
        gpu_variants.append(['--gpu-decoder', 'nvimgcodec'])
    gpu_variants += [['--cpu-decode-share', str(share)] for share in args.cpu_shares]
    for flags in gpu_variants:
        yield measured(' '.join(['train.py, decode gpu', *flags]), workers,
                       lambda: train_py_speed(config, device, 'gpu', out, *flags))
    yield measured('train.py, decode cpu', workers, lambda: train_py_speed(config, device, 'cpu', out))


def _speed(value: float) -> str:
    return f'{value:,.0f}' if value >= 100 else f'{value:.1f}'


def table_row(row: Row, ceiling: Optional[float]) -> str:
    workers = '' if row.workers is None else str(row.workers)
    if row.img_per_sec is None:
        return f'| {row.what} | {workers} | n/a ({row.note}) | | | {row.seconds:.0f} s |'
    share = f'{100 * row.img_per_sec / ceiling:.0f}%' if ceiling else ''
    wait = '' if row.data_wait is None else f'{100 * row.data_wait:.0f}%'
    return (f'| {row.what} | {workers} | {_speed(row.img_per_sec)} | {share} | {wait} | '
            f'{row.note}, {row.seconds:.0f} s |')


def markdown_table(rows: list) -> str:
    """The rows as a markdown table; shares are of the first row (the step's ceiling)."""
    ceiling = rows[0].img_per_sec
    return '\n'.join(['| measured | workers | img/s | of the ceiling | data wait | how |',
                      '|---|---:|---:|---:|---:|---|', *(table_row(row, ceiling) for row in rows)])


def machine(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'
    return (f'{name}, {os.cpu_count()} CPU cores; torch {torch.__version__}, torchvision {torchvision.__version__}, '
            f'timm {timm.__version__}, Pillow {PIL.__version__}; {torch.get_num_threads()} torch threads')


def default_images(batch: int, workers: int, steps: int) -> int:
    """Enough training images for the loaders' timed rounds and for train.py to use up its prefetched batches."""
    return batch * max(6 * max(workers, 1), steps + 2 * max(workers, 1) + 2)


def pipeline(args):
    device = pick_device(args.device)
    keep_freed_cpu_memory(device)  # as train.py does: the ceiling runs the same step
    start = time.perf_counter()
    if args.data:
        data = Path(args.data)
    else:
        data = imagenet_like(args.cache, args.images or default_images(args.batch_size, args.workers, args.steps))
    stats = jpeg_stats(data / 'train')
    made = time.perf_counter() - start
    print(f'{data}: {made:.0f} s to find or make', flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for row in (compiled_rows if args.compile else pipeline_rows)(data, args, device, Path(tmp)):
            rows.append(row)
            print(table_row(row, rows[0].img_per_sec), flush=True)  # a run cut short still shows what it measured
    text = '\n'.join([
        f'## Input pipeline: {args.img_size} px, batch {args.batch_size}, {args.workers} workers, '
        f"{'bf16 + channels_last' if device.type == 'cuda' else 'fp32'}",
        '',
        f'{machine(device)}.',
        f'Data: {data}: {stats.count:,} training JPEGs, mean {stats.mean_width:.0f} x {stats.mean_height:.0f} px, '
        f'{stats.mean_kb:.0f} KB. Recipe: {RECIPE.relative_to(REPO)}. Total {time.perf_counter() - start:.0f} s.',
        '',
        markdown_table(rows),
    ])
    print(text)
    if args.out:
        Path(args.out).write_text(text + '\n')


# ---------------------------------------------------------------------------------------------------------------
# vs-timm: timm's train.py and ours, same recipe, same data, one after the other


def timm_flags(config: dict, data: Path, out: Path, num_classes: int) -> list:
    """timm train.py's flags for our configuration (the options the quickstart recipe sets)."""
    def text(v):  # a whole float as an int: timm parses some of these options (warmup epochs) as int
        return str(int(v)) if (isinstance(v, float) and v.is_integer()) else str(v)

    def value(key):
        return [text(v) for v in config[key]] if isinstance(config[key], list) else [text(config[key])]
    flags = ['--data-dir', str(data), '--dataset', '', '--train-split', 'train', '--val-split', 'val',
             '--output', str(out), '--experiment', 'timm', '--num-classes', str(num_classes), '--sched-on-updates']
    for ours, theirs in (('model', 'model'), ('img_size', 'img-size'), ('crop_pct', 'crop-pct'),
                         ('batch_size', 'batch-size'), ('opt', 'opt'), ('lr', 'lr'), ('weight_decay', 'weight-decay'),
                         ('momentum', 'momentum'), ('epochs', 'epochs'), ('sched', 'sched'),
                         ('warmup_epochs', 'warmup-epochs'), ('warmup_lr', 'warmup-lr'), ('min_lr', 'min-lr'),
                         ('scale', 'scale'), ('ratio', 'ratio'), ('hflip', 'hflip'), ('vflip', 'vflip'),
                         ('color_jitter', 'color-jitter'), ('smoothing', 'smoothing'), ('drop_path_rate', 'drop-path'),
                         ('workers', 'workers'), ('seed', 'seed'), ('log_interval', 'log-interval'),
                         ('checkpoint_hist', 'checkpoint-hist'), ('device', 'device')):
        flags += [f'--{theirs}', *value(ours)]
    if config['model_ema']:
        flags += ['--model-ema', '--model-ema-decay', *value('model_ema_decay')]
    return flags


def run_timed(name: str, command: list, log: Path) -> tuple:
    """(wall seconds, CPU seconds of it and its children) of a whole process, its output kept in `log`. CPU time
    varies less than wall time on a machine shared with others."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(log, 'w') as f:
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=REPO).returncode
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code != 0:
        raise UserError(f'{name} exited with {code}; see {log}')
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def timm_result(log: str) -> dict:
    """Steady step time and top-1 from timm train.py's log: the median per-step 'Time:' of its log lines but an epoch's
    first (a median, as a burst of other work on a shared CPU stretches a few steps many times), and the final
    'Acc@1' average of each validation (raw, then EMA)."""
    steps = re.findall(r'Train: \d+ \[\s*(\d+)/(\d+) .*?Time: ([\d.]+)s', log)
    step_times = [float(t) for idx, _, t in steps if int(idx) > 0]
    evals = re.findall(r'Test( \(EMA\))?: \[\s*(\d+)/(\d+)\].*?Acc@1:\s+[\d.]+ \(\s*([\d.]+)\)', log)
    finals = [(bool(ema), float(top1)) for ema, idx, last, top1 in evals if idx == last]
    return dict(step_seconds=float(np.median(step_times)), steps=int(steps[0][1]) if steps else 0,
                raw=[t for ema, t in finals if not ema], ema=[t for ema, t in finals if ema])


def ours_result(log: str, run_dir: Path, batch: int) -> dict:
    """Steady step time from our step lines (median of the windows, an epoch's first left out) and top-1 from
    summary.csv."""
    windows = step_windows(log)
    windows = [w for w in windows if w[0] > windows[0][0]]  # every epoch's first window holds its workers' start
    step_seconds = float(np.median([batch / w[2] for w in windows]))
    rows = read_summary(run_dir / 'summary.csv')
    return dict(step_seconds=step_seconds, steps=windows[0][1], raw=[r['val_top1'] for r in rows],
                ema=[r['ema_val_top1'] for r in rows if r['ema_val_top1'] is not None])


def vs_timm_table(results: dict, epochs: int, batch: int) -> str:
    timm_r, ours_r = results['timm'], results['ours']

    def overhead(r):
        return (r['wall'] - epochs * r['steps'] * r['step_seconds']) / epochs

    def top1(values):
        return f'{values[-1]:.2f} / {max(values):.2f}' if values else 'n/a'
    lines = ['| | timm train.py | ours | ours / timm |', '|---|---:|---:|---:|',
             f"| wall time, whole process | {timm_r['wall']:.0f} s | {ours_r['wall']:.0f} s | "
             f"{ours_r['wall'] / timm_r['wall']:.2f} |",
             f"| CPU time, all its processes | {timm_r['cpu']:.0f} s | {ours_r['cpu']:.0f} s | "
             f"{ours_r['cpu'] / timm_r['cpu']:.2f} |",
             f"| steady training steps (median) | {batch / timm_r['step_seconds']:.0f} img/s | "
             f"{batch / ours_r['step_seconds']:.0f} img/s | {timm_r['step_seconds'] / ours_r['step_seconds']:.2f} |",
             f"| step time | {1e3 * timm_r['step_seconds']:.0f} ms | {1e3 * ours_r['step_seconds']:.0f} ms | "
             f"{ours_r['step_seconds'] / timm_r['step_seconds']:.2f} |",
             f'| per-epoch overhead (wall - steps x step time) / epochs | {overhead(timm_r):.2f} s | '
             f'{overhead(ours_r):.2f} s | |',
             f"| top-1 final / best, raw weights | {top1(timm_r['raw'])} | {top1(ours_r['raw'])} | |",
             f"| top-1 final / best, EMA weights | {top1(timm_r['ema'])} | {top1(ours_r['ema'])} | |"]
    return '\n'.join(lines)


def vs_timm(args):
    timm_train = Path(args.timm_train).resolve()
    if not timm_train.is_file():
        raise UserError(f'timm train.py not found: {timm_train}')
    data = Path(args.data)
    if not data.is_dir():
        builtin_data.generate(data, seed=0)
    overrides = ['--epochs', str(args.epochs), '-b', str(args.batch_size), '--img-size', str(args.img_size),
                 '-j', str(args.workers), '--device', 'cpu', '--model-ema']
    config = parse_config(['-c', str(QUICKSTART), *overrides])  # lr rescaled when -b differs: both get that lr
    work = Path(args.output or tempfile.mkdtemp(prefix='vs-timm-'))
    work.mkdir(parents=True, exist_ok=True)
    num_classes = len(builtin_data.CLASSES)
    # timm's train.py imports model_defs first so that resnet50_custom is in timm's registry
    timm_args = [str(timm_train), *timm_flags(config, data, work, num_classes)]
    timm_command = [sys.executable, '-c', 'import sys, runpy, model_defs; sys.argv = sys.argv[1:]; '
                    'runpy.run_path(sys.argv[0], run_name="__main__")', *timm_args]
    ours_command = [sys.executable, str(REPO / 'train.py'), '-c', str(QUICKSTART), *overrides,
                    '--lr', str(config['lr']), '--data-dir', str(data), '--output', str(work),
                    '--experiment', 'ours', '--start-over']
    results = {}
    for name, command in (('timm', timm_command), ('ours', ours_command)):
        log = work / f'{name}.log'
        wall, cpu = run_timed(name, command, log)
        text = log.read_text()
        parsed = timm_result(text) if name == 'timm' else ours_result(
            text, work / 'ours', config['batch_size'])
        results[name] = dict(parsed, wall=wall, cpu=cpu)
        print(f'{name}: {wall:.0f} s', flush=True)
    text = '\n'.join([
        f"## timm train.py vs ours: {QUICKSTART.relative_to(REPO)} for {args.epochs} epochs, {args.img_size} px, "
        f"batch {args.batch_size}, EMA, {args.workers} workers, CPU",
        '', f'{machine(torch.device("cpu"))}. Logs and run folders: {work}.', '',
        vs_timm_table(results, args.epochs, config['batch_size'])])
    print(text)
    if args.out:
        Path(args.out).write_text(text + '\n')


# ---------------------------------------------------------------------------------------------------------------
# workers: the CPU time each loader's workers spend per image, whatever else the machine is doing


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def worker_cost(make_loader, batches: int) -> float:
    """Images per CPU-second of a DataLoader's workers over `batches` batches: they are started for it and joined
    after it, so that their CPU time (user and system) is all counted, and none of the main process's."""
    loader = make_loader()
    before, images = children_cpu(), 0
    iterator = iter(loader)
    for _ in range(batches):
        images += len(next(iterator)[-1])  # labels, or the files read (decode: gpu)
    del iterator  # joins the workers: their CPU time is counted once they are reaped
    gc.collect()
    return images / (children_cpu() - before)


def plain_loader(loader):
    """The DataLoader under timm's PrefetchLoader or our CheckedLoader (for decode: gpu, the workers' side only),
    with workers that end with each pass."""
    inner = loader.loader
    return torch.utils.data.DataLoader(inner.dataset, batch_sampler=inner.batch_sampler, num_workers=inner.num_workers,
                                       collate_fn=inner.collate_fn, worker_init_fn=inner.worker_init_fn)


def workers(args):
    """Images per CPU-second of the loader workers at each size: timm's create_loader, ours with decode: cpu
    (jpeg_draft off and on), and the workers' side of decode: gpu (the device's work is not in it) with cpu_decode_share
    0 and 1 (the workers decode and crop every image; the device flips, jitters and normalises)."""
    data = Path(args.data) if args.data else imagenet_like(args.cache, args.images)
    device = torch.device('cpu')
    rows = []
    for size in args.sizes:
        args.img_size = size
        config = recipe_config(data, args, device)
        data_cfg = data_config(config, create_model(config['model']), size)
        loaders = {
            "timm's create_loader": lambda: plain_loader(timm_loader(config, data_cfg, device)),
            'ours, decode cpu, jpeg_draft off': lambda: plain_loader(
                our_loader(recipe_config(data, args, device, '--no-jpeg-draft'), data_cfg, device)),
            'ours, decode cpu, jpeg_draft on': lambda: plain_loader(our_loader(config, data_cfg, device)),
            'ours, decode gpu, workers only': lambda: plain_loader(
                our_loader(recipe_config(data, args, device, '--decode', 'gpu'), data_cfg, device)),
            'ours, decode gpu, cpu_decode_share 1, workers only': lambda: plain_loader(our_loader(
                recipe_config(data, args, device, '--decode', 'gpu', '--cpu-decode-share', '1'), data_cfg, device)),
        }
        if args.auto_augment:
            augment = ['--auto-augment', args.auto_augment]
            loaders.update({
                f'ours, decode cpu, {args.auto_augment}': lambda: plain_loader(
                    our_loader(recipe_config(data, args, device, *augment), data_cfg, device)),
                f'ours, decode gpu, cpu_decode_share 1, {args.auto_augment}, workers only': lambda: plain_loader(
                    our_loader(recipe_config(data, args, device, *augment, '--decode', 'gpu', '--cpu-decode-share',
                                             '1'), data_cfg, device)),
                f'ours, decode gpu, {args.auto_augment} drawn, workers only': lambda: plain_loader(our_loader(
                    recipe_config(data, args, device, *augment, '--decode', 'gpu'), data_cfg, device)),
            })
        results = {what: max(worker_cost(make, args.batches) for _ in range(args.repeats))
                   for what, make in loaders.items()}
        timm_rate = results["timm's create_loader"]
        rows += [f'| {what} | {size} | {rate:,.0f} | {rate / timm_rate:.2f}x |' for what, rate in results.items()]
        print(rows[-1], flush=True)
    text = '\n'.join([
        f'## Loader workers: images per CPU-second, {args.workers} workers, batch {args.batch_size}, '
        f'best of {args.repeats}', '', f'{machine(device)}. Data: {data}. Recipe: {RECIPE.relative_to(REPO)}.', '',
        '| loader | px | images per CPU-second | vs timm |', '|---|---:|---:|---:|', *rows])
    print(text)
    if args.out:
        Path(args.out).write_text(text + '\n')


# ---------------------------------------------------------------------------------------------------------------
# auto-augment ops: PIL's time per image in a loader worker, the device's per batch

# each op's argument at about RandAugment's magnitude 7 of 10 (timm's level functions); the other ops take none
TYPICAL_ARGUMENTS = {'rotate': 21.0, 'posterize': 2, 'solarize': 77, 'solarize_add': 77, 'contrast': 1.63,
                     'color': 1.63, 'brightness': 1.63, 'sharpness': 1.63, 'shear_x': 0.21, 'shear_y': 0.21,
                     'translate_x_rel': 0.315, 'translate_y_rel': 0.315, 'translate_x_abs': 70.0,
                     'translate_y_abs': 70.0}
BICUBIC = 3  # PIL's code: the costliest resampling of the geometric ops, which RSB's random interpolation draws half
FILL = (124, 116, 104)  # timm's img_mean fill


def augment_ops(args):
    """ms per image of each auto-augment op in PIL on one core (best of `repeats` rounds of 50 images), and ms per
    batch of the device's version on the chosen device, on a crop of an ImageNet-like photo at each size; on a GPU
    also the largest difference of its results from the CPU's (which the tests hold equal to PIL's)."""
    device = pick_device(args.device)
    rows = []
    for size in args.sizes:
        photo = draw_photo(np.random.default_rng(0)).resize((size, size), Image.BICUBIC)
        batch = torch.from_numpy(np.asarray(photo).copy()).permute(2, 0, 1).float().to(device)
        batch = batch[None].repeat(args.batch_size, 1, 1, 1)
        for name in AUTO_AUGMENT_OPS[1:]:
            arguments = (TYPICAL_ARGUMENTS[name],) if name in TYPICAL_ARGUMENTS else ()
            function = getattr(timm.data.auto_augment, name)
            pil = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                for _ in range(50):
                    function(photo, *arguments, fillcolor=FILL, resample=BICUBIC)
                pil.append((time.perf_counter() - start) / 50)
            code = AUTO_AUGMENT_OPS.index(name)
            layers = torch.tensor([[[code, (arguments or (0.0,))[0], BICUBIC]]], dtype=torch.float64)
            layers = layers.repeat(args.batch_size, 1, 1)
            apply_auto_augment_ops(batch.clone(), layers, FILL)  # warm-up: kernels, allocator
            on_device = []
            for _ in range(args.repeats):
                _sync(device)
                start = time.perf_counter()
                apply_auto_augment_ops(batch.clone(), layers, FILL)
                _sync(device)
                on_device.append(time.perf_counter() - start)
            differs = ''
            if device.type != 'cpu':  # the device's arithmetic against the CPU's, which the tests match to PIL's
                few = layers[:8]
                on_cpu = apply_auto_augment_ops(batch[:8].cpu(), few, FILL)
                differs = f'{(apply_auto_augment_ops(batch[:8].clone(), few, FILL).cpu() - on_cpu).abs().max():.0f}'
            rows.append(f'| {name} | {size} | {1000 * min(pil):.3f} | {1000 * min(on_device):.2f} | {differs} |')
            print(rows[-1], flush=True)
    text = '\n'.join([
        f'## Auto-augment ops: PIL per image (one core) and the device per batch of {args.batch_size}, best of '
        f'{args.repeats}', '', f'{machine(device)}. Arguments at about magnitude 7; geometric ops bicubic.', '',
        f'| op | px | PIL ms per image | {device.type} ms per batch | max difference from the CPU (levels) |',
        '|---|---:|---:|---:|---:|', *rows])
    print(text)
    if args.out:
        Path(args.out).write_text(text + '\n')


# ---------------------------------------------------------------------------------------------------------------
# the course project's methods: what each adds to a training step

def median_ms(run, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def methods(args):
    """ms per training step (train.py's forward_backward and optimizer_step) of the plain recipe model, with SE, and
    with distillation teachers (checkpoints of ours with random weights: the same speed); SWA's per-epoch work."""
    import train
    from torch.optim.swa_utils import AveragedModel
    device = pick_device(args.device)
    procs = Processes(0, 1, 0, device)
    common = ['--num-classes', '10', '--img-size', str(args.img_size), '--no-model-ema', '--device', str(device)]
    cases = {'plain': [], 'attn_layer: se': ['--attn-layer', 'se']}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.teachers:
            path = random_teacher(name, 10, Path(tmp) / f'{name}.pth.tar')
            cases[f'kd_teacher: {name}'] = ['--kd-teacher', str(path)]
        x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
        y = torch.randint(0, 10, (args.batch_size,), device=device)
        lines, plain = [], None
        for label, flags in cases.items():
            torch.manual_seed(0)
            config = parse_config([*common, *flags])
            t = train.build_trainer(config, procs, BatchLayout.create(args.batch_size, 1, None),
                                    train.build_model(config, 10), 10, steps_per_epoch=1)
            t.train_model.train()

            def step():
                train.forward_backward(t, x.clone(), y, True, 1, False)
                train.optimizer_step(t)
                _sync(device)
            ms = median_ms(step, args.repeats)
            plain = plain or ms
            lines.append(f'| {label} | {ms:.0f} ms | {100 * (ms / plain - 1):+.0f}% |')
        model = t.model
        average = AveragedModel(model)
        with torch.no_grad():
            forward = median_ms(lambda: (model(x), _sync(device)), args.repeats)
        update = median_ms(lambda: (average.update_parameters(model), _sync(device)), args.repeats)
    print(f'## Methods: {args.img_size} px, batch {args.batch_size}, {machine(device)}\n')
    print('\n'.join(['| per training step | time | vs plain |', '|---|---:|---:|', *lines]))
    print(f'\nSWA, once an epoch: AveragedModel.update_parameters {update:.0f} ms; update_bn: {forward:.0f} ms per '
          'batch (a forward in train mode without gradients) x swa_bn_batches; one more model in the evaluation pass.')


# checkpoint and SIGTERM timings


def checkpoint(args):
    model = create_model('resnet50_custom')
    optimizer = create_optimizer_v2(model, opt='momentum', lr=0.1, weight_decay=1e-4)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    optimizer.step()  # creates the momentum buffers
    state = {'state_dict': model.state_dict(), 'state_dict_ema': ModelEmaV3(model).module.state_dict(),
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='what', required=True)
    p = sub.add_parser('pipeline', help='compute ceiling, loaders alone and train.py side by side')
    source = p.add_mutually_exclusive_group()
    source.add_argument('--data', help='an ImageNet-like folder with train/ and val/ (default: generated)')
    source.add_argument('--images', type=int, help='training images to generate (default: enough for the run)')
    p.add_argument('--cache', type=Path, default=DEFAULT_CACHE, help='where generated images are kept and reused')
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('-b', '--batch-size', type=int, default=256)
    p.add_argument('-j', '--workers', type=int, default=min(14, os.cpu_count()))
    p.add_argument('--device', default='auto')
    p.add_argument('--compile', action='store_true', help='measure the torch.compile ceiling and train.py compiled '
                   'with decode: gpu instead (shares are then of the compiled ceiling)')
    p.add_argument('--compile-flags', nargs='*', default=[], help="more train.py flags for its compiled row, each "
                   "as --flag=value")
    p.add_argument('--quick', action='store_true', help='only the ceiling and train.py with decode: gpu at each '
                   '--cpu-shares value')
    p.add_argument('--cpu-shares', type=float, nargs='*', default=[],
                   help='also measure train.py with decode: gpu and each of these cpu_decode_share values')
    p.add_argument('--steps', type=int, default=20, help='timed steps of the ceiling (and least loader batches)')
    p.add_argument('--auto-augment', help="also train.py with this auto-augment (e.g. A3's rand-m6-mstd0.5-inc1) on "
                   'the CPU path, the split (cpu_decode_share 1) and the device ops (cpu_decode_share 0)')
    p.add_argument('--model', help="the model trained (default: the recipe's, resnet50_custom)")
    p.add_argument('--kd-teacher', help='also the step and train.py with this timm model as a distillation teacher '
                   "(random weights: the same speed), e.g. rn50_kd_funmatch_1200ep's "
                   'resnetv2_152x2_bit.goog_teacher_in21k_ft_in1k')
    p.add_argument('--out', help='also write the table to this markdown file')
    p = sub.add_parser('jpegs', help='make (or find) the generated ImageNet-like JPEGs and print their sizes')
    p.add_argument('--images', type=int, required=True)
    p.add_argument('--cache', type=Path, default=DEFAULT_CACHE)
    p = sub.add_parser('vs-timm', help="timm's train.py and ours on the same recipe and data, on CPU")
    p.add_argument('--timm-train', required=True, help="timm's train.py (from the pytorch-image-models repo)")
    p.add_argument('--data', default=str(DEFAULT_CACHE / 'shapes'), help='the built-in shapes (made if absent)')
    p.add_argument('--epochs', type=int, default=20)
    p.add_argument('-b', '--batch-size', type=int, default=64)
    p.add_argument('--img-size', type=int, default=32)
    p.add_argument('-j', '--workers', type=int, default=2)
    p.add_argument('--output', help='keep logs and run folders here (default: a new temp folder)')
    p.add_argument('--out', help='also write the table to this markdown file')
    p = sub.add_parser('workers', help="CPU time per image of each loader's workers (timm's and ours)")
    source = p.add_mutually_exclusive_group()
    source.add_argument('--data', help='an ImageNet-like folder with train/ and val/ (default: generated)')
    source.add_argument('--images', type=int, default=512, help='training images to generate')
    p.add_argument('--cache', type=Path, default=DEFAULT_CACHE)
    p.add_argument('--sizes', type=int, nargs='+', default=[160, 224])
    p.add_argument('-b', '--batch-size', type=int, default=32)
    p.add_argument('-j', '--workers', type=int, default=2)
    p.add_argument('--batches', type=int, default=12, help='batches timed per measurement')
    p.add_argument('--repeats', type=int, default=3, help='measurements per loader: the best counts')
    p.add_argument('--auto-augment', help='also the loaders with this auto-augment: the CPU path, the workers of the '
                   'split (cpu_decode_share 1) and of the device ops (their draws only)')
    p.add_argument('--out', help='also write the table to this markdown file')
    p = sub.add_parser('augment-ops', help="each auto-augment op's time: PIL per image, the device's per batch")
    p.add_argument('--sizes', type=int, nargs='+', default=[160, 224])
    p.add_argument('-b', '--batch-size', type=int, default=256)
    p.add_argument('--device', default='auto')
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--out', help='also write the table to this markdown file')
    p = sub.add_parser('methods', help="what SE, a distillation teacher and SWA add to a training step")
    p.add_argument('--img-size', type=int, default=64)
    p.add_argument('-b', '--batch-size', type=int, default=16)
    p.add_argument('--device', default='auto')
    p.add_argument('--repeats', type=int, default=7)
    p.add_argument('--teachers', nargs='+', default=['resnet18', 'resnet50_custom', 'resnet152'])
    p = sub.add_parser('checkpoint', help='size and write/load time of a checkpoint')
    p.add_argument('--dir', default=None, help='where to write (default: the temp folder)')
    p = sub.add_parser('sigterm', help='SIGTERM to exit, with a recovery save')
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('-b', '--batch-size', type=int, default=16)
    return parser


def check_counts(args):
    for name in ('images', 'img_size', 'batch_size', 'steps', 'epochs'):
        value = getattr(args, name, None)
        if (value is not None) and (value < 1):
            raise UserError(f"--{name.replace('_', '-')} must be 1 or more, got {value}")
    if getattr(args, 'workers', 0) < 0:
        raise UserError(f'--workers must be 0 or more, got {args.workers}')


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    commands = {'pipeline': pipeline, 'jpegs': jpegs, 'vs-timm': vs_timm, 'workers': workers, 'checkpoint': checkpoint,
                'sigterm': sigterm, 'augment-ops': augment_ops, 'methods': methods}
    try:
        check_counts(args)
        commands[args.what](args)
    except UserError as e:
        print(f'benchmark.py: error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
