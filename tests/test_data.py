import ast
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment as timm_auto_augment
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.transforms import ColorJitter, Compose, InterpolationMode, RandomHorizontalFlip, TrivialAugmentWide

import train
from training import builtin_data
from training.checkpoint import data_changes
from training.config import UserError, parse_config
from training.data import (BatchLayout, EvalBatchSampler, TrainBatchSampler, create_train_loader, open_datasets,
                           open_image_folder)
import training.data.cpu_path as cpu_path
from training.data.cpu_path import DraftRandomResizedCrop, SeededSamples, auto_augment_ops, train_transform
from training.data.sources import DecodeRGB

from conftest import REPO, lr_schedule


def flat(batches) -> list:
    return [item for batch in batches for item in batch]


def test_an_epoch_trains_each_sample_at_most_once_and_steps_cover_whole_batches():
    sampler = TrainBatchSampler(103, BatchLayout.create(16, 1, None), rank=0, seed=1)
    items = flat(sampler)
    assert sampler.steps_per_epoch == 6 and len(items) == 96
    assert len({index for index, _ in items}) == 96 and all(0 <= i < 103 for i, _ in items)
    sampler.set_position(1, 0)
    assert [i for i, _ in flat(sampler)] != [i for i, _ in items]  # a new order every epoch


def test_steps_hold_the_same_samples_and_seeds_on_any_number_of_processes():
    one = TrainBatchSampler(100, BatchLayout.create(16, 1, 8), rank=0, seed=3)
    ranks = [TrainBatchSampler(100, BatchLayout.create(16, 2, None), rank=r, seed=3) for r in (0, 1)]
    one_batches = list(one)
    rank_batches = [list(s) for s in ranks]
    assert len(one_batches) == 12 and all(len(b) == 6 for b in rank_batches)
    for step in range(6):  # 1 process, micro-batches 2k and 2k+1 == rank 0 and rank 1 of step k
        assert one_batches[2 * step] == rank_batches[0][step]
        assert one_batches[2 * step + 1] == rank_batches[1][step]


def test_resuming_at_a_step_yields_exactly_the_remaining_batches():
    layout = BatchLayout.create(8, 1, None)
    full = list(TrainBatchSampler(50, layout, rank=0, seed=0))
    resumed = TrainBatchSampler(50, layout, rank=0, seed=0)
    resumed.set_position(0, 4)
    assert len(resumed) == 2 and list(resumed) == full[4:]


def test_repeated_augmentation_trains_the_epochs_first_samples_aug_repeats_times_and_keeps_its_length():
    layout = BatchLayout.create(12, 1, None)
    plain = [i for i, _ in flat(TrainBatchSampler(100, layout, rank=0, seed=4))]
    items = flat(TrainBatchSampler(100, layout, rank=0, seed=4, repeats=3))
    indices = [i for i, _ in items]
    assert len(indices) == len(plain) == 96
    assert sorted(Counter(indices).values()) == [3] * 32
    assert set(indices) == set(plain[:32])  # timm's semantics: the permutation's first 96 / 3 samples
    assert len({seed for _, seed in items}) == 96  # each copy its own seed


@pytest.mark.parametrize('world', [2, 3])
def test_repeated_copies_are_split_over_processes_and_steps_match_one_process(world):
    one = list(TrainBatchSampler(100, BatchLayout.create(12, 1, 12 // world), rank=0, seed=5, repeats=3))
    ranks = [list(TrainBatchSampler(100, BatchLayout.create(12, world, None), rank=r, seed=5, repeats=3))
             for r in range(world)]
    assert len(one) == 8 * world and all(len(batches) == 8 for batches in ranks)
    for step in range(8):  # 1 process, micro-batches world * k + r == rank r of step k
        assert [b[step] for b in ranks] == one[world * step:world * (step + 1)]
        step_indices = [i for b in ranks for i, _ in b[step]]
        assert sorted(Counter(step_indices).values()) == [3] * 4  # each step holds all copies of its samples
        for b in ranks:  # a process holds at most ceil(3 / world) copies of a sample
            assert max(Counter(i for i, _ in b[step]).values()) == -(-3 // world)


def test_resuming_with_repeated_augmentation_yields_exactly_the_remaining_batches():
    layout = BatchLayout.create(8, 1, 4)
    full = TrainBatchSampler(50, layout, rank=0, seed=2, repeats=2)
    full.set_position(1, 0)
    resumed = TrainBatchSampler(50, layout, rank=0, seed=2, repeats=2)
    resumed.set_position(1, 4)
    assert len(resumed) == 4 and list(resumed) == list(full)[8:]


def test_repeated_copies_are_augmented_differently(shapes):
    config = parse_config(['--img-size', '32', '--aug-repeats', '3', '--scale', '0.3', '1.0', '-j', '0'])
    loader, sampler = create_train_loader(open_image_folder(shapes, 'train'), config, dict(
        input_size=(3, 32, 32), interpolation='bilinear', mean=(0.5,) * 3, std=(0.25,) * 3),
        BatchLayout.create(12, 1, None), 0, torch.device('cpu'))
    x, y = next(iter(loader))
    indices = [i for i, _ in next(iter(sampler))]
    copies = [(a, b) for a in range(12) for b in range(a + 1, 12) if indices[a] == indices[b]]
    assert len(copies) == 4 * 3
    for a, b in copies:
        assert y[a] == y[b] and not torch.equal(x[a], x[b])


def test_batch_layout_splits_the_global_batch():
    assert BatchLayout.create(1024, 8, None).micro_batch == 128
    layout = BatchLayout.create(256, 1, 48)
    assert (layout.accum_steps, layout.micro_batch) == (8, 32)  # 6 would not divide 256
    with pytest.raises(UserError, match='batch_size 100 is not divisible by 8 processes'):
        BatchLayout.create(100, 8, None)


@pytest.mark.parametrize('size, world', [(47, 2), (47, 3), (5, 4), (64, 2)])
def test_validation_shards_count_each_image_once(size, world):
    samplers = [EvalBatchSampler(size, 8, r, world) for r in range(world)]
    indices = sorted(i for s in samplers for i in flat(s))
    assert indices == list(range(size))
    assert all(s.common_batches <= len(s) for s in samplers)


def test_a_samples_augmentation_depends_on_its_seed_only(shapes):
    config = parse_config(['--img-size', '32', '--color-jitter', '0.4', '--auto-augment', 'rand-m9-mstd0.5', '-j', '0'])
    dataset = open_image_folder(shapes, 'train')
    loader, _ = create_train_loader(dataset, config, dict(input_size=(3, 32, 32), interpolation='bilinear',
                                    mean=(0.5,) * 3, std=(0.25,) * 3), BatchLayout.create(8, 1, None), 0,
                                    torch.device('cpu'))
    seeded = SeededSamples(dataset)
    first = seeded[(3, 1234)][0]
    for other in range(5):
        seeded[(other, other)]
    assert torch.equal(seeded[(3, 1234)][0], first)
    assert not torch.equal(seeded[(3, 1235)][0], first)


@pytest.mark.parametrize('policy', ['rand-m9-mstd0.5-inc1', 'rand-n1-m10-mstd101-inc1-p1.0', 'original'])
def test_auto_augment_policies_produce_batches(shapes, policy):
    config = parse_config(['--img-size', '32', '--auto-augment', policy, '-j', '0'])
    loader, _ = create_train_loader(open_image_folder(shapes, 'train'), config,
                                    dict(input_size=(3, 32, 32), interpolation='bilinear', mean=(0.5,) * 3,
                                         std=(0.25,) * 3), BatchLayout.create(8, 1, None), 0, torch.device('cpu'))
    x, y = next(iter(loader))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (8,)


def test_optimizers_skip_weight_decay_on_norm_layers_and_biases():
    model = train.build_model(parse_config([]), 10)
    for name, cls in (('momentum', 'SGD'), ('adamw', 'AdamW'), ('lamb', 'Lamb')):
        optimizer = train.build_optimizer(parse_config(['--opt', name, '--weight-decay', '0.05']), model)
        assert type(optimizer).__name__ == cls
        for group in optimizer.param_groups:
            assert group['weight_decay'] == (0.0 if all(p.ndim <= 1 for p in group['params']) else 0.05)
    with pytest.raises(UserError, match="optimizer 'adamq'"):
        train.build_optimizer(parse_config(['--opt', 'adamq']), model)


def test_cosine_schedule_with_warmup_is_a_function_of_the_step():
    config = parse_config(['--lr', '0.4', '--epochs', '10', '--warmup-epochs', '2', '--warmup-lr', '0.0',
                           '--min-lr', '0.01'])
    lr_at = lr_schedule(config, steps_per_epoch=10)
    assert lr_at(0) == 0.0 and lr_at(10) == pytest.approx(0.2)  # linear warmup over 20 steps
    assert lr_at(50) == pytest.approx(0.01 + 0.39 * 0.5)  # timm's cosine spans all 100 steps, warmup included
    assert lr_at(100) == pytest.approx(0.01)
    assert lr_at(35) == lr_at(35)  # no hidden state: the same step gives the same lr


@pytest.mark.parametrize('policy', ['trivialaugment', 'ta-wide'])
def test_an_unknown_auto_augment_policy_is_a_clear_error(shapes, policy):
    config = parse_config(['--img-size', '32', '--auto-augment', policy])
    with pytest.raises(UserError, match=f"augmentation settings refused by timm .*'{policy}'") as error:
        create_train_loader(open_image_folder(shapes, 'train'), config, dict(
            input_size=(3, 32, 32), interpolation='bilinear', mean=(0.5,) * 3, std=(0.25,) * 3),
            BatchLayout.create(8, 1, None), 0, torch.device('cpu'))
    assert '\n' not in str(error.value)


def augmented_train_set(shapes, *args: str, interpolation: str = 'bilinear'):
    """The shapes' training set with the training transform of these options, at 32 px."""
    dataset = open_image_folder(shapes, 'train')
    create_train_loader(dataset, parse_config(['--img-size', '32', '-j', '0', *args]),
                        dict(input_size=(3, 32, 32), interpolation=interpolation, mean=(0.5,) * 3, std=(0.25,) * 3),
                        BatchLayout.create(8, 1, None), 0, torch.device('cpu'))
    return dataset


def augmenting_steps(transform) -> list:
    """The steps of a (nested) Compose after the image is decoded."""
    if isinstance(transform, Compose):
        return [step for t in transform.transforms for step in augmenting_steps(t)]
    return [] if isinstance(transform, DecodeRGB) else [transform]


@pytest.mark.parametrize('interpolation, draft, crop', [
    ('bilinear', '--jpeg-draft', DraftRandomResizedCrop),
    ('bicubic', '--no-jpeg-draft', RandomResizedCropAndInterpolation)])
def test_ta_wide_is_torchvisions_trivial_augment_wide_at_the_training_interpolation_without_jitter(
        shapes, interpolation, draft, crop):
    dataset = augmented_train_set(shapes, '--auto-augment', 'ta_wide', '--color-jitter', '0.4', draft,
                                  interpolation=interpolation)
    steps = augmenting_steps(dataset.transform)
    assert [type(t) for t in steps[:3]] == [crop, RandomHorizontalFlip, TrivialAugmentWide]
    assert steps[2].interpolation == InterpolationMode(interpolation)
    assert not any(isinstance(t, ColorJitter) for t in steps)


def test_ta_wide_augmentation_depends_on_its_seed_only(shapes):
    seeded = SeededSamples(augmented_train_set(shapes, '--auto-augment', 'ta_wide'))
    plain = SeededSamples(augmented_train_set(shapes, '--color-jitter', '0'))
    items = [(index, 1000 + index) for index in range(8)]
    first = [seeded[item][0] for item in items]
    seeded[(9, 9)]
    assert all(torch.equal(seeded[item][0], x) for item, x in zip(items, first))
    assert not any(torch.equal(seeded[(index, seed + 1)][0], x) for (index, seed), x in zip(items, first))
    # the same crops and flips without it: TrivialAugmentWide changed some of them
    assert not all(torch.equal(plain[item][0], x) for item, x in zip(items, first))


def test_ta_wide_settings_it_cannot_run_with_are_refused_in_one_line():
    with pytest.raises(UserError, match='auto_augment ta_wide rotates and shears at one interpolation') as error:
        parse_config(['--auto-augment', 'ta_wide', '--train-interpolation', 'random'])
    assert '\n' not in str(error.value)


def package_imports(folder: Path) -> dict:
    """{module: the modules of the same package it imports} of training/data/."""
    graph = {}
    for path in folder.glob('*.py'):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level == 1):
                imported.update([node.module] if node.module else [alias.name for alias in node.names])
        graph[path.stem] = imported - {'__init__'}
    return graph


def test_the_data_package_imports_one_way_and_the_rest_of_the_project_imports_its_front():
    graph = package_imports(REPO / 'training' / 'data')
    assert {'sources', 'sampling', 'cpu_path', 'device_path', 'loaders'} <= set(graph)

    def reaches(start: str, seen: set) -> set:
        for module in graph.get(start, ()):
            if module not in seen:
                seen.add(module)
                reaches(module, seen)
        return seen
    circles = [m for m in graph if (m != '__init__') and (m in reaches(m, set()))]
    assert circles == []
    inside = re.compile(r'^\s*(from|import) training\.data\.', re.M)
    users = [REPO / 'train.py', REPO / 'validate.py', *(REPO / 'tools').glob('*.py'), *(REPO / 'training').glob('*.py')]
    assert [p.name for p in users if inside.search(p.read_text())] == []


def test_posterize_to_no_bits_is_black_where_pillow_13_would_stop_the_run():
    """RSB's RandAugment (increasing ops, magnitude noise) reaches magnitude 10, where timm posterizes to 0 bits."""
    config = parse_config(['--auto-augment', 'rand-m10-inc1', '--img-size', '32'])
    data_cfg = dict(input_size=(3, 32, 32), interpolation='bilinear', mean=(0.5,) * 3, std=(0.5,) * 3)
    [op] = [op for op in auto_augment_ops(train_transform(config, data_cfg).transforms)
            if op.name == 'PosterizeIncreasing']
    op.prob = 1.0
    image = Image.new('RGB', (8, 8), (200, 100, 50))
    with pytest.raises(ValueError):
        timm_auto_augment.posterize(image, 0)
    assert np.asarray(op(image)).max() == 0
    assert np.array_equal(np.asarray(cpu_path.posterize(image, 2)), np.asarray(timm_auto_augment.posterize(image, 2)))


def test_class_folders_swapped_under_the_same_file_names_are_a_data_change(tmp_path):
    """Many datasets (the built-in shapes too) name the files of every class 00000.jpg, ...: the listing stays."""
    root = builtin_data.generate(tmp_path / 'shapes', seed=0, train_per_class=3, val_per_class=1, image_size=32)
    before = open_datasets(root, '', 'train', 'val', None).fingerprint
    train = root / 'train'
    first, second = sorted(p.name for p in train.iterdir())[:2]
    (train / first).rename(train / 'swap')
    (train / second).rename(train / first)
    (train / 'swap').rename(train / second)
    after = open_datasets(root, '', 'train', 'val', None).fingerprint
    assert after['train_files'] == before['train_files'] and after['class_names'] == before['class_names']
    assert data_changes(before, after) == ['data files: the images under the same names changed (of the first and '
                                           'last files of each class, a size or first bytes differ: class folders '
                                           'swapped or images replaced)']
