"""Top-1 per class: evaluate()'s counts, per_class.csv, the log line and the W&B table at the end of a run, and
validate.py's per_class (JSON) and --per-class-csv."""
import csv
import json
import shutil

import pytest
import torch

import validate
from training import per_class
from training.distributed import Processes
from training.engine import evaluate

from conftest import run_train, summary
from wandb_records import read_run


@pytest.fixture(scope='module')
def uneven(shapes, tmp_path_factory):
    """The shapes with 5, 4 or 3 validation images per class (0, 1 or 2 removed by class index), so that counts
    per class tell the classes apart."""
    root = tmp_path_factory.mktemp('uneven') / 'shapes'
    shutil.copytree(shapes, root)
    for i, folder in enumerate(sorted((root / 'val').iterdir())):
        for image in sorted(folder.iterdir())[:i % 3]:
            image.unlink()
    return root


@pytest.fixture(scope='module')
def run(uneven, tmp_path_factory):
    """Two epochs with EMA, logged to W&B offline."""
    output = tmp_path_factory.mktemp('runs')
    with pytest.MonkeyPatch.context() as env:
        env.setenv('WANDB_MODE', 'offline')
        env.setenv('WANDB_SILENT', 'true')
        assert run_train(uneven, output, '--log-wandb') == 0
    return output / 'run'


def read_csv(path) -> list:
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def test_evaluate_counts_the_images_and_top1_hits_of_each_class_for_each_model():
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5)) for _ in range(2)]
    x, y = torch.randn(20, 3, 4, 4), torch.randint(0, 4, (20,))  # no image of class 4
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=6)  # 4 batches
    procs = Processes(0, 1, 0, torch.device('cpu'))
    results = evaluate(models, loader, procs)
    told = evaluate(models, loader, procs, num_classes=5)  # as a distributed evaluation does
    assert [(r['class_images'], r['class_hits']) for r in told] == [(r['class_images'], r['class_hits'])
                                                                    for r in results]
    for model, result in zip(models, results):
        with torch.no_grad():
            predicted = model(x).argmax(1)
        assert result['class_images'] == [int((y == c).sum()) for c in range(5)]
        assert result['class_hits'] == [int(((y == c) & (predicted == c)).sum()) for c in range(5)]
        assert 100 * sum(result['class_hits']) / 20 == pytest.approx(result['top1'])
    assert results[0]['class_hits'] != results[1]['class_hits']


def test_class_rows_and_the_worst_ten_in_label_order_on_ties():
    result = dict(class_images=[4, 5, 0, 5] + [2] * 8, class_hits=[1, 0, 0, 1] + [2] * 7 + [1])
    rows = per_class.class_rows(result, ['a', 'b', 'empty', 'd'] + [''] * 8, 'ema')
    assert rows[:3] == [dict(class_index=0, class_name='a', images=4, top1=25.0, weights='ema'),
                        dict(class_index=1, class_name='b', images=5, top1=0.0, weights='ema'),
                        dict(class_index=2, class_name='empty', images=0, top1=None, weights='ema')]
    assert per_class.worst_line(rows, 'final epoch 9') == (
        'Worst classes (final epoch 9, ema weights): 1 b 0.0%, 3 d 20.0%, 0 a 25.0%, 11 50.0%, 4 100.0%, 5 100.0%, '
        '6 100.0%, 7 100.0%, 8 100.0%, 9 100.0%')


def test_per_class_top1_sums_to_the_logged_top1_over_the_images_of_each_class_folder(run, uneven):
    rows = read_csv(run / 'per_class.csv')
    last = summary(run)[-1]
    weights = rows[0]['weights']
    assert {row['weights'] for row in rows} == {weights}
    logged = last['val_top1' if weights == 'raw' else f'{weights}_val_top1']
    assert logged == max(last['val_top1'], last['ema_val_top1'])  # the weights ranked first at the final epoch
    folders = sorted((uneven / 'val').iterdir())
    assert [(int(r['class_index']), r['class_name'], int(r['images'])) for r in rows] == \
        [(i, folder.name, 5 - i % 3) for i, folder in enumerate(folders)]
    hits = [float(r['top1']) * int(r['images']) / 100 for r in rows]
    assert hits == pytest.approx([round(h) for h in hits], abs=1e-9)  # whole images
    assert 100 * sum(round(h) for h in hits) / sum(int(r['images']) for r in rows) == pytest.approx(logged, abs=1e-9)
    assert not (run / 'per_class.csv.tmp').exists()


def test_the_log_names_the_worst_classes_lowest_first_after_the_final_epoch(run):
    rows = read_csv(run / 'per_class.csv')
    lines = (run / 'log.txt').read_text().splitlines()
    worst, = [i for i, line in enumerate(lines) if 'Worst classes' in line]
    assert lines[worst - 1].split(' ', 2)[2].startswith('epoch 1 done')
    ranked = sorted(rows, key=lambda r: (float(r['top1']), int(r['class_index'])))
    named = ', '.join(f"{r['class_index']} {r['class_name']} {float(r['top1']):.1f}%" for r in ranked)
    assert lines[worst].endswith(f"Worst classes (final epoch 1, {rows[0]['weights']} weights): {named}")


def test_the_wandb_run_holds_the_per_class_table_once(run):
    rows = read_csv(run / 'per_class.csv')
    folder, = run.glob('wandb/offline-run-*')
    logged = [h for h in read_run(next(folder.glob('run-*.wandb')))['history'] if 'per_class/_type' in h]
    assert len(logged) == 1 and logged[0]['per_class/_type'] == 'table-file'
    assert logged[0]['epoch'] == 1  # in the row of the final epoch
    table = json.loads((folder / 'files' / logged[0]['per_class/path']).read_text())
    assert table['columns'] == list(per_class.COLUMNS)
    assert table['data'] == [[int(r['class_index']), r['class_name'], int(r['images']), float(r['top1']),
                              r['weights']] for r in rows]


def test_validate_writes_the_per_class_top1_the_run_wrote_for_its_last_checkpoint(run, tmp_path):
    results_file, csv_file = tmp_path / 'r.json', tmp_path / 'classes.csv'
    assert validate.main(['-j', '0', '--device', 'cpu', '--checkpoint', str(run / 'last.pth.tar'),
                          '--results-file', str(results_file), '--per-class-csv', str(csv_file)]) == 0
    assert csv_file.read_text() == (run / 'per_class.csv').read_text()
    results = json.loads(results_file.read_text())
    assert results['per_class'] == [dict(class_index=int(r['class_index']), class_name=r['class_name'],
                                         images=int(r['images']), top1=float(r['top1']))
                                    for r in read_csv(run / 'per_class.csv')]
    assert 'class_images' not in results and 'class_hits' not in results


@pytest.mark.parametrize('option', ['--results-file', '--per-class-csv'])
@pytest.mark.parametrize('name, message', [('missing/out', ': no folder '), ('.', ' is a directory, not a file')])
def test_an_unwritable_output_is_refused_in_one_line_before_evaluating(run, tmp_path, capsys, option, name, message):
    path = tmp_path / name
    assert validate.main(['--checkpoint', str(run / 'last.pth.tar'), option, str(path)]) == 2
    out = capsys.readouterr()
    assert out.out == '' and out.err.splitlines() == [f'validate.py: error: {option} {path}{message}'
                                                      f'{path.parent if "no folder" in message else ""}']
