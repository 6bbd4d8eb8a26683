import json
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFile
from timm.data import ImageNetInfo

import validate
from tools import predict
from training import checkpoint
from training.data import create_eval_loader, data_config, open_image_folder

from conftest import run_train


def trained_run(tmp_path_factory, shapes) -> Path:
    """One run of one epoch (with EMA weights) shared by the predict, export and demo tests of a session."""
    run_dir = tmp_path_factory.getbasetemp() / 'use-the-model' / 'run'
    if not (run_dir / 'last.pth.tar').is_file():
        # resnet50_custom: the export of our own architecture (model_defs/ copied in) is what these tests check
        assert run_train(shapes, run_dir.parent, '--epochs', '1', '--model', 'resnet50_custom') == 0
    return run_dir


@pytest.fixture(scope='module')
def trained(tmp_path_factory, shapes):
    return trained_run(tmp_path_factory, shapes)


def run_predict(*args: str) -> int:
    return predict.main(list(args))


def predictions(json_file: Path) -> dict:
    return {Path(r['path']).resolve(): r['topk'] for r in json.loads(json_file.read_text())}


def validation_probs(checkpoint_path: Path, weights: str, shapes: Path) -> dict:
    """Softmax outputs for the validation images through validate.py's model and evaluation loader: the reference."""
    state = checkpoint.load(checkpoint_path)
    model, _, config = validate.load_model(validate.parse_args(['--checkpoint', str(checkpoint_path),
                                                                '--weights', weights]), state)
    dataset = open_image_folder(shapes, 'validation')
    cfg = data_config(config, model, config['val_img_size'] or config['img_size'])
    probs = []
    with torch.inference_mode(), create_eval_loader(dataset, cfg, 16, 0, torch.device('cpu')) as loader:
        for images, _ in loader:
            probs.append(model.eval()(images).softmax(-1))
    paths = [Path(path).resolve() for path, _ in dataset.reader.samples]
    return dict(zip(paths, torch.cat(probs)))


def test_predictions_equal_validate_pipeline_outputs_with_class_folder_names(trained, shapes, tmp_path, capsys):
    # not the weights that predict takes by default (those that earned the checkpoint its metric): --weights is obeyed
    weights = {'raw': 'ema', 'ema': 'raw'}[checkpoint.load(trained / 'last.pth.tar')['metric_weights']]
    out = tmp_path / 'p.json'
    folders = [str(shapes / 'val' / name) for name in ('circle', 'square')]
    assert run_predict('--checkpoint', str(trained / 'last.pth.tar'), '--weights', weights, '--top-k', '3',
                       '-b', '4', '--json', str(out), *folders) == 0
    found = predictions(out)
    reference = validation_probs(trained / 'last.pth.tar', weights, shapes)
    assert len(found) == 10 and set(found) <= set(reference)
    names = sorted(p.name for p in (shapes / 'train').iterdir())
    for path, top in found.items():
        values, indices = reference[path].topk(3)
        assert [t['index'] for t in top] == indices.tolist()
        assert [t['prob'] for t in top] == pytest.approx(values.tolist(), abs=1e-5)
        assert [t['class'] for t in top] == [names[i] for i in indices.tolist()]
    printed = capsys.readouterr().out.splitlines()
    first = json.loads(out.read_text())[0]
    assert printed[:4] == [first['path'], *(f"  {t['class']} ({100 * t['prob']:.1f}%)" for t in first['topk'])]


def test_folders_are_searched_recursively_and_bad_images_are_listed_and_skipped(trained, shapes, tmp_path, capsys):
    photos = tmp_path / 'photos'
    (photos / 'nested' / 'deeper').mkdir(parents=True)
    good = sorted((shapes / 'val' / 'ring').glob('*.jpg'))[:2]
    shutil.copy(good[0], photos / 'a.jpg')
    shutil.copy(good[1], photos / 'nested' / 'deeper' / 'b.JPG')
    (photos / 'nested' / 'empty.jpg').write_bytes(b'')
    (photos / 'nested' / 'cut.jpg').write_bytes(good[0].read_bytes()[:-200])
    (photos / 'notes.txt').write_text('not an image, and not named like one: not looked at')
    named = tmp_path / 'named.png'
    named.write_text('named on the command line: tried')
    out = tmp_path / 'p.json'
    assert run_predict('--checkpoint', str(trained / 'last.pth.tar'), '--json', str(out), str(photos), str(named)) == 0
    assert sorted(predictions(out)) == sorted([(photos / 'a.jpg').resolve(),
                                               (photos / 'nested' / 'deeper' / 'b.JPG').resolve()])
    assert all(len(top) == 5 for top in predictions(out).values())
    err = sorted(capsys.readouterr().err.splitlines())
    assert err == sorted([f"predict.py: skipped {photos / 'nested' / 'empty.jpg'}: empty file",
                          f"predict.py: skipped {photos / 'nested' / 'cut.jpg'}: truncated image data",
                          f'predict.py: skipped {named}: not an image PIL can identify'])


def blank_png(path: Path, side: int) -> Path:
    """A black 1-bit PNG of side x side pixels, written without PIL: a few KB on disk, side² bytes once decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))

    rows = bytes(1 + (side + 7) // 8) * side  # each row: filter type 0, then 8 pixels a byte
    header = struct.pack('>IIBBBBB', side, side, 1, 0, 0, 0, 0)  # bit depth 1, grayscale, no interlace
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(rows, 9))
                     + chunk(b'IEND', b''))
    return path


def test_image_above_pils_decompression_bomb_limit_is_skipped_undecoded(trained, shapes, tmp_path, capsys,
                                                                         monkeypatch):
    huge = blank_png(tmp_path / 'huge.png', 12000)  # 144 megapixels: PIL warns above 89, refuses above 179
    assert huge.stat().st_size < 50_000
    good = sorted((shapes / 'val' / 'ring').glob('*.jpg'))[0]
    decoded = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, 'load', lambda image: decoded.append(image.filename) or load(image))
    out = tmp_path / 'p.json'
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter('always')
        assert run_predict('--checkpoint', str(trained / 'last.pth.tar'), '--json', str(out), str(huge),
                           str(good)) == 0
    assert str(good) in decoded and str(huge) not in decoded
    assert [w.message for w in warned if issubclass(w.category, Image.DecompressionBombWarning)] == []
    assert list(predictions(out)) == [good.resolve()]
    assert capsys.readouterr().err == f"predict.py: skipped {huge}: above PIL's decompression-bomb limit\n"


def not_a_checkpoint(tmp_path) -> Path:
    path = tmp_path / 'other.pth'
    torch.save({'epoch': 3, 'notes': 'no weights'}, path)
    return path


def other_architecture(tmp_path) -> Path:
    path = tmp_path / 'resnet18.pth'
    torch.save({'state_dict': {'conv1.weight': torch.zeros(64, 3, 7, 7)}, 'config': {'model': 'resnet50_custom'},
                'data': {'classes': 10}}, path)
    return path


@pytest.mark.parametrize('make_args, message', [
    (lambda t, s, tmp: [str(tmp / 'missing.jpg')], 'skipped {tmp}/missing.jpg: not found'),
    (lambda t, s, tmp: [str(t / 'config.yaml')], 'config.yaml: not an image PIL can identify'),
    (lambda t, s, tmp: [str(tmp)], 'no image files (.jpeg, .jpg, .png) in this folder'),
    (lambda t, s, tmp: ['--checkpoint', str(tmp / 'none.pth.tar'), str(s / 'val')], 'checkpoint not found'),
    (lambda t, s, tmp: ['--checkpoint', str(t / 'config.yaml'), str(s / 'val')], 'is not a PyTorch checkpoint'),
    (lambda t, s, tmp: ['--checkpoint', str(not_a_checkpoint(tmp)), str(s / 'val')],
     'is neither a checkpoint of train.py nor a state dict'),
    (lambda t, s, tmp: ['--checkpoint', str(other_architecture(tmp)), str(s / 'val')],
     'does not fit resnet50_custom'),
    (lambda t, s, tmp: ['--checkpoint', str(tmp), str(s / 'val')], 'not one written by tools/export.py'),
    (lambda t, s, tmp: [str(s / 'val'), '--top-k', '0'], "argument --top-k: invalid positive value: '0'"),
])
def test_bad_input_gets_one_line_and_exit_code_2(trained, shapes, tmp_path, capsys, make_args, message):
    args = make_args(trained, shapes, tmp_path)
    if '--checkpoint' not in args:
        args = ['--checkpoint', str(trained / 'last.pth.tar'), *args]
    assert run_predict(*args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and message.format(tmp=tmp_path) in err[0], err
    assert captured.out == ''


def test_imagenet_checkpoints_are_named_by_timms_synset_table_and_other_datasets_keep_theirs():
    synsets = ImageNetInfo().label_names()
    assert synsets == sorted(synsets)  # the label order of ImageNet's class folders
    for recorded in (None, list(synsets)):
        names, descriptions = predict.labels_of({'data': {'class_names': recorded}}, 1000)
        assert names == synsets and descriptions['n01443537'] == 'goldfish, Carassius auratus'
    other = [f'kind_{i:04d}' for i in range(1000)]
    assert predict.labels_of({'data': {'class_names': other}}, 1000) == (other, None)
    assert predict.labels_of({'data': {'classes': 3}}, 3) == (['0', '1', '2'], None)
