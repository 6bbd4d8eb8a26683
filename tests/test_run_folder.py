"""The run folder is safe: one trainer at a time, --start-over deletes only a run of ours, and a run whose state could
not be saved never ends as if it had."""
import os
import re
import signal
import threading
from pathlib import Path

import pytest
import timm
import torch

from training import checkpoint

from conftest import load, run_train, spawn_train, summary


def test_a_second_trainer_on_the_same_folder_exits_at_once_naming_the_holder(shapes, tmp_path, capsys):
    first = spawn_train(shapes, tmp_path, '--epochs', '50')
    for line in first.stdout:
        if 'epoch 0 step 1/' in line:
            break
    try:
        assert run_train(shapes, tmp_path) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1
        assert f'{tmp_path}/run is in use by another train.py (pid {first.pid} on ' in err[0]
    finally:
        first.kill()  # a killed trainer's lock goes with it
        first.wait()
    assert run_train(shapes, tmp_path, '--epochs', '1', '--allow-config-change') == 0
    assert len(summary(tmp_path / 'run')) == 1


@pytest.mark.parametrize('output, experiment', [('out', '.'), ('out/sub', '..'), ('out', '/abs/dir'),
                                                ('out', 'a/b')])
def test_an_experiment_is_a_name_not_a_path(shapes, tmp_path, capsys, output, experiment):
    (tmp_path / 'out' / 'sub').mkdir(parents=True)
    keep = tmp_path / 'out' / 'other-run.txt'
    keep.write_text('not ours')
    argv = ['--data-dir', str(shapes), '--output', str(tmp_path / output), '--experiment', experiment,
            '--start-over', '--device', 'cpu']
    import train
    assert train.main(argv) == 2
    assert 'experiment must be a folder name, not a path' in capsys.readouterr().err
    assert keep.read_text() == 'not ours' and (tmp_path / 'out' / 'sub').is_dir()


def test_start_over_checks_every_input_before_deleting(shapes, tmp_path, capsys):
    assert run_train(shapes, tmp_path, '--epochs', '1') == 0
    before = sorted(p.name for p in (tmp_path / 'run').iterdir())
    assert run_train(tmp_path / 'typo', tmp_path, '--start-over') == 2
    assert 'no dataset at' in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / 'run').iterdir()) == before


def test_start_over_deletes_only_the_files_a_run_writes(shapes, tmp_path):
    assert run_train(shapes, tmp_path, '--epochs', '1') == 0
    notes = tmp_path / 'run' / 'notes.md'
    notes.write_text('mine')
    (tmp_path / 'run' / 'plots').mkdir()
    assert run_train(shapes, tmp_path, '--epochs', '1', '--seed', '7', '--start-over') == 0
    assert notes.read_text() == 'mine' and (tmp_path / 'run' / 'plots').is_dir()
    assert load(tmp_path / 'run' / 'last.pth.tar')['config']['seed'] == 7
    assert len(summary(tmp_path / 'run')) == 1


def test_start_over_refuses_a_folder_that_is_not_a_run_of_ours(shapes, tmp_path, capsys):
    folder = tmp_path / 'run'
    folder.mkdir()
    (folder / 'log.txt').write_text('my own log')
    (folder / 'weights.pth.tar').write_bytes(b'mine')
    assert run_train(shapes, tmp_path, '--start-over') == 2
    assert 'is not a run folder of train.py' in capsys.readouterr().err
    assert (folder / 'log.txt').read_text() == 'my own log' and (folder / 'weights.pth.tar').read_bytes() == b'mine'


def disk_full(obj, path):
    with open(path, 'wb') as f:
        f.write(b'partial')
    raise OSError(28, 'No space left on device')


def test_a_run_whose_saves_all_fail_does_not_end_as_finished(shapes, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(checkpoint, 'fsync_write', disk_full)
    assert run_train(shapes, tmp_path, '--epochs', '1') == 74
    out = capsys.readouterr().out
    assert 'ERROR: could not save the epoch 0 checkpoint (No space left on device); training continues. The newest ' \
           'saved state is none: nothing has been saved yet' in out
    assert 'training finished, but its final state was not saved (No space left on device)' in out
    assert 'Finished' not in out and 'intact' not in out
    assert not list((tmp_path / 'run').glob('*.pth.tar'))  # no partial files left


def test_a_failed_save_keeps_the_last_good_checkpoint_and_training_goes_on(shapes, tmp_path, monkeypatch, capsys):
    assert run_train(shapes, tmp_path, '--epochs', '1') == 0
    good = load(tmp_path / 'run' / 'last.pth.tar')
    monkeypatch.setattr(checkpoint, 'fsync_write', disk_full)
    assert run_train(shapes, tmp_path, '--epochs', '2', '--allow-config-change') == 74
    out = capsys.readouterr().out
    assert 'could not save the epoch 1 checkpoint (No space left on device)' in out
    assert 'The newest saved state is none' in out  # none saved by this process: the files from before are intact
    assert load(tmp_path / 'run' / 'last.pth.tar')['progress'] == good['progress']
    assert [r['epoch'] for r in summary(tmp_path / 'run')] == [0, 1]  # training went on and logged its epoch
    monkeypatch.undo()
    assert run_train(shapes, tmp_path, '--epochs', '2', '--allow-config-change') == 0  # the re-run saves it
    assert load(tmp_path / 'run' / 'last.pth.tar')['progress']['epoch'] == 2


def test_the_save_error_is_the_operating_systems_not_torchs(tmp_path, monkeypatch):
    import io
    import torch

    class FullDisk(io.FileIO):
        def write(self, data):
            raise OSError(28, 'No space left on device')
    monkeypatch.setattr(checkpoint, 'open', lambda path, mode: FullDisk(path, mode), raising=False)
    with pytest.raises(OSError, match='No space left on device'):
        checkpoint.fsync_write({'w': torch.zeros(1000)}, tmp_path / 'x.pth.tar')


def test_a_stop_right_after_an_epoch_checkpoint_says_what_was_saved(shapes, tmp_path):
    proc = spawn_train(shapes, tmp_path, '--epochs', '3')
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if 'epoch 0 done' in line:  # evaluation done, the epoch's checkpoint follows
            os.kill(proc.pid, signal.SIGTERM)
            break
    lines.append(proc.stdout.read())
    log = ''.join(lines)
    assert proc.wait() == 75, log
    assert 'Interrupted: the epoch 0 checkpoint saved; run the same command again to continue' in log
    assert not re.search(r'Saving recovery checkpoint', log)
    assert load(tmp_path / 'run' / 'last.pth.tar')['progress']['epoch'] == 1


def test_start_over_deletes_our_files_by_their_exact_names_and_keeps_look_alikes(tmp_path):
    run_dir = tmp_path / 'run'
    (run_dir / 'wandb' / 'run-1').mkdir(parents=True)
    (run_dir / 'config.yaml').write_text(checkpoint.CONFIG_HEADER + ' of run run\n')
    ours = ['config.yaml.tmp', 'log.txt', 'summary.csv', 'summary.csv.tmp', 'per_class.csv', 'per_class.csv.tmp',
            'curves.png', 'curves.png.tmp.png',
            'last.pth.tar', 'previous.pth.tar', 'model_best.pth.tar', 'checkpoint-12.pth.tar', 'recovery-3-250.pth.tar',
            'recovery-3-250.pth.tar.corrupt', 'tmp.pth.tar', 'recovery_tmp.pth.tar', 'previous.tmp.pth.tar']
    users = ['pretrained.pth.tar', 'notes.tmp', 'plot.tmp.png', 'weights.tmp.pth.tar', 'checkpoint-best.pth.tar',
             'recovery-old.pth.tar', 'last.pth.tar.bak', 'mine.pth.tar.corrupt', 'per_class.csv.bak']
    for name in ours + users:
        (run_dir / name).write_bytes(b'x')
    checkpoint.clear_run_folder(run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(users)


def test_start_over_refuses_to_delete_the_initial_checkpoint_it_starts_from(shapes, tmp_path, capsys):
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    (run_dir / 'config.yaml').write_text(checkpoint.CONFIG_HEADER + ' of run run\n')
    best = run_dir / 'model_best.pth.tar'
    weights = timm.create_model('resnet50_custom', num_classes=10).state_dict()
    torch.save({'state_dict': weights, 'state_dict_ema': weights}, best)
    assert run_train(shapes, tmp_path, '--start-over', '--initial-checkpoint', str(best)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f'train.py: error: --initial-checkpoint {best} is a file of the run that --start-over deletes: '
                   f'copy it out of {run_dir} first and start from the copy']
    assert sorted(p.name for p in run_dir.iterdir()) == ['.train.lock', 'config.yaml', 'model_best.pth.tar']


def children(pid: int) -> list:
    """The processes whose parent is pid."""
    found = []
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try:
            state_and_parent = stat.read_text().rsplit(')', 1)[1].split()[:2]
        except OSError:  # ended meanwhile
            continue
        if int(state_and_parent[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def running(pid: int) -> bool:
    try:
        return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False


def test_a_killed_trainer_frees_its_run_folder_while_its_loader_workers_live_on(shapes, tmp_path, capsys):
    """SIGKILL (the OOM killer) ends the trainer alone; its loader workers notice within 5 s (torch's check of their
    parent). A second start within that time finds the run folder free."""
    first = spawn_train(shapes, tmp_path, '--epochs', '50', '-j', '2')
    watchdog = threading.Timer(120, first.kill)  # a start that hangs fails the test instead of hanging it
    watchdog.start()
    workers = []
    try:
        for line in first.stdout:
            if 'epoch 0 step 1/' in line:
                break
        workers = children(first.pid)
        assert len(workers) == 2
        first.kill()
        assert first.wait(timeout=10) == -signal.SIGKILL
        assert all(running(pid) for pid in workers)
        assert run_train(shapes, tmp_path, '--epochs', '1') == 0
        assert 'in use by another train.py' not in capsys.readouterr().err
    finally:
        watchdog.cancel()
        first.kill()
        for pid in workers:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
    assert len(summary(tmp_path / 'run')) == 1


def test_a_run_stopped_by_bad_input_leaves_no_run_folder_behind(tmp_path, capsys):
    assert run_train(tmp_path / 'typo', tmp_path) == 2  # no dataset: found once the run folder is claimed
    assert 'no dataset at' in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == []
    (tmp_path / 'mine').mkdir()  # a folder made beforehand is not this run's to remove
    assert run_train(tmp_path / 'typo', tmp_path, experiment='mine') == 2
    assert (tmp_path / 'mine').is_dir()


def test_a_blank_experiment_name_is_refused_in_one_line(shapes, tmp_path, capsys):
    assert run_train(shapes, tmp_path, experiment=' ') == 2
    assert capsys.readouterr().err.strip().splitlines() == ["train.py: error: experiment must be a folder name, not "
                                                            "blank: ' '"]
    assert sorted(tmp_path.iterdir()) == []
