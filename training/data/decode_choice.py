"""`decode: auto`: which input path a run takes, and what share of the device path's images the loader workers decode.

The path follows from the run alone: the device path (decode: gpu) on CUDA wherever it can apply the run's settings,
else the CPU path. The CPU path is not timed against it: the device path at cpu_decode_share 1.0 gives the workers the
same decoding and cropping and takes the colour work off them, so the CPU path is never the faster of the two.

The share depends on the machine (cores per GPU, the GPU's speed, the image sizes), so it is measured: before the
first step, with the run's own model, loader and batches, each candidate share feeds a few untimed steps (the workers
start and the queue settles), then TIMED_STEPS timed ones; the fastest of a coarse grid is refined by its two
neighbours half a grid step away. The trial steps run forward and backward without an optimizer step, and the
BatchNorm statistics they change are put back: the model trains from the same state whatever was tried. Then the
choice is part of the run's config (config.yaml, W&B, every checkpoint), and a resumed run keeps it.
"""
import logging
import time
from typing import Callable, Optional

from ..config import UserError
from .device_geometry import EvalResize
from .device_params import TrainAugment

_logger = logging.getLogger(__name__)

GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
WARMUP_STEPS = 10  # before the first candidate: cuDNN's autotuning, torch.compile
SETTLE_STEPS = 6  # untimed micro-batches of each candidate: its workers start and its queue settles
TIMED_STEPS = 20


def device_path_refusal(device, samples: Optional[list], val_cfg: dict, config: Optional[dict] = None,
                        train_cfg: Optional[dict] = None) -> Optional[str]:
    """Why decode: auto takes the CPU path for this run, or its evaluation alone (no config and train_cfg); None: it
    takes the device path."""
    if device.type != 'cuda':
        return f'the training device is {device.type}: the device path would decode on the same cores'
    if samples is None:
        return 'the device path reads image files, and this dataset is not a folder of class folders'
    try:
        EvalResize.create(val_cfg)
        if config is not None:
            TrainAugment.create(config, train_cfg)
    except UserError as e:
        return str(e)
    return None


def resolve_decode(config: dict, device, samples: Optional[list], train_cfg: dict, val_cfg: dict,
                   recorded: Optional[dict]) -> tuple:
    """(decode, cpu_decode_share, why) of a run: 'cpu' or 'gpu', the share (None: to be measured), and in words why.

    An explicit decode or cpu_decode_share wins; with decode: auto a resumed run keeps its checkpoint's choice, so that
    it trains on as it did. `recorded` is the checkpoint's config (None for a new run).
    """
    decode, share = config['decode'], config['cpu_decode_share']
    kept = recorded if (recorded or {}).get('decode') in ('cpu', 'gpu') else None
    if decode != 'auto':
        why = 'as configured'
    elif kept is not None:
        decode, why = kept['decode'], 'kept from the checkpoint (set decode to change it)'
    else:
        refusal = device_path_refusal(device, samples, val_cfg, config, train_cfg)
        decode, why = ('cpu', refusal) if refusal else ('gpu', 'the device path runs these settings')
    if decode == 'cpu':
        return 'cpu', None, why
    if (share is None) and (kept is not None) and (kept['decode'] == 'gpu'):
        share = kept.get('cpu_decode_share')
    if (share is None) and (device.type != 'cuda'):
        share = 0.0  # nothing to measure: the "device" decodes on the CPU as well
    return 'gpu', share, why


def time_share(loader, share: float, step: Callable, settle: int, timed: int, clock: Callable, sync: Callable) -> float:
    """Images per second of `step` fed by `loader` at this cpu_decode_share, timed from the end of the `settle`-th
    step (settle >= 1) to the end of the last one (0.0 where the pass was too short)."""
    loader.batch_sampler.share = share
    images, start = 0, None
    for i, (x, y) in enumerate(loader, 1):
        step(x, y)
        if i == settle:
            sync()
            start = clock()
        elif i > settle:
            images += len(y)
        if i == settle + timed:
            break
    if not images:
        return 0.0
    sync()
    return images / max(clock() - start, 1e-9)


def choose_share(loader, step: Callable, clock: Callable = time.perf_counter, sync: Callable = lambda: None,
                 agree: Callable = lambda speeds: speeds, warmup: int = WARMUP_STEPS, settle: int = SETTLE_STEPS,
                 timed: int = TIMED_STEPS) -> tuple:
    """The fastest cpu_decode_share of the device path's training loader, and {share: img/s} of those timed.

    Args:
        loader: the device path's training loader, positioned where training will start; each candidate restarts it
            there. Its share is left at the choice.
        step: (x, y) -> None, one trial step on the device.
        sync: waits for the device's queued work, so that the clock sees it.
        agree: [img/s] -> [img/s] the same on every process (their mean), so that all choose alike.
    """
    time_share(loader, GRID[0], step, warmup, 0, clock, sync)
    speeds = {}

    def measure(shares):
        shares = [s for s in shares if s not in speeds]
        measured = agree([time_share(loader, s, step, settle, timed, clock, sync) for s in shares])
        speeds.update(zip(shares, measured))

    measure(GRID)
    best = max(speeds, key=speeds.get)
    half = (GRID[1] - GRID[0]) / 2
    measure([s for s in (best - half, best + half) if 0.0 <= s <= 1.0])
    best = max(speeds, key=speeds.get)
    loader.batch_sampler.share = best
    return best, dict(sorted(speeds.items()))


def choice_line(decode: str, share: Optional[float], why: str, speeds: Optional[dict]) -> str:
    """The log line of the input path a run takes."""
    if decode == 'cpu':
        return f'Input path: decode cpu ({why})'
    line = f'Input path: decode gpu, cpu_decode_share {share:g}'
    if speeds:
        timed = ', '.join(f'{s:g}: {v:,.0f}' for s, v in speeds.items())
        return f'{line}, the fastest of those timed (img/s at each share: {timed})'
    return f'{line} ({why})'
