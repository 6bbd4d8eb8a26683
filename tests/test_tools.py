import os
import subprocess

import pytest

from tools import sort_imagenet_val

from conftest import REPO


def make_flat_val(tmp_path, count=4):
    val = tmp_path / 'val'
    val.mkdir()
    for i in range(1, count + 1):
        (val / f'ILSVRC2012_val_{i:08d}.JPEG').write_bytes(b'jpeg')
    return val


def test_sorts_flat_val_with_kaggle_csv(tmp_path):
    val = make_flat_val(tmp_path)
    labels = tmp_path / 'LOC_val_solution.csv'
    labels.write_text('ImageId,PredictionString\n'
                      'ILSVRC2012_val_00000001,n01751748 1 2 3 4\nILSVRC2012_val_00000002,n09193705 5 6 7 8\n'
                      'ILSVRC2012_val_00000003,n01751748 1 2 3 4 n01751748 5 6 7 8\n'
                      'ILSVRC2012_val_00000004,n02105855 1 2 3 4\n')
    assert sort_imagenet_val.main([str(val), str(labels)]) == 0
    assert sorted(p.relative_to(val).as_posix() for p in val.rglob('*.JPEG')) == [
        'n01751748/ILSVRC2012_val_00000001.JPEG', 'n01751748/ILSVRC2012_val_00000003.JPEG',
        'n02105855/ILSVRC2012_val_00000004.JPEG', 'n09193705/ILSVRC2012_val_00000002.JPEG']


def test_sorts_flat_val_with_synset_list(tmp_path):
    val = make_flat_val(tmp_path, 3)
    labels = tmp_path / 'synsets.txt'
    labels.write_text('n01440764\nn01443537\nn01440764\n')
    sort_imagenet_val.main([str(val), str(labels)])
    assert len(list((val / 'n01440764').iterdir())) == 2 and len(list((val / 'n01443537').iterdir())) == 1


@pytest.mark.parametrize('name, text, message', [
    ('synsets.txt', 'n01440764\n', '2 images have no label'),
    ('ILSVRC2012_validation_ground_truth.txt', '490\n361\n',
     'holds class numbers .* expected LOC_val_solution.csv or a list of synsets'),
])
def test_bad_labels_stop_before_moving_anything(tmp_path, name, text, message):
    val = make_flat_val(tmp_path, 3)
    labels = tmp_path / name
    labels.write_text(text)
    with pytest.raises(SystemExit, match=message):
        sort_imagenet_val.main([str(val), str(labels)])
    assert len(list(val.glob('*.JPEG'))) == 3


def spot_loop(tmp_path, exit_codes: list, **env) -> subprocess.CompletedProcess:
    """tools/spot_loop.sh around a command that exits with the given codes in turn."""
    counter = tmp_path / 'attempt'
    counter.write_text('0')
    codes = ' '.join(map(str, exit_codes))
    command = (f'n=$(cat {counter}); echo $((n + 1)) > {counter}; '
               f'set -- {codes}; shift $n; exit $1')
    return subprocess.run([str(REPO / 'tools' / 'spot_loop.sh'), 'bash', '-c', command], capture_output=True,
                          text=True, env={**os.environ, 'RETRY_DELAY': '0', **env})


def test_spot_loop_resumes_until_the_run_finishes(tmp_path):
    result = spot_loop(tmp_path, [75, 137, 1, 0])
    assert result.returncode == 0 and (tmp_path / 'attempt').read_text().strip() == '4'
    assert 'exit code 75, resuming' in result.stderr


def test_spot_loop_stops_on_bad_input_and_after_max_attempts(tmp_path):
    assert spot_loop(tmp_path, [75, 2, 0]).returncode == 2
    result = spot_loop(tmp_path, [75, 75, 75, 0], MAX_ATTEMPTS='2')
    assert result.returncode == 75 and 'giving up after 2 attempts' in result.stderr
