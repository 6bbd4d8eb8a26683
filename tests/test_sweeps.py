"""W&B sweeps: train.py run as wandb's agent runs it (its environment and command line, from wandb's own functions)."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml
from wandb.sdk.launch.sweeps import utils as sweep_utils
from wandb.sdk.lib import config_util

import train
from training.config import BY_NAME
from training.reporting import best_of

from conftest import MODEL, REPO, load, summary
from wandb_records import read_run

SWEEPS = sorted((REPO / 'sweeps').glob('*.yaml'))
SWEEP_ID = 'swp0test'


def agent_command(sweep: dict, params: dict) -> list:
    """The command line wandb's agent runs for a trial (wandb_agent.Agent._command_run): the sweep's command, its
    macros filled by wandb's create_sweep_command and create_sweep_command_args."""
    command = sweep_utils.create_sweep_command(list(sweep['command']))
    macros = sweep_utils.create_sweep_command_args({'args': {k: {'value': v} for k, v in params.items()}})
    macros.update(env=['/usr/bin/env'], interpreter=[sys.executable], program=[sweep['program']])
    filled = []
    for chunk in command:
        filled += macros.get(chunk[2:-1]) or [] if re.fullmatch(r'\$\{\w+\}', chunk) else [chunk]
    return filled


def agent_env(folder, run_id: str, params: dict) -> dict:
    """The environment wandb's agent gives a trial: the sweep and run ids, the parameters' file, W&B's folder."""
    path = folder / 'wandb' / f'sweep-{SWEEP_ID}' / f'config-{run_id}.yaml'
    config_util.save_config_file_from_dict(str(path), {k: {'value': v} for k, v in params.items()})
    return {**os.environ, 'WANDB_SWEEP_ID': SWEEP_ID, 'WANDB_RUN_ID': run_id, 'WANDB_SWEEP_PARAM_PATH': str(path),
            'WANDB_DIR': str(folder), 'WANDB_MODE': 'offline'}


def trial_params(shapes, output, lr: float) -> dict:
    """The quickstart sweep's parameter, and the test's own as sweep parameters too (the agent passes them the same
    way): a tiny run of TINY's model, 2 epochs of 5 steps, with the spellings the agent uses for booleans, lists and
    null."""
    return dict(lr=lr, model=MODEL, data_dir=str(shapes), output=str(output), epochs=2, batch_size=16,
                warmup_epochs=0, log_interval=1, workers=0, model_ema=True, scale=[0.5, 1.0], num_classes=None,
                recovery_interval=2)


def start_trial(shapes, folder, run_id: str, lr: float) -> subprocess.Popen:
    sweep = yaml.safe_load((REPO / 'sweeps' / 'quickstart_lr_wd.yaml').read_text())
    params = trial_params(shapes, folder / 'output', lr)
    return subprocess.Popen(agent_command(sweep, params), cwd=REPO, env=agent_env(folder, run_id, params),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def trial_run(run_dir) -> dict:
    """The trial's W&B run as `wandb sync` uploads it: one offline folder per start of train.py, all of one run id."""
    starts = [read_run(path) for path in sorted((run_dir / 'wandb').glob('offline-run-*/run-*.wandb'))]
    assert len({start['id'] for start in starts}) == 1
    return dict(starts[-1], history=[row for start in starts for row in start['history']],
                summary={k: v for start in starts for k, v in start['summary'].items()})


@pytest.mark.parametrize('path', SWEEPS, ids=[p.stem for p in SWEEPS])
def test_each_sweep_file_runs_a_recipe_with_options_and_the_metric_train_py_logs(path):
    sweep = yaml.safe_load(path.read_text())
    assert sweep['program'] == 'train.py' and '${args}' in sweep['command']
    recipe = sweep['command'][sweep['command'].index('-c') + 1]
    assert (REPO / recipe).is_file()
    assert set(sweep['parameters']) <= set(BY_NAME)
    assert sweep['metric']['name'] == 'best/top1'  # what the agent's trials log, below
    assert sweep['method'] in ('random', 'grid', 'bayes')


def test_two_trials_of_a_sweep_each_train_in_their_own_folder_and_log_into_the_agents_run(shapes, tmp_path):
    folder = tmp_path
    start = time.monotonic()
    first = start_trial(shapes, folder, 'trial001', 2.0e-3)
    out = first.communicate()[0]
    assert first.returncode == 0, out
    assert 'Waiting for W&B' not in out and time.monotonic() - start < 120

    second = start_trial(shapes, folder, 'trial002', 4.0e-3)
    for line in second.stdout:
        if 'epoch 1 step 3/5' in line:  # the agent stops a trial (Hyperband, Ctrl-C): SIGTERM
            second.send_signal(signal.SIGTERM)
            break
    second.stdout.read()
    assert second.wait() == 75
    again = start_trial(shapes, folder, 'trial002', 4.0e-3)
    out = again.communicate()[0]
    assert again.returncode == 0, out
    assert re.search(r'Resuming .*trial002/recovery-1-[34]\.pth\.tar: epoch 1, step [34]/5', out), out

    root = folder / 'output' / f'quickstart-sweep-{SWEEP_ID}'
    for run_id, lr in (('trial001', 2.0e-3), ('trial002', 4.0e-3)):
        config = yaml.safe_load((root / run_id / 'config.yaml').read_text())
        assert (config['lr'], config['model_ema'], config['scale'], config['epochs']) == (lr, True, [0.5, 1.0], 2)
        assert load(root / run_id / 'last.pth.tar')['wandb_run_id'] == run_id
        run = trial_run(root / run_id)
        assert run['id'] == run_id and run['config']['lr'] == lr  # the sweep's parameters, as the agent gave them
        logged = [row['best/top1'] for row in run['history'] if 'best/top1' in row]  # every epoch, for Hyperband
        rows = summary(root / run_id)
        assert logged == pytest.approx([best_of(rows[:n], 'top1')[0] for n in (1, 2)])
        assert run['summary']['best/top1'] == pytest.approx(logged[-1])


@pytest.mark.parametrize('arg, message', [
    ('--lrr=0.1', r'unknown option --lrr; did you mean --lr\?'),
    ('--model_ema=maybe', r'model_ema: expected true or false'),
])
def test_a_sweep_parameter_that_is_not_an_option_stops_the_trial_in_one_line(arg, message, capsys):
    assert train.main(['-c', str(REPO / 'recipes' / 'quickstart.yaml'), arg, '--dry-run']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
