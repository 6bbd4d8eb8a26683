"""Knowledge distillation: the teacher sees the student's batch, timm's loss weighs it, the student moves towards it."""
import re
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.models import create_model

import train
from tools import export
from training.config import parse_config
from training.data import BatchLayout
from training.distributed import Processes

from conftest import MODEL, assert_same_weights, load, run_args, run_train, spawn_train, summary

IMAGENET_MEAN, IMAGENET_STD = ('0.485', '0.456', '0.406'), ('0.229', '0.224', '0.225')
STUDENT = ['--kd-task-weight', '0', '--kd-weight', '1', '--kd-temperature', '1', '--no-model-ema']


@pytest.fixture(scope='module')
def teacher(shapes, tmp_path_factory):
    """A run of ours, 3 epochs: its best checkpoint teaches (its EMA weights earned the metric or its raw ones). It
    normalises its input with ImageNet's mean and std, the students below with others."""
    output = tmp_path_factory.mktemp('teacher')
    assert run_train(shapes, output, '--epochs', '3', '--lr', '3.0e-3', '--mean', *IMAGENET_MEAN, '--std',
                     *IMAGENET_STD, experiment='teacher') == 0
    return output / 'teacher' / 'model_best.pth.tar'


def teacher_network(path) -> torch.nn.Module:
    state = load(path)
    model = create_model(MODEL, num_classes=10)
    model.load_state_dict(state['state_dict_ema' if state['metric_weights'] == 'ema' else 'state_dict'])
    return model.eval()


class Recorder(torch.nn.Module):
    """Wraps a loss and keeps the targets it was given."""

    def __init__(self, loss_fn):
        super().__init__()
        self.loss_fn, self.targets = loss_fn, None

    def forward(self, logits, targets):
        self.targets = targets
        return self.loss_fn(logits, targets)


def test_the_teacher_sees_the_mixed_batch_of_the_student_and_timms_loss_weighs_it(shapes, teacher):
    config = parse_config(run_args(shapes, shapes.parent / 'unused', '--kd-teacher', str(teacher), '--mixup',
                                   '0.8', '--cutmix', '1.0', '--kd-temperature', '2', '--kd-weight', '0.7',
                                   '--kd-task-weight', '0.3', '--mean', '0.5', '--std', '0.25'))
    t = train.build_trainer(config, Processes(0, 1, 0, torch.device('cpu')), BatchLayout.create(4, 1, None),
                            train.build_model(config, 10), 10, steps_per_epoch=5)
    seen = {}
    t.model.register_forward_hook(lambda m, i, o: seen.update(student=(i[0].clone(), o.detach().clone())))
    t.distill.teacher.model.register_forward_hook(lambda m, i, o: seen.update(teacher=(i[0].clone(), o.clone())))
    t.distill.criterion = criterion = Recorder(t.distill.criterion)
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    original = x.clone()  # timm's Mixup mixes in place

    loss, task_loss, kd_loss = train.forward_backward(t, x, y, True, 1, False)

    student_x, student_logits = seen['student']
    teacher_x, teacher_logits = seen['teacher']
    assert not torch.equal(student_x, original) and criterion.targets.shape == (4, 10)  # Mixup/CutMix mixed the batch
    imagenet_mean, imagenet_std = (torch.tensor([float(v) for v in values]) for values in (IMAGENET_MEAN, IMAGENET_STD))
    pixels = student_x * 0.25 + 0.5  # the run's normalisation undone, the teacher's (ImageNet's, from its run) done
    torch.testing.assert_close(teacher_x, (pixels - imagenet_mean.view(1, 3, 1, 1)) / imagenet_std.view(1, 3, 1, 1))
    torch.testing.assert_close(teacher_logits, teacher_network(teacher)(teacher_x))  # eval mode, its metric's weights
    expected_task = -(criterion.targets * F.log_softmax(student_logits, dim=1)).sum(1).mean()
    p_teacher = F.softmax(teacher_logits / 2, dim=1)
    expected_kd = (p_teacher * (p_teacher.log() - F.log_softmax(student_logits / 2, dim=1))).sum(1).mean() * 2 ** 2
    torch.testing.assert_close(task_loss, expected_task)
    torch.testing.assert_close(kd_loss, expected_kd)
    torch.testing.assert_close(loss, 0.3 * expected_task + 0.7 * expected_kd)
    assert all(p.grad is None for p in t.distill.teacher.parameters())
    assert all(p.grad is not None for p in t.model.parameters())


def val_images(shapes) -> torch.Tensor:
    paths = sorted((shapes / 'val').glob('*/*.jpg'))
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert('RGB'))) for p in paths])
    x = pixels.permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1)


def kl_to(teacher: torch.nn.Module, weights: dict, x: torch.Tensor) -> float:
    student = create_model(MODEL, num_classes=10)
    student.load_state_dict(weights)
    with torch.no_grad():
        return F.kl_div(F.log_softmax(student.eval()(x), 1), F.log_softmax(teacher(x), 1), reduction='batchmean',
                        log_target=True).item()


@pytest.fixture(scope='module')
def distilled(shapes, teacher, tmp_path_factory):
    """A student distilled from the teacher alone, and the same student trained on the labels alone."""
    output = tmp_path_factory.mktemp('students')
    assert run_train(shapes, output, '--kd-teacher', str(teacher), *STUDENT, experiment='kd') == 0
    assert run_train(shapes, output, '--no-model-ema', experiment='labels') == 0
    return output


def test_a_distilled_student_ends_closer_to_its_teacher_than_one_trained_on_labels(shapes, teacher, distilled):
    x = val_images(shapes)
    network = teacher_network(teacher)
    kd = kl_to(network, load(distilled / 'kd' / 'last.pth.tar')['state_dict'], x)
    labels = kl_to(network, load(distilled / 'labels' / 'last.pth.tar')['state_dict'], x)
    assert kd < 0.8 * labels, (kd, labels)


def test_the_log_shows_the_task_and_distillation_losses_apart(distilled):
    lines = [line for line in (distilled / 'kd' / 'log.txt').read_text().splitlines() if ' step ' in line]
    parts = [re.search(r'loss ([\d.]+) \(task ([\d.]+), kd ([\d.]+)\)', line) for line in lines]
    assert len(parts) == 10 and all(parts)
    for m in parts:  # kd_task_weight 0, kd_weight 1: the loss is the distillation loss
        assert float(m.group(1)) == pytest.approx(float(m.group(3)), abs=2e-5)
        assert float(m.group(2)) > 0


def test_a_distillation_killed_and_rerun_ends_bit_identical(shapes, teacher, distilled, tmp_path):
    args = ['--kd-teacher', str(teacher), *STUDENT, '--recovery-interval', '2']
    reference = tmp_path / 'reference'
    assert run_train(shapes, reference, *args, experiment='kd') == 0
    proc = spawn_train(shapes, tmp_path, *args, experiment='kd')
    for line in proc.stdout:
        if re.search(r'epoch 1 step 3/5', line):
            proc.send_signal(signal.SIGTERM)
            break
    proc.stdout.read()
    assert proc.wait() == 75
    assert run_train(shapes, tmp_path, *args, experiment='kd') == 0
    assert_same_weights(load(tmp_path / 'kd' / 'last.pth.tar')['state_dict'],
                        load(reference / 'kd' / 'last.pth.tar')['state_dict'])
    assert [r['val_top1'] for r in summary(tmp_path / 'kd')] == [r['val_top1'] for r in summary(reference / 'kd')]


def test_an_export_folder_teaches_as_its_checkpoint_does(shapes, teacher, tmp_path):
    assert export.main(['--checkpoint', str(teacher), '--out', str(tmp_path / 'export')]) == 0
    logits = []
    for spec in (str(teacher), f"local-dir:{tmp_path / 'export'}"):
        config = parse_config(run_args(shapes, tmp_path, '--kd-teacher', spec))
        t = train.build_trainer(config, Processes(0, 1, 0, torch.device('cpu')), BatchLayout.create(4, 1, None),
                                train.build_model(config, 10), 10, steps_per_epoch=5)
        torch.manual_seed(0)
        x = torch.randn(2, 3, 32, 32)
        logits.append(t.distill.teacher(t.distill.teacher.normalize_input(x, t.distill.student_mean,
                                                                          t.distill.student_std)))
    torch.testing.assert_close(logits[0], logits[1])


@pytest.mark.parametrize('flags, message', [
    (['--kd-teacher', 'TWELVE_CLASSES'], r'predicts 12 classes and this run has 10'),
    (['--kd-teacher', 'resnet18'], r'kd_teacher resnet18: its pretrained weights could not be loaded'),
    (['--kd-teacher', 'resnet_no_such'], r'kd_teacher resnet_no_such: Unknown model'),
    (['--kd-teacher', 'local-dir:nowhere'], r'kd_teacher local-dir:nowhere: no config.json'),
    (['--kd-weight', '0.5'], r'kd_weight weigh a distillation: set kd_teacher'),
    (['--kd-teacher', 'TEACHER', '--kd-task-weight', '1'], r'the distillation loss has weight 0'),
])
def test_a_teacher_that_cannot_teach_is_refused_in_one_line(shapes, teacher, tmp_path, capsys, monkeypatch, flags,
                                                            message):
    # as on a machine without the network, without waiting for connections to time out
    monkeypatch.setattr('huggingface_hub.constants.HF_HUB_OFFLINE', True)
    twelve = tmp_path / 'twelve.pth.tar'
    torch.save(dict(state_dict=create_model(MODEL, num_classes=12).state_dict(),
                    config=dict(model=MODEL, num_classes=12)), twelve)
    flags = [{'TEACHER': str(teacher), 'TWELVE_CLASSES': str(twelve)}.get(f, f) for f in flags]
    assert run_train(shapes, tmp_path, *flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_dry_run_counts_the_teachers_forward_in_the_time_per_image(shapes, teacher, capsys):
    def expected_time(*flags):
        assert train.main([*run_args(shapes, shapes.parent / 'unused'), '--throughput', '10',
                           '--num-classes', '10', *flags, '--dry-run']) == 0
        return capsys.readouterr().out
    plain, taught = expected_time(), expected_time('--kd-teacher', str(teacher))
    # a teacher of the student's own architecture: a third more per step (one forward more, after three)
    assert re.search(r'teacher: .* 1\.0x the student\'s; a step costs ~1\.33x a plain one', taught)
    assert 'at 10 img/s per process' in plain and 'at 7.5 img/s per process (given by --throughput / 1.33' in taught


def test_timm_args_name_the_teacher_as_timms_train_py_does(tmp_path):
    args = tmp_path / 'args.yaml'
    args.write_text('model: resnet50\nkd_model_name: resnet152.tv2_in1k\ndistill_loss_weight: 0.5\n'
                    'task_loss_weight: 0.5\nkd_temperature: 2.0\nbatch_size: 128\n')
    config = parse_config(['-c', str(args)])
    assert (config['kd_teacher'], config['kd_weight'], config['kd_task_weight'], config['kd_temperature']) == \
        ('resnet152.tv2_in1k', 0.5, 0.5, 2.0)
