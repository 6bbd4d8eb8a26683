"""Comparing runs: W&B (checked offline, from the run files it writes), curves.png, tools/compare.py, progress."""
import base64
import hashlib
import json
import os
import pty
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tools import compare
from training import reporting

from conftest import MODEL, REPO, TINY, load, run_train, summary
from wandb_records import artifacts, read_run

SUMMARY_KEYS = ('train_loss', 'lr', 'val_loss', 'val_top1', 'val_top5', 'ema_val_loss', 'ema_val_top1',
                'ema_val_top5', 'epoch_seconds', 'img_per_sec', 'data_wait')


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv('WANDB_MODE', 'offline')
    monkeypatch.setenv('WANDB_SILENT', 'true')


def wandb_runs(run_dir):
    """The W&B runs written into a run folder, oldest first."""
    return [read_run(path) for path in sorted(run_dir.glob('wandb/offline-run-*/run-*.wandb'))]


def test_wandb_starts_its_service_before_any_loader_worker_and_finishes_after_they_end(shapes, tmp_path, offline,
                                                                                     monkeypatch):
    """A worker forked while W&B's Popen waits on its exec-error pipe inherits that pipe, and W&B's start then waits
    until the worker exits (intermittently, 300 s at the end of a run and its W&B data lost)."""
    import wandb
    from training.data.workers import CheckedLoader
    events = []

    def record(name, function):
        def recorded(*args, **kwargs):
            events.append((name, threading.current_thread().name))
            return function(*args, **kwargs)
        return recorded

    def iterate(loader, real=CheckedLoader.__iter__):
        events.append(('iterate', threading.current_thread().name))
        yield from real(loader)
    monkeypatch.setattr(wandb, 'setup', record('setup', wandb.setup))
    monkeypatch.setattr(CheckedLoader, '__iter__', iterate)
    monkeypatch.setattr(CheckedLoader, 'close', record('close', CheckedLoader.close))
    monkeypatch.setattr(reporting.WandbLogger, 'finish', record('finish', reporting.WandbLogger.finish))
    assert run_train(shapes, tmp_path, '--epochs', '1', '-j', '2', '--log-wandb') == 0
    names = [name for name, _ in events]
    assert events[0] == ('setup', 'MainThread') and names.index('iterate') > 0
    assert names.index('finish') > max(i for i, name in enumerate(names) if name == 'close')
    assert wandb_runs(tmp_path / 'run')[0]['history']  # its data arrived


def test_wandb_run_holds_the_summary_rows_and_a_resume_continues_it(shapes, tmp_path, offline):
    args = ('--log-wandb', '--wandb-tags', 'tiny', 'cpu', '--wandb-group', 'tests', '--eval-metric', 'loss')
    assert run_train(shapes, tmp_path, '--epochs', '1', *args) == 0
    assert run_train(shapes, tmp_path, '--epochs', '2', '--allow-config-change', *args) == 0
    first, resumed = wandb_runs(tmp_path / 'run')
    assert resumed['id'] == first['id']  # the id travels in the checkpoint
    assert (first['name'], first['group'], first['tags']) == ('run', 'tests', ['tiny', 'cpu'])
    assert first['config']['lr'] == 1e-3 and first['config']['model'] == MODEL
    assert first['config']['environment']['world_size'] == 1
    assert set(first['config']['versions']) == {'torch', 'timm', 'git'}
    assert (first['config']['decode'], first['config']['cpu_decode_share']) == ('cpu', None)  # decode: auto's choice
    assert first['config']['decode_choice']['why'].startswith('the training device is cpu')
    assert resumed['config']['decode_choice']['why'].startswith('kept from the checkpoint')

    epochs = [h for run in (first, resumed) for h in run['history'] if 'epoch' in h]
    rows = summary(tmp_path / 'run')
    assert [h['epoch'] for h in epochs] == [r['epoch'] for r in rows] == [0, 1]
    for logged, row in zip(epochs, rows):
        for key in SUMMARY_KEYS:
            assert logged[f'epoch/{key}'] == pytest.approx(row[key], rel=1e-12), key
    steps = [h for h in first['history'] if 'train/loss' in h]
    assert [h['_step'] for h in steps] == [1, 2, 3, 4, 5]  # log_interval 1: every optimizer step
    assert {'train/lr', 'train/img_per_sec', 'train/data_wait'} <= set(steps[0])
    loss, weights, epoch = reporting.best_of(rows, 'loss')  # best/* follows eval_metric, as checkpoint ranking does
    best = {k: v for k, v in resumed['summary'].items() if k.startswith('best/')}
    assert best == {'best/loss': loss, 'best/weights': weights, 'best/epoch': epoch}
    assert load(tmp_path / 'run' / 'last.pth.tar')['wandb_run_id'] == first['id']


def test_the_model_is_logged_as_an_artifact_at_each_new_best_with_the_exports_files(shapes, tmp_path, offline,
                                                                                      monkeypatch):
    monkeypatch.setenv('WANDB_DATA_DIR', str(tmp_path / 'wandb-data'))  # W&B's staging area, kept for wandb sync
    assert run_train(shapes, tmp_path, '--epochs', '3', '--log-wandb', '--wandb-log-model', 'best') == 0
    run_dir = tmp_path / 'run'
    (run,), path = wandb_runs(run_dir), next(run_dir.glob('wandb/offline-run-*/run-*.wandb'))
    logged = [a for a in artifacts(path) if a['type'] == 'model']  # (the per-class table is one too)
    rows = summary(run_dir)
    new_bests = [int(r['epoch']) for n, r in enumerate(rows)
                 if reporting.best_of(rows[:n + 1], 'top1')[2] == int(r['epoch'])]
    assert [a['metadata']['epoch'] for a in logged] == new_bests  # one version per new best, in order
    for artifact, epoch in zip(logged, new_bests):
        assert (artifact['name'], artifact['type']) == (f"model-{run['id']}", 'model')
        assert sorted(artifact['aliases']) == sorted(['best', 'latest', f'epoch-{epoch}'])
        value, weights, _ = reporting.best_of(rows[:epoch + 1], 'top1')
        assert artifact['metadata'] == dict(epoch=epoch, weights=weights, top1=value)
        assert {'model.safetensors', 'config.json', 'README.md'} <= set(artifact['files'])
        assert all(Path(local).is_file() for _, local in artifact['files'].values())  # staged for wandb sync
    final = logged[-1]['files']  # the newest version holds the files of the run folder's model/, as exported
    for name in ('model.safetensors', 'config.json'):
        digest = base64.b64encode(hashlib.md5((run_dir / 'model' / name).read_bytes()).digest()).decode()
        assert final[name][0] == digest
    assert json.loads((run_dir / 'model' / 'config.json').read_text())['export']['epoch'] == new_bests[-1]


@pytest.mark.parametrize('flags, message', [
    (['--log-wandb', '--wandb-log-model', 'bset'], r'wandb_log_model: expected false, best or end'),
    (['--wandb-log-model', 'end'], r'wandb_log_model end logs the model to W&B: set log_wandb true'),
])
def test_a_misspelled_or_orphan_wandb_log_model_is_refused_in_one_line(shapes, tmp_path, capsys, flags, message):
    assert run_train(shapes, tmp_path, *flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_without_an_api_key_it_logs_offline_and_says_how_to_upload(shapes, tmp_path, monkeypatch):
    for name in ('WANDB_MODE', 'WANDB_API_KEY'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('HOME', str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv('WANDB_SILENT', 'true')
    assert run_train(shapes, tmp_path, '--epochs', '1', '--log-wandb') == 0
    log = (tmp_path / 'run' / 'log.txt').read_text()
    assert 'no W&B API key found: logging to W&B offline' in log
    sync = re.search(r'upload with: wandb sync (\S+)', log).group(1)
    assert list((tmp_path / 'run' / 'wandb').glob('offline-run-*'))[0].as_posix() == sync


@pytest.fixture
def hanging_server():
    """A loopback HTTP endpoint that accepts connections and leaves them unanswered until its event is set, then
    refuses every request (401): a W&B server that hangs, then turns out to be unusable.

    Yields:
        (its URL, the event)
    """
    server = socket.create_server(('127.0.0.1', 0))
    server.settimeout(0.1)
    answer, stop = threading.Event(), threading.Event()

    def refuse(connection):
        answer.wait(timeout=300)
        with connection:
            try:
                connection.settimeout(1.0)
                connection.recv(65536)
                connection.sendall(b'HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n')
            except OSError:
                pass

    def accept():
        while not stop.is_set():
            try:
                connection = server.accept()[0]
            except TimeoutError:
                continue
            threading.Thread(target=refuse, args=(connection,), daemon=True).start()
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{server.getsockname()[1]}', answer
    stop.set()
    answer.set()
    thread.join()
    server.close()


def test_an_unresponsive_wandb_server_neither_holds_up_training_nor_loses_records(shapes, tmp_path, monkeypatch,
                                                                                hanging_server):
    import wandb
    url, answer = hanging_server
    monkeypatch.delenv('WANDB_MODE', raising=False)
    monkeypatch.setenv('HOME', str(tmp_path))  # no ~/.netrc, no W&B settings
    monkeypatch.setenv('WANDB_BASE_URL', url)
    monkeypatch.setenv('WANDB_API_KEY', 'x' * 40)
    monkeypatch.setenv('WANDB_INIT_TIMEOUT', '60')  # not reached: the server's refusal ends the start
    wandb.teardown()  # W&B reads its environment once per process
    log_step = reporting.WandbLogger.log_step

    def log_step_then_answer(self, metrics):
        log_step(self, metrics)
        answer.set()  # a start that held up training would end only at W&B's timeout, before the first step
    monkeypatch.setattr(reporting.WandbLogger, 'log_step', log_step_then_answer)

    assert run_train(shapes, tmp_path, '--epochs', '1', '--log-wandb') == 0
    log = (tmp_path / 'run' / 'log.txt').read_text()
    assert log.index('epoch 0 step 1/5') < log.index('W&B online start failed')
    assert 'logging offline instead' in log and 'W&B failed' not in log
    [run] = wandb_runs(tmp_path / 'run')
    assert run['id'] == load(tmp_path / 'run' / 'last.pth.tar')['wandb_run_id']
    assert [h['_step'] for h in run['history'] if 'train/loss' in h] == [1, 2, 3, 4, 5]  # all, in order
    assert [h['epoch'] for h in run['history'] if 'epoch' in h] == [0]
    assert run['summary']['best/epoch'] == 0
    assert f'upload with: wandb sync {sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))[0]}' in log


def test_a_wandb_failure_warns_once_and_training_goes_on(shapes, tmp_path, offline, monkeypatch):
    import wandb

    def broken_init(**kwargs):
        raise ConnectionError('W&B is down')
    monkeypatch.setattr(wandb, 'init', broken_init)
    assert run_train(shapes, tmp_path, '--log-wandb') == 0
    log = (tmp_path / 'run' / 'log.txt').read_text()
    assert log.count('W&B failed') == 1 and 'training goes on' in log
    assert len(summary(tmp_path / 'run')) == 2


@pytest.fixture(scope='module')
def two_runs(shapes, tmp_path_factory):
    output = tmp_path_factory.mktemp('compare')
    for name, lr in (('lr_low', '1.0e-3'), ('lr_high', '3.0e-3')):
        price = ['--price-per-hour', '2.5'] if name == 'lr_high' else []  # and none: GPU-hours alone
        assert run_train(shapes, output, '--lr', lr, *price, experiment=name) == 0
    return output / 'lr_low', output / 'lr_high'


def test_every_run_folder_gets_curves_png(two_runs):
    with Image.open(two_runs[0] / 'curves.png') as image:
        assert image.format == 'PNG' and image.size == (1200, 800)
        assert len(set(image.convert('L').getdata())) > 10  # drawn, not blank


def test_curves_are_redrawn_at_most_once_a_minute_and_the_newest_rows_at_the_end(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(reporting, 'plot_runs', lambda runs, path: drawn.append([r['epoch'] for r in runs['run']]))
    reporter = reporting.Reporter(tmp_path / 'run', True, reporting.TerminalProgress(wanted=False), epochs=4)
    reporter.run_dir.mkdir()
    rows = [dict(epoch=i, val_top1=10.0 * i) for i in range(4)]
    for epoch in range(3):
        reporter.files(rows[:epoch + 1])
    reporter.wait_for_plot()
    assert drawn == [[0]]  # epochs 1 and 2 came within the minute
    assert [r['epoch'] for r in summary(reporter.run_dir)] == [0, 1, 2]  # summary.csv is rewritten every epoch
    reporter.plotted_at -= reporting.CURVES_INTERVAL
    reporter.files(rows)
    reporter.finish()
    assert drawn == [[0], [0, 1, 2, 3]]  # nothing left to draw at the end
    reporter = reporting.Reporter(tmp_path / 'run', True, reporting.TerminalProgress(wanted=False), epochs=4)
    reporter.files(rows[:3])
    reporter.files(rows)
    reporter.finish()
    assert drawn[2:] == [[0, 1, 2], [0, 1, 2, 3]]


def test_compare_prints_the_numbers_of_summary_csv_and_the_differing_settings(two_runs, tmp_path, capsys):
    still_going = tmp_path / 'still_going'
    still_going.mkdir()
    (still_going / 'config.yaml').write_text((two_runs[0] / 'config.yaml').read_text())
    (still_going / 'summary.csv').write_text((two_runs[0] / 'summary.csv').read_text().splitlines()[0] + '\n')
    out = tmp_path / 'compare.png'
    assert compare.main([str(p) for p in (*two_runs, still_going)] + ['--out', str(out)]) == 0
    printed = capsys.readouterr().out
    for run_dir in two_runs:
        rows = summary(run_dir)
        best = max(rows, key=lambda r: max(r['val_top1'], r['ema_val_top1']))
        best_top1 = max(best['val_top1'], best['ema_val_top1'])
        final = max(rows[-1]['val_top1'], rows[-1]['ema_val_top1'])
        speed = sum(r['img_per_sec'] for r in rows) / len(rows)
        line = next(line for line in printed.splitlines() if line.startswith(f'| {run_dir.name} |'))
        cells = [c.strip() for c in line.strip('|').split('|')]
        assert cells[1:6] == ['2', f'{best_top1:.2f}', str(int(best['epoch'])), cells[4], f'{final:.2f}']
        assert cells[7] == f'{speed:.0f}'
        assert cells[8] == f"{rows[-1]['total_gpu_hours']:,.3g}"
        assert cells[9] == ('-' if run_dir.name == 'lr_low' else f"{rows[-1]['total_cost']:,.2f}")
    assert '| still_going | 0 | - |' in printed
    assert '| lr | 0.001 | 0.003 | 0.001 |' in printed and '| price_per_hour | None | 2.5 | None |' in printed
    with Image.open(out) as image:
        assert image.size == (1200, 800)
    assert compare.main([str(two_runs[0])]) == 0  # without --out: beside the run folders, not in the current folder
    assert (two_runs[0].parent / 'compare.png').is_file()


def test_progress_line_only_on_a_terminal(shapes, tmp_path):
    command = [sys.executable, str(REPO / 'train.py'), '--data-dir', str(shapes), '--output', str(tmp_path),
               '--experiment', 'tty', *TINY, '--epochs', '1', '--log-interval', '5']
    leader, follower = pty.openpty()
    proc = subprocess.Popen(command, cwd=REPO, stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    terminal = b''
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        terminal += chunk
    assert proc.wait() == 0
    os.close(leader)
    assert re.search(rb'\r\x1b\[K.*epoch 0 of 1 \[=+ *\] +\d+% \d/5 .*eta epoch', terminal)
    log = (tmp_path / 'tty' / 'log.txt').read_text()
    assert '\r' not in log and '\x1b' not in log and 'epoch 0 step 5/5' in log

    piped = subprocess.run([*command[:7], 'piped', *command[8:]], cwd=REPO, capture_output=True, text=True)
    assert piped.returncode == 0 and '\r' not in piped.stdout + piped.stderr


def test_resumed_config_yaml_still_names_the_recipe(shapes, tmp_path):
    recipe = tmp_path / 'my_recipe.yaml'
    recipe.write_text('epochs: 1\n')
    assert run_train(shapes, tmp_path, '-c', str(recipe)) == 0
    assert yaml.safe_load((tmp_path / 'run' / 'config.yaml').read_text())['recipe'] == 'my_recipe'
