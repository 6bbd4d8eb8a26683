import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import timm
import torch

import validate
from demo.classifier import Classifier
from tools import export, predict
from training import checkpoint
from training.data import open_rgb
from training.reporting import read_summary

from test_predict import trained_run

DEMO_AND_CARD = ['README.md', 'app.py', 'classifier.py', 'config.json', 'model.safetensors', 'model_defs',
                 'requirements.txt']


@pytest.fixture(scope='module')
def trained(tmp_path_factory, shapes):
    return trained_run(tmp_path_factory, shapes)


@pytest.fixture(scope='module')
def exported(trained, tmp_path_factory) -> Path:
    """The EMA weights of the run's last checkpoint, exported."""
    out = tmp_path_factory.mktemp('export') / 'rn50'
    assert export.main(['--checkpoint', str(trained / 'last.pth.tar'), '--out', str(out), '--weights', 'ema']) == 0
    return out


def checkpoint_model(path: Path, weights: str):
    state = checkpoint.load(path)
    args = validate.parse_args(['--checkpoint', str(path), '--weights', weights])
    return validate.load_model(args, state)[0].eval()


def test_timm_loads_the_export_with_the_checkpoints_outputs_preprocessing_and_class_names(trained, exported, shapes):
    reference = predict.checkpoint_classifier(trained / 'last.pth.tar', 'ema')[0]
    by_folder = Classifier.from_export(exported)  # timm.create_model('local-dir:...', pretrained=True)
    # the overlay's num_classes tells timm that the file's classifier fits: without it, timm drops it as adapted
    by_file = timm.create_model('resnet50_custom', num_classes=10, pretrained=True, pretrained_cfg_overlay=dict(
        file=str(exported / 'model.safetensors'), num_classes=10)).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected = reference.model(images)
        assert torch.equal(by_folder.model(images), expected) and torch.equal(by_file(images), expected)

    cfg = by_folder.model.pretrained_cfg
    assert (tuple(cfg['input_size']), cfg['crop_pct'], cfg['interpolation'], tuple(cfg['mean']), tuple(cfg['std'])) \
        == tuple(reference.data_cfg[k] for k in ('input_size', 'crop_pct', 'interpolation', 'mean', 'std'))
    assert by_folder.label_names == sorted(p.name for p in (shapes / 'train').iterdir())
    photos = [open_rgb(str(p)) for p in sorted((shapes / 'val' / 'dots').glob('*.jpg'))]
    assert by_folder.top_k(photos, 3) == reference.top_k(photos, 3)


def test_model_card_holds_the_runs_facts_and_the_folder_runs_as_a_space(trained, exported):
    modes = {path.name: path.stat().st_mode & 0o777 for path in exported.iterdir() if path.is_file()}
    assert len(set(modes.values())) == 1, modes  # the weights as readable as the rest (safetensors writes 0600)
    assert sorted(p.name for p in exported.iterdir()) == sorted(DEMO_AND_CARD + ['curves.png', 'train_config.yaml'])
    card = (exported / 'README.md').read_text()
    state = checkpoint.load(trained / 'last.pth.tar')
    row = read_summary(trained / 'summary.csv')[state['epoch']]
    replay = next(line for line in (trained / 'config.yaml').read_text().splitlines() if 'replay' in line)
    assert f"- top-1: {row['ema_val_top1']:.2f} % (ema weights" in card
    assert "resnet50_custom, trained with this repository's train.py; ema weights of epoch 0.\n" in card
    assert f"- commit: {state['versions']['git']}" in card
    assert f"    {replay.split(': ', 1)[1]}\n" in card
    assert '![training curves](curves.png)' in card and '- data: no manifest recorded' in card
    assert card.startswith('---\n') and '\nsdk: gradio\n' in card and '\napp_file: app.py\n' in card
    gradio_pin = (exported / 'requirements.txt').read_text().split('gradio==')[1].split()[0]
    assert f'\nsdk_version: {gradio_pin}\n' in card
    assert (exported / 'curves.png').read_bytes() == (trained / 'curves.png').read_bytes()
    assert (exported / 'model_defs' / 'resnet_custom.py').is_file()
    assert json.loads((exported / 'config.json').read_text())['export']['weights'] == 'ema'


def test_a_mid_epoch_checkpoint_is_exported_as_unevaluated_weights_of_its_epoch_and_step(trained, tmp_path, capsys):
    run = tmp_path / 'run'
    run.mkdir()
    for name in ('summary.csv', 'config.yaml'):
        shutil.copy(trained / name, run / name)
    # as Checkpoints.mid_epoch saves it 5 steps into epoch 0, next to summary.csv's row of epoch 0's end
    state = checkpoint.load(trained / 'last.pth.tar')
    state.update(epoch=0, progress=dict(state['progress'], epoch=0, step=5, history=[]))
    torch.save(state, run / 'recovery-0-5.pth.tar')
    out = tmp_path / 'out'
    assert export.main(['--checkpoint', str(run / 'recovery-0-5.pth.tar'), '--out', str(out), '--weights', 'ema']) == 0
    described = 'ema weights of epoch 0 after 5 optimizer steps (a mid-epoch recovery checkpoint: not evaluated)'
    card = (out / 'README.md').read_text()
    assert f"resnet50_custom, trained with this repository's train.py; {described}.\n" in card
    assert ('- top-1: not evaluated (saved after 5 optimizer steps of epoch 0, before its evaluation; validate.py '
            'measures them)\n') in card
    assert f"{read_summary(run / 'summary.csv')[0]['ema_val_top1']:.2f} %" not in card
    assert json.loads((out / 'config.json').read_text())['export'] == dict(
        tool='tools/export.py', checkpoint=str(run / 'recovery-0-5.pth.tar'), weights='ema', epoch=0, step=5)
    assert capsys.readouterr().out.splitlines()[0] == f'export.py: resnet50_custom ({described}) written to {out}'


def test_a_checkpoint_outside_its_run_folder_says_what_is_not_available(trained, tmp_path):
    alone = tmp_path / 'alone' / 'model.pth.tar'
    alone.parent.mkdir()
    shutil.copy(trained / 'last.pth.tar', alone)
    out = tmp_path / 'out'
    assert export.main(['--checkpoint', str(alone), '--out', str(out), '--weights', 'raw']) == 0
    card = (out / 'README.md').read_text()
    assert '- top-1: not available' in card and 'the run folder held no config.yaml' in card
    assert 'curves.png' not in card
    assert sorted(p.name for p in out.iterdir()) == DEMO_AND_CARD

    # exporting again replaces what the export wrote, and only that
    (out / 'model.onnx').write_text('left by an earlier export with --onnx: no longer the exported weights')
    (out / 'notes.md').write_text('the user\'s own')
    assert export.main(['--checkpoint', str(alone), '--out', str(out), '--weights', 'ema']) == 0
    assert not (out / 'model.onnx').exists() and (out / 'notes.md').read_text() == 'the user\'s own'
    assert json.loads((out / 'config.json').read_text())['export']['weights'] == 'ema'


def test_export_refuses_a_folder_it_did_not_write(trained, tmp_path, capsys):
    foreign = tmp_path / 'foreign'
    foreign.mkdir()
    (foreign / 'config.json').write_text('{"architecture": "resnet50"}')
    assert export.main(['--checkpoint', str(trained / 'last.pth.tar'), '--out', str(foreign)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'is not empty and not an export of tools/export.py' in err[0], err
    assert [p.name for p in foreign.iterdir()] == ['config.json']


@pytest.mark.parametrize('make_args, message', [
    (lambda t, tmp: ['--checkpoint', str(tmp / 'none.pth.tar')], 'checkpoint not found'),
    (lambda t, tmp: ['--checkpoint', str(t / 'summary.csv')], 'is not a PyTorch checkpoint'),
    (lambda t, tmp: ['--checkpoint', str(t / 'last.pth.tar'), '--out', str(t / 'summary.csv')], 'is a file'),
])
def test_bad_input_gets_one_line_and_exit_code_2(trained, tmp_path, capsys, make_args, message):
    args = make_args(trained, tmp_path)
    assert export.main([*args, *([] if '--out' in args else ['--out', str(tmp_path / 'out')])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / 'out').exists()


def test_onnx_without_its_packages_says_what_to_install(trained, tmp_path, capsys, monkeypatch):
    find_spec = importlib.util.find_spec  # as on a machine without them, installed here or not
    monkeypatch.setattr(importlib.util, 'find_spec',
                        lambda name, *args: None if name in ('onnx', 'onnxscript') else find_spec(name, *args))
    assert export.main(['--checkpoint', str(trained / 'last.pth.tar'), '--out', str(tmp_path / 'o'), '--onnx']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install onnx onnxscript onnxruntime' in err[0], err
    assert not (tmp_path / 'o').exists()


def test_onnx_export_gives_pytorchs_outputs(trained, tmp_path):
    pytest.importorskip('onnx')
    pytest.importorskip('onnxscript')
    onnxruntime = pytest.importorskip('onnxruntime')
    out = tmp_path / 'o'
    assert export.main(['--checkpoint', str(trained / 'last.pth.tar'), '--out', str(out), '--weights', 'raw',
                        '--onnx']) == 0
    session = onnxruntime.InferenceSession(str(out / 'model.onnx'), providers=['CPUExecutionProvider'])
    images = torch.randn(5, 3, 32, 32)  # another batch size than the export's example
    with torch.inference_mode():
        expected = checkpoint_model(trained / 'last.pth.tar', 'raw')(images)
    found = torch.from_numpy(session.run(None, {'image': images.numpy()})[0])
    assert torch.allclose(found, expected, atol=1e-4, rtol=1e-4)


def test_an_imagenet_export_names_its_classes_by_timms_synset_table(tmp_path):
    model = timm.create_model('resnet50_custom', num_classes=1000)
    state = {'state_dict': model.state_dict(), 'config': {'model': 'resnet50_custom', 'img_size': 32},
             'data': {'classes': 1000}, 'epoch': 0}
    torch.save(state, tmp_path / 'imagenet.pth.tar')
    out = tmp_path / 'out'
    assert export.main(['--checkpoint', str(tmp_path / 'imagenet.pth.tar'), '--out', str(out)]) == 0
    loaded = Classifier.from_export(out)
    assert loaded.label_names[:2] == ['n01440764', 'n01443537']
    assert loaded.class_name(1) == 'goldfish, Carassius auratus'
    assert '\ndatasets: [imagenet-1k]\n' in (out / 'README.md').read_text()
