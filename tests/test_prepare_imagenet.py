import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from PIL import Image

from tools import prepare_imagenet

from conftest import REPO

CLASSES = ['n01440764', 'n01443537', 'n01484850']
ODD = CLASSES[2]  # its class tar also holds a CMYK JPEG, a PNG named .JPEG, an empty, a truncated and a text file
VAL_SYNSETS = ['n01443537', 'n01440764', 'n01484850', 'n01440764', 'n01484850', 'n01443537']


def jpeg(width: int, height: int, seed: int, mode: str = 'RGB', fmt: str = 'JPEG') -> bytes:
    image = Image.new('RGB', (width, height), (seed * 40 % 256, 90, 200 - seed * 7 % 100))
    image.paste((255, 255, 0), (width // 4, height // 4, width // 2, height // 2))
    buffer = io.BytesIO()
    image.convert(mode).save(buffer, fmt, **({'quality': 95} if fmt == 'JPEG' else {}))
    return buffer.getvalue()


def add_file(tar: tarfile.TarFile, name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: Path, files: dict) -> Path:
    with tarfile.open(path, 'w') as tar:
        for name, data in files.items():
            add_file(tar, name, data)
    return path


def class_images(index: int, synset: str) -> dict:
    sizes = [(64, 96), (96, 64), (80, 72), (72, 90)]
    images = {f'{synset}_{i}.JPEG': jpeg(*size, seed=index * 4 + i) for i, size in enumerate(sizes)}
    if synset == ODD:
        good = jpeg(90, 70, seed=20)
        images.update({f'{synset}_cmyk.JPEG': jpeg(88, 66, seed=21, mode='CMYK'),
                       f'{synset}_png.JPEG': jpeg(70, 94, seed=22, fmt='PNG'),
                       f'{synset}_empty.JPEG': b'', f'{synset}_cut.JPEG': good[:len(good) // 2],
                       f'{synset}_text.JPEG': b'<html>404 Not Found</html>'})
    return images


@pytest.fixture(scope='module')
def tars(tmp_path_factory) -> dict:
    """A tiny ImageNet: a train tar of 3 class tars, a val tar of 6 images, and its labels in both formats."""
    root = tmp_path_factory.mktemp('tars')
    train_files = {}
    with tarfile.open(root / 'ILSVRC2012_img_train.tar', 'w') as outer:
        for index, synset in enumerate(CLASSES):
            images = class_images(index, synset)
            train_files.update({f'{synset}/{name}': data for name, data in images.items()})
            add_file(outer, f'{synset}.tar', write_tar(root / f'{synset}.tar', images).read_bytes())
    val_files = {f'ILSVRC2012_val_{i:08d}.JPEG': jpeg(64 + 8 * i, 96 - 4 * i, seed=30 + i) for i in range(1, 7)}
    write_tar(root / 'ILSVRC2012_img_val.tar', val_files)
    (root / 'LOC_val_solution.csv').write_text('ImageId,PredictionString\n' + ''.join(
        f'ILSVRC2012_val_{i:08d},{synset} 1 2 3 4\n' for i, synset in enumerate(VAL_SYNSETS, start=1)))
    (root / 'synsets.txt').write_text('\n'.join(VAL_SYNSETS) + '\n')
    val_tree = {f'{synset}/ILSVRC2012_val_{i:08d}.JPEG': val_files[f'ILSVRC2012_val_{i:08d}.JPEG']
                for i, synset in enumerate(VAL_SYNSETS, start=1)}
    return dict(root=root, train=train_files, val=val_tree)


def args_for(tars: dict, out: Path, *extra: str, labels: str = 'LOC_val_solution.csv', jobs: int = 1) -> list:
    root = tars['root']
    return ['--train-tar', str(root / 'ILSVRC2012_img_train.tar'), '--val-tar', str(root / 'ILSVRC2012_img_val.tar'),
            '--val-labels', str(root / labels), '--out', str(out), '-j', str(jobs), *extra]


def tree(folder: Path) -> dict:
    """{relative path: bytes} of every file under a folder but the tool's state."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob('*'))
            if p.is_file() and prepare_imagenet.STATE not in p.parts}


def source_tree(tars: dict) -> dict:
    """The tree the tars should give, with the bytes they hold."""
    return {**{f'train/{p}': d for p, d in tars['train'].items()}, **{f'val/{p}': d for p, d in tars['val'].items()}}


def image_tree(folder: Path) -> dict:
    return {path: data for path, data in tree(folder).items() if path != 'manifest.json'}


def manifest(out: Path) -> dict:
    return json.loads((out / 'manifest.json').read_text())


def test_copy_writes_class_folders_with_the_tars_bytes(tars, tmp_path, capsys):
    out = tmp_path / 'imagenet'
    assert prepare_imagenet.main(args_for(tars, out)) == 0
    expected = source_tree(tars)
    assert image_tree(out) == expected
    m = manifest(out)
    assert (m['splits']['train']['images'], m['splits']['train']['classes']) == (17, 3)
    assert (m['splits']['val']['images'], m['splits']['val']['classes']) == (6, 3)
    assert m['splits']['train']['images_per_class'] == dict(min=4, max=9)
    assert m['bytes'] == sum(len(d) for d in expected.values())
    assert m['settings'] == dict(max_side=None, quality=None)
    assert m['splits']['val']['source']['tar'] == 'ILSVRC2012_img_val.tar'
    assert m['splits']['train']['source']['bytes'] == (tars['root'] / 'ILSVRC2012_img_train.tar').stat().st_size
    output = capsys.readouterr()
    assert output.out.splitlines()[-1] == ('subset of ImageNet-1k: train 17 of 1,281,167 images in 3 of 1,000 classes;'
                                           ' val 6 of 50,000 images in 3 of 1,000 classes')
    assert '100% 4/4 tars and chunks, 23 images' in output.err


def test_val_labels_as_a_synset_list_give_the_same_tree(tars, tmp_path):
    assert prepare_imagenet.main(args_for(tars, tmp_path / 'csv')) == 0
    assert prepare_imagenet.main(args_for(tars, tmp_path / 'list', labels='synsets.txt')) == 0
    assert image_tree(tmp_path / 'csv') == image_tree(tmp_path / 'list')


def test_manifest_sha256_recomputes_from_the_tree(tars, tmp_path):
    out = tmp_path / 'imagenet'
    prepare_imagenet.main(args_for(tars, out, '--max-side', '48'))
    m = manifest(out)

    def listing_sha256(*splits) -> str:
        lines = sorted(f'{p}\t{len(d)}\n' for p, d in image_tree(out).items() if p.split('/')[0] in splits)
        return hashlib.sha256(''.join(lines).encode()).hexdigest()

    assert m['sha256'] == listing_sha256('train', 'val')
    assert m['splits']['train']['sha256'] == listing_sha256('train')
    assert m['splits']['val']['sha256'] == listing_sha256('val')
    find = subprocess.run("find train val -type f -printf '%p\\t%s\\n' | LC_ALL=C sort | sha256sum", shell=True,
                          cwd=out, capture_output=True, text=True)
    if find.returncode or not find.stdout:
        pytest.skip('no GNU find here')
    assert find.stdout.split()[0] == m['sha256']


def quantization(quality: int) -> dict:
    """The quantization tables of an RGB JPEG saved by PIL at this quality."""
    buffer = io.BytesIO()
    Image.new('RGB', (8, 8)).save(buffer, 'JPEG', quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).quantization


def test_reencoding_honours_max_side_and_quality(tars, tmp_path):
    out = tmp_path / 'imagenet'
    assert prepare_imagenet.main(args_for(tars, out, '--max-side', '80', '--quality', '60')) == 0
    sources = source_tree(tars)
    written = image_tree(out)
    assert written.keys() == sources.keys()
    for path, data in written.items():
        if path.endswith(('_empty.JPEG', '_cut.JPEG', '_text.JPEG')):
            assert data == sources[path]  # cannot be decoded: written as it is
            continue
        with Image.open(io.BytesIO(sources[path])) as source, Image.open(io.BytesIO(data)) as image:
            assert (image.format, image.mode) == ('JPEG', 'RGB')
            assert max(image.size) == min(max(source.size), 80), path  # never enlarged
            assert abs(image.width / image.height - source.width / source.height) < 0.05
            assert image.quantization == quantization(60)
    assert manifest(out)['settings'] == dict(max_side=80, quality=60)


def test_max_side_alone_reencodes_at_quality_90(tars, tmp_path):
    out = tmp_path / 'imagenet'
    assert prepare_imagenet.main(args_for(tars, out, '--max-side', '48')) == 0
    with Image.open(out / 'val' / VAL_SYNSETS[0] / 'ILSVRC2012_val_00000001.JPEG') as image:
        assert max(image.size) == 48 and image.quantization == quantization(90)
    assert manifest(out)['settings'] == dict(max_side=48, quality=90)


@pytest.mark.parametrize('reencode', [False, True])
def test_bad_and_unusual_images_are_listed_with_their_tar_paths(tars, tmp_path, capsys, reencode):
    out = tmp_path / 'imagenet'
    assert prepare_imagenet.main(args_for(tars, out, *(['--max-side', '64'] if reencode else []))) == 0
    train = manifest(out)['splits']['train']
    bad = {b['source']: b['problem'] for b in train['bad_files']}
    assert bad == {f'{ODD}.tar/{ODD}_empty.JPEG': 'empty file',
                   f'{ODD}.tar/{ODD}_cut.JPEG': 'truncated: no JPEG end-of-image marker',
                   f'{ODD}.tar/{ODD}_text.JPEG': 'not an image PIL knows'}
    assert {b['file'] for b in train['bad_files']} == {f'train/{ODD}/{ODD}_{n}.JPEG' for n in ('empty', 'cut', 'text')}
    unusual = {u['source']: u['content'] for u in train['unusual_files']}
    assert unusual == {f'{ODD}.tar/{ODD}_cmyk.JPEG': 'JPEG CMYK', f'{ODD}.tar/{ODD}_png.JPEG': 'PNG RGB'}
    assert manifest(out)['splits']['val']['bad_files'] == []
    printed = capsys.readouterr().out
    assert f'  {ODD}.tar/{ODD}_empty.JPEG: empty file' in printed
    assert ('converted to RGB JPEG' if reencode else 'copied as they are') in printed
    with Image.open(out / 'train' / ODD / f'{ODD}_cmyk.JPEG') as image:
        assert image.mode == ('RGB' if reencode else 'CMYK')


def test_image_that_cannot_be_decoded_is_written_as_it_is(tars, tmp_path):
    # a JPEG's header with its Huffman tables overwritten, and the end marker: passes the cheap check only
    garbage = jpeg(90, 70, seed=3)[:400] + bytes(300) + b'\xff\xd9'
    root = tmp_path / 'tars'
    root.mkdir()
    write_tar(root / 'ILSVRC2012_img_val.tar', {'ILSVRC2012_val_00000001.JPEG': garbage})
    (root / 'synsets.txt').write_text('n01440764\n')
    out = tmp_path / 'imagenet'
    assert prepare_imagenet.main(['--val-tar', str(root / 'ILSVRC2012_img_val.tar'), '--val-labels',
                                  str(root / 'synsets.txt'), '--out', str(out), '--max-side', '32', '-j', '1']) == 0
    assert (out / 'val' / 'n01440764' / 'ILSVRC2012_val_00000001.JPEG').read_bytes() == garbage
    [bad] = manifest(out)['splits']['val']['bad_files']
    assert bad == dict(source='ILSVRC2012_val_00000001.JPEG', file='val/n01440764/ILSVRC2012_val_00000001.JPEG',
                       problem='cannot decode: cannot load this image')


def file_stamps(out: Path) -> dict:
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob('*') if p.is_file()
            and p.name != 'manifest.json' and prepare_imagenet.STATE not in p.parts}


def test_second_run_writes_nothing_and_keeps_the_result(tars, tmp_path, capsys):
    out = tmp_path / 'imagenet'
    assert prepare_imagenet.main(args_for(tars, out)) == 0
    before, first = file_stamps(out), manifest(out)
    capsys.readouterr()
    assert prepare_imagenet.main(args_for(tars, out)) == 0
    assert file_stamps(out) == before
    assert 'writing 0 of 4 tars and chunks' in capsys.readouterr().out
    second = manifest(out)
    assert {**second, 'created': None} == {**first, 'created': None}


def test_stopped_run_continues_where_it_stopped(tars, tmp_path, monkeypatch):
    clean = tmp_path / 'clean'
    assert prepare_imagenet.main(args_for(tars, clean)) == 0

    out = tmp_path / 'stopped'
    write_atomic = prepare_imagenet.write_atomic

    def disk_full_at_the_empty_file(path, data):
        if path.name == f'{ODD}_empty.JPEG':
            raise OSError(28, 'No space left on device')
        write_atomic(path, data)

    monkeypatch.setattr(prepare_imagenet, 'write_atomic', disk_full_at_the_empty_file)
    assert prepare_imagenet.main(args_for(tars, out)) == 1
    monkeypatch.undo()
    # the largest class tar (ODD) goes first: the files before the empty one were written, and not its record
    in_tar_order = [name.split('/')[1] for name in tars['train'] if name.startswith(ODD)]
    assert {p.name for p in file_stamps(out)} == set(in_tar_order[:in_tar_order.index(f'{ODD}_empty.JPEG')])
    part = out / 'train' / ODD / f'{ODD}_empty.JPEG.part'
    part.write_bytes(b'half a file from a killed run')
    assert prepare_imagenet.main(args_for(tars, out)) == 0
    assert image_tree(out) == image_tree(clean)
    assert not part.exists()
    assert manifest(out)['sha256'] == manifest(clean)['sha256']


def test_finished_units_are_not_read_again(tars, tmp_path, monkeypatch):
    out = tmp_path / 'imagenet'
    assert prepare_imagenet.main(args_for(tars, out)) == 0
    removed = out / 'train' / CLASSES[0] / f'{CLASSES[0]}_0.JPEG'
    removed.unlink()
    # the record of the class says it is done: verification finds the file missing and drops the record
    assert prepare_imagenet.main(args_for(tars, out)) == 1
    read = []
    unit_images = prepare_imagenet.unit_images
    monkeypatch.setattr(prepare_imagenet, 'unit_images', lambda unit: read.append(unit.key) or unit_images(unit))
    assert prepare_imagenet.main(args_for(tars, out)) == 0
    assert read == [CLASSES[0]] and removed.read_bytes() == tars['train'][f'{CLASSES[0]}/{CLASSES[0]}_0.JPEG']


def test_processes_write_the_same_tree_as_one(tars, tmp_path):
    one = tmp_path / 'one'
    assert prepare_imagenet.main(args_for(tars, one, '--max-side', '64')) == 0
    many = tmp_path / 'many'
    result = subprocess.run([sys.executable, str(REPO / 'tools' / 'prepare_imagenet.py'),
                             *args_for(tars, many, '--max-side', '64', jobs=3)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert 'with 3 processes' in result.stdout
    assert image_tree(many) == image_tree(one)


# prepare_imagenet.py taking 0.3 s to write each image, so that a signal finds it halfway as it would a run of hours;
# each process that writes leaves its pid in the folder argv[2]
SLOW_RUN = """
import os, signal, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from tools import prepare_imagenet

write_atomic, pids = prepare_imagenet.write_atomic, Path(sys.argv[2])


def slow_write(path, data):
    if path.suffix == '.JPEG':
        (pids / str(os.getpid())).touch()
        time.sleep(0.3)
    write_atomic(path, data)


prepare_imagenet.write_atomic = slow_write
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even when the tests run in the background
sys.exit(prepare_imagenet.main(sys.argv[3:]))
"""


def running(pid: int) -> bool:
    """Whether a process lives: a zombie (ended, not yet collected by a parent) does not."""
    try:
        return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] not in ('Z', 'X')
    except FileNotFoundError:
        return False


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def snapshot(out: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob('*') if p.is_file()}


@pytest.fixture
def pids(tmp_path):
    """The folder where the processes of SLOW_RUN leave their pids; those still running at the end are killed (a
    failed test's)."""
    folder = tmp_path / 'pids'
    folder.mkdir()
    yield folder
    for pid in (int(p.name) for p in folder.iterdir()):
        if running(pid):
            os.kill(pid, signal.SIGKILL)


def stop_halfway(tars: dict, out: Path, pids: Path, signum: int) -> tuple:
    """(exit code, stderr) of a run with 2 workers sent `signum` once its first image is written."""
    # a file, not a pipe: a pipe's reader would wait for every process that inherited it, workers left running too
    err = out.parent / 'stderr.txt'
    with err.open('w') as stderr:
        run = subprocess.Popen([sys.executable, '-c', SLOW_RUN, str(REPO), str(pids), *args_for(tars, out, jobs=2)],
                               stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        assert wait_for(lambda: any(out.rglob('*.JPEG')) or run.poll() is not None, 20), 'no image written in 20 s'
        assert run.poll() is None, err.read_text()
        run.send_signal(signum)
        return run.wait(timeout=20), err.read_text()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()


def assert_resumable(tars: dict, out: Path):
    """Every unit marked done has all its files; the same command again writes the rest, leaving no .part file."""
    records = prepare_imagenet.read_records(out, 'train') + prepare_imagenet.read_records(out, 'val')
    assert len(records) < 4  # stopped halfway
    for record in records:
        for path, size in record['files']:
            assert (out / record['split'] / path).stat().st_size == size
    assert prepare_imagenet.main(args_for(tars, out)) == 0
    assert image_tree(out) == source_tree(tars)
    assert not list(out.rglob('*.part'))


linux_only = pytest.mark.skipif(sys.platform != 'linux', reason='reads /proc; a worker outliving its parent is '
                                                                 'stopped on Linux only (prctl)')


@linux_only
@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'SIGINT'])
def test_signal_stops_the_workers_says_so_and_the_same_command_continues(tars, tmp_path, pids, signum):
    out = tmp_path / 'imagenet'
    code, err = stop_halfway(tars, out, pids, signum)
    assert code == 128 + signum
    assert err == (f'prepare_imagenet.py: interrupted by {signal.Signals(signum).name}: the tars and chunks finished '
                   'are kept; run the same command again to continue\n')
    workers = [int(p.name) for p in pids.iterdir()]
    assert workers and not any(map(running, workers))
    written = snapshot(out)
    time.sleep(0.7)  # two more images per worker, had they gone on
    assert snapshot(out) == written
    assert_resumable(tars, out)


@linux_only
def test_workers_end_with_a_main_process_killed_outright(tars, tmp_path, pids):
    out = tmp_path / 'imagenet'
    assert stop_halfway(tars, out, pids, signal.SIGKILL)[0] == -signal.SIGKILL
    workers = [int(p.name) for p in pids.iterdir()]
    # they do not finish their class tars alone: several images of 0.3 s each were left
    assert workers and wait_for(lambda: not any(map(running, workers)), 1.0)
    written = snapshot(out)
    time.sleep(0.7)
    assert snapshot(out) == written
    assert_resumable(tars, out)


def test_train_or_val_alone(tars, tmp_path):
    root, out = tars['root'], tmp_path / 'imagenet'
    assert prepare_imagenet.main(['--train-tar', str(root / 'ILSVRC2012_img_train.tar'), '--out', str(out)]) == 0
    assert manifest(out)['splits'].keys() == {'train'}
    assert prepare_imagenet.main(['--val-tar', str(root / 'ILSVRC2012_img_val.tar'), '--val-labels',
                                  str(root / 'synsets.txt'), '--out', str(out), '-j', '1']) == 0
    assert manifest(out)['splits'].keys() == {'train', 'val'} and manifest(out)['images'] == 23


def test_val_classes_missing_from_a_train_split_written_earlier_are_warned_about(tars, tmp_path, capsys):
    # with both tars in one run such labels are refused before anything is written (see BAD_INPUTS)
    (tmp_path / 'synsets.txt').write_text('\n'.join(VAL_SYNSETS[:5] + ['n09999999']) + '\n')
    root, out = tars['root'], tmp_path / 'imagenet'
    assert prepare_imagenet.main(['--train-tar', str(root / 'ILSVRC2012_img_train.tar'), '--out', str(out)]) == 0
    assert prepare_imagenet.main(['--val-tar', str(root / 'ILSVRC2012_img_val.tar'), '--val-labels',
                                  str(tmp_path / 'synsets.txt'), '--out', str(out), '-j', '1']) == 0
    assert ('warning: 1 val classes are not in train and 0 train classes not in val: train.py needs the same in both'
            in capsys.readouterr().out)


def test_val_image_listed_twice_with_the_same_synset_is_accepted(tars, tmp_path):
    rows = (tars['root'] / 'LOC_val_solution.csv').read_text().splitlines(keepends=True)
    (tmp_path / 'repeated.csv').write_text(''.join(rows + rows[3:4]))
    assert prepare_imagenet.main(args_for(tars, tmp_path / 'imagenet', labels=str(tmp_path / 'repeated.csv'))) == 0
    assert image_tree(tmp_path / 'imagenet') == source_tree(tars)


def test_verdict_names_the_full_set_or_the_part():
    full = dict(train=dict(images=1_281_167, classes=1000), val=dict(images=50_000, classes=1000))
    assert prepare_imagenet.verdict(full) == 'full ImageNet-1k: 1,281,167 train and 50,000 val images in 1,000 classes'
    assert prepare_imagenet.verdict(dict(train=full['train'])) == (
        'subset of ImageNet-1k: train 1,281,167 of 1,281,167 images in 1,000 of 1,000 classes; no val')


def test_progress_redraws_one_line_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    progress = prepare_imagenet.Progress(units=2, total_bytes=300, stream=stream)
    progress.advance(dict(source_bytes=100, files=[['a', 1]] * 3))
    progress.advance(dict(source_bytes=200, files=[['a', 1]] * 5))
    lines = stream.getvalue().split('\r\033[K')[1:]
    assert [line.split(' tars')[0] for line in lines] == ['  0% 0/2', ' 33% 1/2', '100% 2/2']
    assert stream.getvalue().count('\n') == 1 and '8 images' in lines[2]


def write_bad_inputs(tmp: Path, val_tar: Path):
    (tmp / 'not_a.tar').write_bytes(b'hello, this is not a tar' * 40)
    (tmp / 'truncated.tar').write_bytes(val_tar.read_bytes()[:3000])
    (tmp / 'short.txt').write_text('n01440764\n' * 5)
    (tmp / 'long.txt').write_text('n01440764\n' * 7)
    (tmp / 'numbers.txt').write_text('65\n970\n230\n809\n516\n57\n')
    (tmp / 'caffe.txt').write_text(''.join(f'ILSVRC2012_val_{i:08d}.JPEG 65\n' for i in range(1, 7)))
    (tmp / 'other.csv').write_text('ImageId,PredictionString\n' + ''.join(
        f'ILSVRC2013_val_{i:08d},n01440764 1 2 3 4\n' for i in range(1, 7)))
    (tmp / 'a_file').write_text('')
    (tmp / 'twice.csv').write_text('ImageId,PredictionString\n' + ''.join(
        f'ILSVRC2012_val_{i:08d},{synset} 1 2 3 4\n' for i, synset in enumerate(VAL_SYNSETS, start=1))
        + 'ILSVRC2012_val_00000003,n09999999 1 2 3 4\n')
    (tmp / 'made_up.txt').write_text('\n'.join(VAL_SYNSETS[:5] + ['n09999999']) + '\n')


# (arguments, the start of the one error line); {train} and {val} are the tars, {tmp} the test's folder
BAD_INPUTS = {
    'missing tar': ('--train-tar {tmp}/nope.tar', 'not found: {tmp}/nope.tar'),
    'not a tar': ('--train-tar {tmp}/not_a.tar', '{tmp}/not_a.tar is not a readable uncompressed tar'),
    'truncated tar': ('--val-tar {tmp}/truncated.tar --val-labels {csv}',
                      '{tmp}/truncated.tar is not a readable uncompressed tar: unexpected end of data'),
    'val tar as train tar': ('--train-tar {val}', '{val} holds ILSVRC2012_val_00000001.JPEG: the train tar holds'),
    'train tar as val tar': ('--val-tar {train} --val-labels {csv}', '{train} holds n01440764.tar: the val tar'),
    'no labels': ('--val-tar {val}', '--val-tar needs --val-labels'),
    'no tar': ('', 'nothing to do'),
    'too few labels': ('--val-tar {val} --val-labels {tmp}/short.txt',
                       'short.txt labels 5 images and ILSVRC2012_img_val.tar holds 6: no label for 1 of its images'),
    'too many labels': ('--val-tar {val} --val-labels {tmp}/long.txt',
                        'long.txt labels 7 images and ILSVRC2012_img_val.tar holds 6: no image for 1 of the labels'),
    'devkit numbers': ('--val-tar {val} --val-labels {tmp}/numbers.txt', '{tmp}/numbers.txt holds class numbers'),
    'unknown labels format': ('--val-tar {val} --val-labels {tmp}/caffe.txt',
                              "{tmp}/caffe.txt: entry 1 is 'ILSVRC2012_val_00000001.JPEG 65'"),
    'labels of other files': ('--val-tar {val} --val-labels {tmp}/other.csv',
                              'other.csv labels 6 images and ILSVRC2012_img_val.tar holds 6: no label for 6 of'),
    'labels not a text file': ('--val-tar {val} --val-labels {train}', '{train} is not a text file'),
    'one image, two synsets': ('--val-tar {val} --val-labels {tmp}/twice.csv',
                               '{tmp}/twice.csv line 8: ILSVRC2012_val_00000003 is labelled n09999999, and n01484850 '
                               'on line 4: one synset per image; damaged labels file?'),
    'val synset without a class tar': ('--train-tar {train} --val-tar {val} --val-labels {tmp}/made_up.txt',
                                       'made_up.txt names synsets that ILSVRC2012_img_train.tar has no class tar '
                                       'for (1, e.g. n09999999 for ILSVRC2012_val_00000006.JPEG): train.py needs the '
                                       'same classes in train and val; wrong labels file?'),
    'out is a file': ('--train-tar {train} --out {tmp}/a_file', '--out {tmp}/a_file is a file'),
    'bad quality': ('--train-tar {train} --quality 0', '--quality must be from 1 to 100'),
}


@pytest.mark.parametrize('case', BAD_INPUTS)
def test_bad_input_gives_one_line_and_exit_code_2(tars, tmp_path, capsys, case):
    root = tars['root']
    names = dict(tmp=tmp_path, train=root / 'ILSVRC2012_img_train.tar', val=root / 'ILSVRC2012_img_val.tar',
                 csv=root / 'LOC_val_solution.csv')
    write_bad_inputs(tmp_path, names['val'])
    args, message = (text.format(**names) for text in BAD_INPUTS[case])
    out = [] if '--out' in args else ['--out', str(tmp_path / 'out')]
    assert prepare_imagenet.main(args.split() + out) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith(f'prepare_imagenet.py: error: {message}'), err
    assert not (tmp_path / 'out').exists()


def test_damaged_class_tar_stops_with_one_line_and_keeps_the_other_classes(tars, tmp_path, capsys):
    root = tars['root']
    train = write_tar(tmp_path / 'ILSVRC2012_img_train.tar', {
        'n01440764.tar': (root / 'n01440764.tar').read_bytes(), 'n01443537.tar': b'not a tar at all' * 64})
    out = tmp_path / 'imagenet'
    assert prepare_imagenet.main(['--train-tar', str(train), '--out', str(out), '-j', '1']) == 2
    assert capsys.readouterr().err == ('prepare_imagenet.py: error: ILSVRC2012_img_train.tar: n01443537.tar is '
                                       'damaged: invalid header\n')
    assert image_tree(out) == {f'train/{p}': d for p, d in tars['train'].items() if p.startswith('n01440764/')}
    assert [p.name for p in (out / prepare_imagenet.STATE / 'train').iterdir()] == ['n01440764.json']


def test_other_settings_or_tars_do_not_continue_an_earlier_tree(tars, tmp_path, capsys):
    out = tmp_path / 'imagenet'
    assert prepare_imagenet.main(args_for(tars, out)) == 0
    before = tree(out)
    capsys.readouterr()
    assert prepare_imagenet.main(args_for(tars, out, '--max-side', '64')) == 2
    assert capsys.readouterr().err == (f'prepare_imagenet.py: error: {out} was written copying bytes, this run would '
                                       'write re-encoding at quality 90, longer side <= 64: use the same settings to '
                                       'continue it, or another --out\n')
    assert prepare_imagenet.main(args_for(tars, out, labels='synsets.txt')) == 2
    assert 'val was written from ILSVRC2012_img_val.tar' in capsys.readouterr().err
    assert tree(out) == before


def test_folders_it_did_not_write_are_left_alone(tars, tmp_path, capsys):
    out = tmp_path / 'imagenet'
    (out / 'train' / 'n01440764').mkdir(parents=True)
    (out / 'train' / 'n01440764' / 'mine.JPEG').write_bytes(b'a user file')
    assert prepare_imagenet.main(args_for(tars, out)) == 2
    assert capsys.readouterr().err == (f'prepare_imagenet.py: error: {out / "train"} exists and was not written by '
                                       'this tool; choose another --out\n')
    assert tree(out) == {'train/n01440764/mine.JPEG': b'a user file'}


def test_script_exits_2_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / 'tools' / 'prepare_imagenet.py'), '--train-tar',
                             str(tmp_path / 'nope.tar'), '--out', str(tmp_path / 'out')], capture_output=True,
                            text=True, env={**os.environ, 'PYTHONPATH': ''})
    assert result.returncode == 2
    assert result.stderr == f'prepare_imagenet.py: error: not found: {tmp_path / "nope.tar"}\n'
