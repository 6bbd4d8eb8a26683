"""decode: auto: the input path a run takes, and the cpu_decode_share it times and keeps."""
from types import SimpleNamespace

import pytest
import torch

from training.config import parse_config
from training.data import BatchLayout, TrainBatchSampler, image_samples, open_image_folder
from training.data.decode_choice import GRID, choice_line, choose_share, resolve_decode
from training.data.device_path import create_gpu_train_loader

CPU, CUDA = torch.device('cpu'), torch.device('cuda')  # resolve_decode only reads the device's type
CFG = dict(input_size=(3, 32, 32), interpolation='bilinear', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
           crop_pct=0.875, crop_mode='center')
SAMPLES = [('a.JPEG', 0)]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TimedLoader:
    """Batches of 4 that take `cost(share)` seconds each on `clock` at the pass's share; the first `slow` batches of
    a pass take 100 s (workers starting), which the timing must leave out."""

    def __init__(self, clock: Clock, cost, slow: int):
        self.clock, self.cost, self.slow = clock, cost, slow
        self.batch_sampler = SimpleNamespace(share=None)
        self.passes = []

    def __iter__(self):
        share = self.batch_sampler.share
        self.passes.append(share)
        for i in range(100):
            self.clock.now += 100.0 if i < self.slow else self.cost(share)
            yield torch.zeros(4, 3), torch.zeros(4)


def test_the_share_is_the_fastest_of_the_grid_refined_by_its_neighbours():
    clock = Clock()
    loader = TimedLoader(clock, lambda share: 1.0 + (share - 0.6) ** 2, slow=3)
    steps = []
    share, speeds = choose_share(loader, lambda x, y: steps.append(len(y)), clock=clock, warmup=5, settle=3, timed=8)
    assert share == 0.625 and loader.batch_sampler.share == 0.625
    assert list(speeds) == [0.0, 0.25, 0.375, 0.5, 0.625, 0.75, 1.0]
    for s, speed in speeds.items():
        assert speed == pytest.approx(4 / (1.0 + (s - 0.6) ** 2))  # the settling batches are not timed
    assert loader.passes == [0.0, *GRID, 0.375, 0.625]  # a warm-up pass, the grid, then the best's neighbours
    assert len(steps) == 5 + 7 * (3 + 8)


def test_every_process_chooses_from_the_agreed_speeds():
    clock = Clock()
    loader = TimedLoader(clock, lambda share: 1.0 + share, slow=0)  # alone, 0.0 would be the fastest
    others = lambda values: [10.0 * (i + 1) for i in range(len(values))]  # noqa: E731  where 1.0 is the fastest
    share, speeds = choose_share(loader, lambda x, y: None, clock=clock, warmup=1, settle=1, timed=2, agree=others)
    assert share == 1.0 and speeds == {0.0: 10.0, 0.25: 20.0, 0.5: 30.0, 0.75: 40.0, 0.875: 10.0, 1.0: 50.0}


class NoBatches:
    batch_sampler = SimpleNamespace(share=None)

    def __iter__(self):
        return iter(())


def test_a_pass_too_short_to_time_measures_nothing():
    share, speeds = choose_share(NoBatches(), lambda x, y: None, clock=Clock(), warmup=1, settle=1, timed=2)
    assert share == 0.0 and set(speeds.values()) == {0.0}


def test_after_the_choice_the_device_loader_gives_the_batches_of_the_chosen_share(shapes):
    """The share travels with the sampler's items: a pass at a new share needs no new workers, and gives what a loader
    built with that share gives."""
    train = open_image_folder(shapes, 'train')
    config = dict(parse_config(['-j', '1', '--decode', 'gpu']), color_jitter=0.4)
    layout = BatchLayout.create(8, 1, None)

    def loader_at(share):
        sampler = TrainBatchSampler(len(train), layout, 0, config['seed'])
        return create_gpu_train_loader(image_samples(train), dict(config, cpu_decode_share=share), CFG, sampler, CPU)

    clock = Clock()
    with loader_at(None) as loader:
        def step(x, y):
            clock.now += {0.5: 1.0}.get(loader.batch_sampler.share, 2.0)
        share, _ = choose_share(loader, step, clock=clock, warmup=1, settle=1, timed=1)
        assert share == 0.5
        chosen = [x for x, _ in loader]
    with loader_at(0.5) as reference:
        assert all(torch.equal(a, b) for a, b in zip(chosen, [x for x, _ in reference]))
    with loader_at(0.0) as other:
        assert not torch.equal(chosen[0], next(iter(other))[0])


def config_with(*args: str) -> dict:
    return parse_config(list(args))


@pytest.mark.parametrize('args, device, recorded, expected', [
    ((), CPU, None, ('cpu', None, 'the training device is cpu')),
    ((), CUDA, None, ('gpu', None, 'the device path runs these settings')),  # None: to be measured
    (('--cpu-decode-share', '0.75'), CUDA, None, ('gpu', 0.75, 'the device path runs')),
    (('--decode', 'gpu'), CPU, None, ('gpu', 0.0, 'as configured')),
    (('--decode', 'cpu'), CUDA, None, ('cpu', None, 'as configured')),
    ((), CUDA, dict(decode='gpu', cpu_decode_share=0.25), ('gpu', 0.25, 'kept from the checkpoint')),
    ((), CPU, dict(decode='gpu', cpu_decode_share=0.25), ('gpu', 0.25, 'kept from the checkpoint')),
    ((), CUDA, dict(decode='cpu', cpu_decode_share=None), ('cpu', None, 'kept from the checkpoint')),
    (('--decode', 'gpu'), CUDA, dict(decode='gpu', cpu_decode_share=0.25), ('gpu', 0.25, 'as configured')),
    (('--cpu-decode-share', '1.0'), CUDA, dict(decode='gpu', cpu_decode_share=0.25), ('gpu', 1.0, 'kept')),
    (('--train-interpolation', 'random', '--interpolation', 'bicubic', '--img-size', '32'), CUDA, None,
     ('gpu', None, 'the device path runs')),
])
def test_explicit_settings_win_then_the_checkpoints_choice_then_the_machine(args, device, recorded, expected):
    config = config_with(*args)
    decode, share, why = resolve_decode(config, device, SAMPLES, CFG, CFG, recorded)
    assert (decode, share) == expected[:2] and why.startswith(expected[2])


def test_auto_takes_the_cpu_path_where_the_device_path_cannot_run_the_settings():
    named = resolve_decode(config_with(), CUDA, None, CFG, CFG, None)
    assert named[:2] == ('cpu', None) and 'not a folder of class folders' in named[2]
    lanczos = dict(CFG, interpolation='lanczos')
    assert resolve_decode(config_with(), CUDA, SAMPLES, lanczos, CFG, None)[:2] == ('cpu', None)


def test_the_choice_is_logged_in_one_line_with_the_speeds_it_compared():
    assert choice_line('cpu', None, 'the training device is cpu', None) == \
        'Input path: decode cpu (the training device is cpu)'
    line = choice_line('gpu', 0.75, 'the device path runs these settings', {0.5: 2900.4, 0.75: 3412.0, 1.0: 3300.0})
    assert line == ('Input path: decode gpu, cpu_decode_share 0.75, the fastest of those timed (img/s at each share: '
                    '0.5: 2,900, 0.75: 3,412, 1: 3,300)')
