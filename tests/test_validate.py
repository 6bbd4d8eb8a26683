import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import validate
from training import builtin_data
from training.distributed import Processes
from training.engine import evaluate

from conftest import MODEL, load, run_train, summary


@pytest.fixture(scope='module')
def trained(shapes, tmp_path_factory):
    output = tmp_path_factory.mktemp('runs')
    assert run_train(shapes, output) == 0
    return output / 'run'


def run_validate(*args: str) -> int:
    return validate.main(['-j', '0', '--device', 'cpu', *args])


def test_model_best_top1_equals_the_training_log(trained, tmp_path):
    best = load(trained / 'model_best.pth.tar')
    row = summary(trained)[best['epoch']]
    results_file = tmp_path / 'results.json'
    assert run_validate('--checkpoint', str(trained / 'model_best.pth.tar'), '--results-file', str(results_file)) == 0
    results = json.loads(results_file.read_text())
    logged = row['ema_val_top1'] if results['weights'] == 'ema' else row['val_top1']
    assert results['weights'] == best['metric_weights']
    assert results['top1'] == pytest.approx(logged, abs=0.01)
    assert results['images'] == 50 and results['img_size'] == 32


@pytest.mark.parametrize('weights, column', [('raw', 'val'), ('ema', 'ema_val')])
def test_each_kind_of_weights_equals_its_logged_numbers(trained, tmp_path, weights, column):
    out = tmp_path / 'r.json'
    assert run_validate('--checkpoint', str(trained / 'last.pth.tar'), '--weights', weights,
                        '--results-file', str(out)) == 0
    results, row = json.loads(out.read_text()), summary(trained)[-1]
    assert results['top1'] == pytest.approx(row[f'{column}_top1'], abs=0.01)
    assert results['top5'] == pytest.approx(row[f'{column}_top5'], abs=0.01)
    assert results['loss'] == pytest.approx(row[f'{column}_loss'], rel=1e-4)


def test_plain_state_dict_with_model_name(trained, tmp_path, shapes, capsys):
    plain = tmp_path / 'weights.pth'
    torch.save(load(trained / 'last.pth.tar')['state_dict'], plain)
    out = tmp_path / 'r.json'
    assert run_validate('--checkpoint', str(plain), '--data-dir', str(shapes), '--img-size', '32', '--crop-pct', '1.0',
                        '--results-file', str(out)) == 2
    assert 'plain state dict: pass --model' in capsys.readouterr().err
    assert run_validate('--checkpoint', str(plain), '--model', MODEL, '--data-dir', str(shapes),
                        '--img-size', '32', '--crop-pct', '1.0', '--results-file', str(out)) == 0
    assert json.loads(out.read_text())['top1'] == pytest.approx(summary(trained)[-1]['val_top1'], abs=0.01)


def test_evaluate_with_eval_flip_averages_the_logits_of_the_image_and_its_flip():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))  # not flip-invariant
    x, y = torch.randn(6, 3, 4, 4), torch.tensor([0, 1, 2, 3, 4, 0])
    procs = Processes(0, 1, 0, torch.device('cpu'))
    with torch.no_grad():
        logits = (model(x) + model(x.flip(3))) / 2
    expected = dict(loss=F.cross_entropy(logits, y).item(), top1=100 * (logits.argmax(1) == y).float().mean().item())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)  # two batches
    flipped, = evaluate([model], loader, procs, eval_flip=True)
    assert flipped['loss'] == pytest.approx(expected['loss'], rel=1e-6)
    assert flipped['top1'] == pytest.approx(expected['top1'])
    assert evaluate([model], loader, procs)[0]['loss'] != pytest.approx(flipped['loss'], rel=1e-3)


def test_evaluate_loads_each_batch_once_for_all_models_with_each_models_own_numbers():
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5)) for _ in range(2)]
    x, y = torch.randn(6, 3, 4, 4), torch.tensor([0, 1, 2, 3, 4, 0])
    procs = Processes(0, 1, 0, torch.device('cpu'))
    loaded = []

    class Counted(torch.utils.data.TensorDataset):
        def __getitem__(self, index):
            loaded.append(index)
            return super().__getitem__(index)
    loader = torch.utils.data.DataLoader(Counted(x, y), batch_size=4)
    both = evaluate(models, loader, procs)
    assert sorted(loaded) == list(range(6))
    for model, result in zip(models, both):
        with torch.no_grad():
            logits = model(x)
        assert result['loss'] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
        assert result['top1'] == pytest.approx(100 * (logits.argmax(1) == y).float().mean().item())
        assert result['images'] == 6
    assert both[0]['loss'] != pytest.approx(both[1]['loss'], rel=1e-3)


@pytest.fixture(scope='module')
def trained_methods(shapes, tmp_path_factory):
    """One epoch of two steps, without EMA, with BlurPool and flip evaluation."""
    output = tmp_path_factory.mktemp('methods')
    assert run_train(shapes, output, '--epochs', '1', '-b', '40', '--no-zero-init-last', '--model', 'resnet50_custom',
                     '--no-model-ema', '--blur-pool', '--eval-flip', experiment='methods') == 0
    return output / 'methods'


def validate_results(*args: str, tmp_path: Path) -> dict:
    out = tmp_path / 'r.json'
    assert run_validate(*args, '--weights', 'raw', '--results-file', str(out)) == 0
    return json.loads(out.read_text())


def test_a_blur_pool_checkpoint_validates_with_blur_pool_and_eval_flip_from_its_config(trained_methods, tmp_path):
    checkpoint = str(trained_methods / 'last.pth.tar')
    logged = summary(trained_methods)[-1]
    results = validate_results('--checkpoint', checkpoint, tmp_path=tmp_path)
    assert results['blur_pool'] and results['eval_flip']
    assert results['top1'] == pytest.approx(logged['val_top1'], abs=0.01)
    assert results['loss'] == pytest.approx(logged['val_loss'], rel=1e-6)  # the batching differs, ~1e-7
    # the state dict loads into the plain model too, silently: only the config tells them apart
    plain = validate_results('--checkpoint', checkpoint, '--no-blur-pool', tmp_path=tmp_path)
    one_view = validate_results('--checkpoint', checkpoint, '--no-eval-flip', tmp_path=tmp_path)
    assert not plain['blur_pool'] and not one_view['eval_flip']
    for other in (plain, one_view):  # ~1e-4 and more apart on this barely trained model
        assert abs(other['loss'] - results['loss']) > 1e-5 * results['loss']


def test_eval_flip_on_the_command_line_turns_it_on_for_a_checkpoint_without_it(trained, tmp_path):
    checkpoint = str(trained / 'last.pth.tar')
    flipped = validate_results('--checkpoint', checkpoint, '--eval-flip', tmp_path=tmp_path)
    assert flipped['eval_flip'] and flipped['images'] == 50
    logged = summary(trained)[-1]['val_loss']
    assert abs(flipped['loss'] - logged) > 1e-5 * logged


def flat_folder(tmp_path, shapes):
    """ImageNet's val as it comes out of the tar: images without class folders."""
    flat = tmp_path / 'flat' / 'val'
    flat.mkdir(parents=True)
    for image in list((shapes / 'val').rglob('*.jpg'))[:6]:
        shutil.copy(image, flat / f'{image.parent.name}_{image.name}')
    return flat.parent


def five_classes(tmp_path):
    root = builtin_data.generate(tmp_path / 'five', train_per_class=1, val_per_class=2, image_size=32)
    for name in builtin_data.CLASSES[5:]:
        shutil.rmtree(root / 'val' / name)
    return root


@pytest.mark.parametrize('make_args, message', [
    (lambda t, s, tmp: ['--checkpoint', str(tmp / 'missing.pth.tar')], 'checkpoint not found'),
    (lambda t, s, tmp: ['--checkpoint', str(t)], 'is a directory, not a checkpoint file'),
    (lambda t, s, tmp: ['--checkpoint', str(t / 'config.yaml')], 'is not a PyTorch checkpoint'),
    (lambda t, s, tmp: ['--checkpoint', str(t / 'last.pth.tar'), '--model', 'resnet50_custom'],
     f'holds {MODEL}, not resnet50_custom'),
    (lambda t, s, tmp: ['--checkpoint', str(t / 'last.pth.tar'), '--data-dir', str(flat_folder(tmp, s))],
     'holds images but no class folders'),
    (lambda t, s, tmp: ['--checkpoint', str(t / 'last.pth.tar'), '--data-dir', str(tmp / 'nowhere')],
     'no validation split at'),
    (lambda t, s, tmp: ['--checkpoint', str(t / 'last.pth.tar'), '--weights', 'best'], 'invalid choice'),
])
def test_bad_input_gets_one_line_and_exit_code_2(trained, shapes, tmp_path, capsys, make_args, message):
    assert run_validate(*make_args(trained, shapes, tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_class_count_mismatch_is_refused(trained, tmp_path, capsys):
    data = five_classes(tmp_path)
    assert run_validate('--checkpoint', str(trained / 'last.pth.tar'), '--data-dir', str(data)) == 2
    assert 'has 5 class folders but the model predicts 10 classes' in capsys.readouterr().err


def with_class_names(trained, tmp_path, names) -> Path:
    """The run's last checkpoint, holding these training class names (None: none, as older versions saved)."""
    state = load(trained / 'last.pth.tar')
    state['data'] = {k: v for k, v in state['data'].items() if k != 'class_names'}
    if names is not None:
        state['data']['class_names'] = names
    path = tmp_path / 'named.pth.tar'
    torch.save(state, path)
    return path


def renamed_classes(shapes, tmp_path, renames: dict) -> Path:
    """A copy of the validation split with some class folders renamed."""
    root = tmp_path / 'renamed'
    for folder in (shapes / 'val').iterdir():
        shutil.copytree(folder, root / 'val' / renames.get(folder.name, folder.name))
    return root


@pytest.mark.parametrize('renames, message', [
    # a renamed folder sorts elsewhere: every label after it names another class
    ({'checker': 'zigzag'}, "10 of 10 labels differ (label 0: 'checker' in training, 'circle' here; label 1: "
                            "'circle' in training, 'cross' here; label 2: 'cross' in training, 'diagonal' here)"),
    # another dataset with as many classes
    ({name: f'class_{i}' for i, name in enumerate(builtin_data.CLASSES)},
     "10 of 10 labels differ (label 0: 'checker' in training, 'class_0' here; label 1: "),
])
def test_other_class_folders_are_refused_unless_allowed(trained, shapes, tmp_path, capsys, renames, message):
    names = sorted(folder.name for folder in (shapes / 'train').iterdir())
    args = ['--checkpoint', str(with_class_names(trained, tmp_path, names)),
            '--data-dir', str(renamed_classes(shapes, tmp_path, renames))]
    assert run_validate(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and 'pass --allow-other-classes to evaluate anyway' in err[0], err

    out = tmp_path / 'r.json'
    assert run_validate(*args, '--allow-other-classes', '--results-file', str(out)) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('validate.py: warning: ') and message in err[0], err
    assert json.loads(out.read_text())['images'] == 50


def test_same_class_folders_pass_and_a_checkpoint_without_names_says_what_it_checks(trained, shapes, tmp_path,
                                                                                       capsys):
    names = sorted(folder.name for folder in (shapes / 'train').iterdir())
    assert run_validate('--checkpoint', str(with_class_names(trained, tmp_path, names))) == 0
    assert capsys.readouterr().err == ''
    assert run_validate('--checkpoint', str(with_class_names(trained, tmp_path, None))) == 0
    assert 'only the class count is checked' in capsys.readouterr().err
