"""tools/benchmark.py: the pipeline table at tiny scale on CPU, and the ImageNet-like JPEGs it makes."""
import re

import pytest
import torch
from PIL import Image

from tools import benchmark
from training.reporting import step_line

from conftest import MODEL

ROWS = ('step + ModelEmaV3 on device tensors, eager', 'train.py, decode auto',
        'train.py, decode cpu --auto-augment rand-m6-mstd0.5-inc1',
        'train.py, decode gpu --auto-augment rand-m6-mstd0.5-inc1 --cpu-decode-share 1',
        'train.py, decode gpu --auto-augment rand-m6-mstd0.5-inc1 --cpu-decode-share 0',
        'loader alone: ours, decode cpu, jpeg_draft off',
        'loader alone: ours, decode cpu, jpeg_draft on', 'loader alone: ours, decode gpu',
        "loader alone: timm's create_loader", 'train.py, decode gpu', 'train.py, decode cpu')


@pytest.fixture(scope='module')
def jpegs(tmp_path_factory):
    return benchmark.imagenet_like(tmp_path_factory.mktemp('cache'), images=40, processes=2)


def test_generated_jpegs_are_imagenet_like(jpegs):
    train = sorted((jpegs / 'train').rglob('*.JPEG'))
    assert len(train) == 40 and len(list((jpegs / 'train').iterdir())) == 2  # 40 images in 40 // 20 classes
    assert sorted(p.name for p in (jpegs / 'val').iterdir()) == sorted(p.name for p in (jpegs / 'train').iterdir())
    for path in train:
        width, height = Image.open(path).size
        assert (300 <= width <= 500) and (250 <= height <= 450)
        assert 25e3 < path.stat().st_size < 150e3
    assert 50 <= benchmark.jpeg_stats(jpegs / 'train').mean_kb <= 90


def test_generated_jpegs_are_found_again_not_remade(jpegs):
    stamp = (jpegs / 'train').stat().st_mtime_ns
    assert benchmark.imagenet_like(jpegs.parent, images=40) == jpegs
    assert (jpegs / 'train').stat().st_mtime_ns == stamp


@pytest.fixture
def one_thread(monkeypatch):
    """Speeds are not checked here, and on a CPU shared with other jobs multi-threaded torch runs many times slower."""
    threads = torch.get_num_threads()
    monkeypatch.setenv('OMP_NUM_THREADS', '1')  # train.py's processes
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_pipeline_table_has_a_speed_in_every_row(jpegs, tmp_path, one_thread):
    out = tmp_path / 'table.md'
    code = benchmark.main(['pipeline', '--data', str(jpegs), '--model', MODEL, '--img-size', '32', '-b', '8',
                           '-j', '1', '--steps', '1', '--device', 'cpu', '--auto-augment', 'rand-m6-mstd0.5-inc1',
                           '--out', str(out)])
    assert code == 0
    lines = [line for line in out.read_text().splitlines() if line.startswith('| ') and 'measured' not in line]
    table = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip('|').split('|')] for line in lines)}
    assert tuple(table) == ROWS
    for what, (workers, speed, share, wait, how) in table.items():
        assert float(speed.replace(',', '')) > 0, what
        assert re.fullmatch(r'\d+%', share), what
    assert table['train.py, decode cpu'][3].endswith('%')  # its data-wait share
    assert 'chose decode cpu (the training device is cpu: the device path would decode on the same cores)' in \
        table['train.py, decode auto'][4]


def test_augment_ops_table_times_every_op_in_pil_and_on_the_device(tmp_path, one_thread):
    out = tmp_path / 'ops.md'
    assert benchmark.main(['augment-ops', '--sizes', '32', '-b', '2', '--device', 'cpu', '--repeats', '1',
                           '--out', str(out)]) == 0
    rows = [[c.strip() for c in line.strip('|').split('|')] for line in out.read_text().splitlines()
            if line.startswith('| ') and not line.startswith('| op |')]
    assert [row[0] for row in rows] == list(benchmark.AUTO_AUGMENT_OPS[1:])
    assert all((float(row[2]) > 0) and (float(row[3]) > 0) for row in rows)


def test_workers_table_gives_each_loaders_images_per_cpu_second(jpegs, tmp_path, one_thread):
    out = tmp_path / 'workers.md'
    assert benchmark.main(['workers', '--data', str(jpegs), '--sizes', '32', '-b', '4', '-j', '1', '--batches', '2',
                           '--repeats', '1', '--out', str(out)]) == 0
    rows = [[c.strip() for c in line.strip('|').split('|')] for line in out.read_text().splitlines()
            if line.startswith('| ') and not line.startswith('| loader |')]
    assert [row[0] for row in rows] == ["timm's create_loader", 'ours, decode cpu, jpeg_draft off',
                                        'ours, decode cpu, jpeg_draft on', 'ours, decode gpu, workers only',
                                        'ours, decode gpu, cpu_decode_share 1, workers only']
    assert all(float(row[2].replace(',', '')) > 0 for row in rows) and rows[0][3] == '1.00x'


def test_step_lines_of_train_py_are_parsed():
    line = step_line(dict(epoch=0, step=12, steps_per_epoch=84, loss=6.9, lr=0.1, img_per_sec=1543.6, data_wait=0.27,
                          eta_epoch=30, eta_run=3000))
    assert benchmark.step_windows(f'2026-11-26 03:00:00 {line}\n') == [(12, 84, 1544.0, 0.27)]


def test_steady_windows_start_once_the_prefetched_batches_are_used_up():
    # (step, steps per epoch, img/s, data wait): the start, two windows served from the prefetch buffer, the window
    # in which it ran out, then the loader's own pace
    loader_bound = [(3, 18, 100, 0.3), (6, 18, 900, 0.0), (9, 18, 880, 0.0), (12, 18, 500, 0.2), (15, 18, 400, 0.4),
                    (18, 18, 410, 0.4)]
    assert benchmark.steady_windows(loader_bound) == loader_bound[4:]
    compute_bound = [(3, 9, 100, 0.3), (6, 9, 900, 0.0), (9, 9, 880, 0.01)]
    assert benchmark.steady_windows(compute_bound) == compute_bound[1:]


def test_methods_table_times_each_method_against_the_plain_step(capsys, one_thread):
    assert benchmark.main(['methods', '--img-size', '32', '-b', '4', '--repeats', '1', '--device', 'cpu',
                           '--teachers', 'resnet18']) == 0
    out = capsys.readouterr().out
    rows = re.findall(r'^\| (plain|attn_layer: se|kd_teacher: resnet18) \| (\d+) ms \| ([+-]\d+)% \|$', out, re.M)
    assert [r[0] for r in rows] == ['plain', 'attn_layer: se', 'kd_teacher: resnet18']
    plain = int(rows[0][1])
    # each share from the unrounded times: within the rounding of the printed milliseconds
    assert rows[0][2] == '+0'
    assert all(abs(int(pct) - 100 * (int(ms) / plain - 1)) <= 100 / plain + 1 for _, ms, pct in rows)
    assert re.search(r'update_parameters \d+ ms; update_bn: \d+ ms per batch', out)
