#!/usr/bin/env python
"""Export a checkpoint for timm and the Hugging Face Hub: weights, config, model card, and the web demo.

    python tools/export.py --checkpoint output/rn50_130ep/model_best.pth.tar --out export/rn50 [--weights ema|raw|swa]
                           [--onnx]

Writes, in the layout timm's Hub loader reads (`timm.create_model('local-dir:DIR', pretrained=True)`, or
'hf-hub:USER/REPO' once uploaded):
    model.safetensors  the chosen weights (default: those that earned the checkpoint its metric)
    config.json        architecture, num_classes, class names and the evaluation preprocessing (pretrained_cfg)
    README.md          model card: recipe, top-1, data, commit, curves, the command that trains it again; its header
                       also makes the folder a Gradio Space. The weights of a mid-epoch recovery checkpoint are named
                       by epoch and step, as never evaluated
    app.py, classifier.py, requirements.txt   the web demo (demo/), and model_defs/ for our own architectures
    curves.png, train_config.yaml             from the run folder, when there
    model.onnx         with --onnx, checked against PyTorch's outputs when onnxruntime is installed
An existing folder is refused unless it is empty or an earlier export; only the files an export writes are replaced.
"""
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch
from timm.models import save_for_hf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.predict import checkpoint_classifier  # noqa: E402
from training.config import OneLineParser, UserError  # noqa: E402
from training.reporting import read_summary  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEMO_FILES = ('app.py', 'classifier.py', 'requirements.txt')
# what an export writes: the only names a new export into the same folder replaces
EXPORT_FILES = ('model.safetensors', 'config.json', 'README.md', 'curves.png', 'train_config.yaml', 'model.onnx',
                'model_defs', *DEMO_FILES)
MARKER = 'tools/export.py'  # config.json's export.tool: tells an export of ours from other folders


def parse_args(argv=None):
    parser = OneLineParser(prog='export.py', description=__doc__.splitlines()[0])
    parser.add_argument('--checkpoint', required=True, help='training checkpoint')
    parser.add_argument('--out', required=True, help='folder to write (new, empty, or an earlier export)')
    parser.add_argument('--weights', choices=('ema', 'raw', 'swa'),
                        help='weights to export (default: those that earned the checkpoint its metric)')
    parser.add_argument('--onnx', action='store_true', help='also write model.onnx (needs onnx and onnxscript)')
    return parser.parse_strict(argv)


def is_export(folder: Path) -> bool:
    try:
        return json.loads((folder / 'config.json').read_text()).get('export', {}).get('tool') == MARKER
    except (OSError, ValueError, AttributeError):
        return False


def check_folder(out: Path):
    """Refuse a folder that an export must not write into: a file, or a folder holding anything but an export of
    ours (an export never deletes what it did not write)."""
    if out.exists() and not out.is_dir():
        raise UserError(f'--out {out} is a file, not a folder')
    if out.is_dir() and any(out.iterdir()) and not is_export(out):
        raise UserError(f'--out {out} is not empty and not an export of tools/export.py (no config.json of ours): '
                        'nothing there is replaced; pick another folder')


def clear_earlier_export(out: Path):
    """Remove the files an earlier export wrote (a model.onnx of other weights must not stay); others stay."""
    for path in (out / name for name in EXPORT_FILES):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def check_onnx_packages():
    """--onnx needs packages that the training requirements leave out: say which before anything is written."""
    missing = [name for name in ('onnx', 'onnxscript') if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"--onnx needs {' and '.join(missing)}: pip install onnx onnxscript onnxruntime "
                        '(onnxruntime checks the export)')


def mid_epoch_step(state: dict) -> Optional[int]:
    """The optimizer steps done in its epoch by the weights of a mid-epoch (recovery) checkpoint; None for an epoch's
    end. A recovery checkpoint's progress is still in the epoch the checkpoint names, an epoch end's is in the next."""
    progress = state.get('progress')
    if (not progress) or (progress.get('epoch') != state.get('epoch')):
        return None
    return progress.get('step')


def weights_described(state: dict, weights: str) -> str:
    """Which weights these are, for the model card and the output: a recovery checkpoint's are not those of the
    epoch's end, and were never evaluated."""
    step = mid_epoch_step(state)
    described = f"{weights} weights of epoch {state.get('epoch')}"
    return described if step is None else (f'{described} after {step} optimizer steps (a mid-epoch recovery '
                                           'checkpoint: not evaluated)')


def logged_top1(run_dir: Path, epoch: int, weights: str):
    """The top-1 that summary.csv logged for these weights at the checkpoint's epoch; None when not there."""
    try:
        rows = read_summary(run_dir / 'summary.csv')
    except OSError:
        return None
    column = 'val_top1' if weights == 'raw' else f'{weights}_val_top1'
    return next((row.get(column) for row in rows if row.get('epoch') == epoch), None)


def replay_command(run_dir: Path):
    """The command in the header of the run's config.yaml that trains it again; None when not there."""
    try:
        header = (run_dir / 'config.yaml').read_text()
    except OSError:
        return None
    found = re.search(r'^# replay it in a new run folder: (.+)$', header, re.MULTILINE)
    return found.group(1) if found else None


def gradio_version() -> str:
    """The Gradio version that demo/requirements.txt pins: the Space's README header must name the same."""
    found = re.search(r'^gradio==(\S+)', (REPO / 'demo' / 'requirements.txt').read_text(), re.MULTILINE)
    return found.group(1)


def data_lines(state: dict, config: dict) -> list:
    data = state.get('data') or {}
    manifest = data.get('manifest')
    if manifest:
        return [f"- data manifest (tools/prepare_imagenet.py): sha256 `{manifest['sha256']}`, "
                f"{manifest.get('images')} images"]
    return [f"- data: no manifest recorded ({config.get('dataset') or 'class folders'}; {data.get('classes')} classes, "
            f"{data.get('train_images')} training and {data.get('val_images')} validation images)"]


def card_header(title: str, imagenet: bool) -> list:
    """YAML metadata: the Hub's model card fields, and the Space's (sdk, its version, the app file)."""
    return ['---', f'title: {title}', 'sdk: gradio', f'sdk_version: {gradio_version()}', 'app_file: app.py',
            'library_name: timm', 'pipeline_tag: image-classification', 'tags: [image-classification, timm]',
            *(['datasets: [imagenet-1k]'] if imagenet else []), '---', '']


def card_facts(state: dict, weights: str, data_cfg: dict, run_dir: Path) -> list:
    config, versions, epoch = state.get('config') or {}, state.get('versions') or {}, state.get('epoch')
    step, top1 = mid_epoch_step(state), logged_top1(run_dir, epoch, weights)
    if step is not None:  # summary.csv's row for this epoch measured the weights at its end, not these
        top1 = (f'not evaluated (saved after {step} optimizer steps of epoch {epoch}, before its evaluation; '
                'validate.py measures them)')
    elif top1 is not None:
        top1 = f"{top1:.2f} % ({weights} weights, validation set, from the run's summary.csv)"
    else:
        top1 = f'not available (no summary.csv next to the checkpoint with a row for epoch {epoch})'
    return [
        f'- recipe: {config.get("recipe") or "none (options on the command line)"}',
        f'- top-1: {top1}',
        *data_lines(state, config),
        f"- commit: {versions.get('git') or 'not recorded'}",
        f"- evaluation: {data_cfg['input_size'][-1]} px, crop_pct {data_cfg['crop_pct']}, "
        f"{data_cfg['interpolation']} interpolation, mean {tuple(data_cfg['mean'])}, std {tuple(data_cfg['std'])}",
        f"- versions: torch {versions.get('torch')}, timm {versions.get('timm')}",
        '',
    ]


def card_usage(own_architecture: bool) -> list:
    return ['## Use it', '', '```python', 'import timm',
            *(['import model_defs  # this architecture is defined in model_defs/, next to this file']
              if own_architecture else []),
            "model = timm.create_model('local-dir:PATH_TO_THIS_FOLDER', pretrained=True).eval()  "
            "# or 'hf-hub:USER/REPO'",
            'transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))',
            '```', '',
            'Web demo: `pip install -r requirements.txt && python app.py` (a Gradio app; as a Hugging Face Space it '
            'runs from this folder as it is).', '']


def model_card(state: dict, weights: str, data_cfg: dict, run_dir: Path, architecture: str, imagenet: bool,
               own_architecture: bool) -> str:
    """README.md: the Hub's model card, whose YAML header also configures a Gradio Space."""
    title = f"{architecture} {(state.get('config') or {}).get('experiment') or ''}".strip()
    lines = card_header(title, imagenet) + [
        f'# {title}', '',
        f"{architecture}, trained with this repository's train.py; {weights_described(state, weights)}.",
        '', *card_facts(state, weights, data_cfg, run_dir)]
    if (run_dir / 'curves.png').is_file():
        lines += ['## Training curves', '', '![training curves](curves.png)', '']
    command = replay_command(run_dir)
    lines += ['## Train it again', '']
    lines += (['From the run folder (train_config.yaml here is a copy of its config.yaml):', '', f'    {command}', '']
              if command else ['not available: the run folder held no config.yaml', ''])
    return '\n'.join(lines + card_usage(own_architecture))


def copy_demo(out: Path, own_architecture: bool):
    """The web demo, and the definitions of our own architectures (timm does not have them), so that the folder runs
    as a Space as it is."""
    for name in DEMO_FILES:
        shutil.copy2(REPO / 'demo' / name, out / name)
    if own_architecture:
        shutil.copytree(REPO / 'model_defs', out / 'model_defs', ignore=shutil.ignore_patterns('__pycache__'))


def export_onnx(model: torch.nn.Module, data_cfg: dict, path: Path) -> str:
    """model.onnx with a free batch size; returns how it compares with PyTorch's outputs."""
    example = torch.randn(2, *data_cfg['input_size'])
    batch = torch.export.Dim('batch', min=1)
    torch.onnx.export(model, (example,), str(path), input_names=['image'], output_names=['logits'],
                      dynamic_shapes=({0: batch},), dynamo=True, external_data=False, verbose=False)
    if importlib.util.find_spec('onnxruntime') is None:
        return 'not checked against PyTorch: pip install onnxruntime to check it'
    import onnxruntime
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    images = torch.randn(3, *data_cfg['input_size'])
    with torch.inference_mode():
        expected = model(images).numpy()
    difference = float(abs(session.run(None, {'image': images.numpy()})[0] - expected).max())
    if difference > 1e-3 * max(1.0, float(abs(expected).max())):
        raise UserError(f'{path} does not reproduce PyTorch: logits differ by up to {difference:.3g}')
    return f'checked with onnxruntime: logits within {difference:.2g} of PyTorch'


def export(checkpoint: str, out: Path, weights: Optional[str] = None, onnx: bool = False) -> Path:
    """Write the export folder `out` of a checkpoint (weights: None for those that earned it its metric)."""
    check_folder(out)
    if onnx:
        check_onnx_packages()
    classifier, state, weights = checkpoint_classifier(checkpoint, weights)
    model = classifier.model.eval()
    architecture = model.pretrained_cfg['architecture']
    own_architecture = type(model).__module__.split('.')[0] == 'model_defs'
    run_dir = Path(checkpoint).resolve().parent
    clear_earlier_export(out)
    out.mkdir(parents=True, exist_ok=True)
    export_info = dict(tool=MARKER, checkpoint=str(checkpoint), weights=weights, epoch=state.get('epoch'))
    step = mid_epoch_step(state)
    if step is not None:
        export_info['step'] = step  # of a mid-epoch checkpoint
    labels = dict(label_names=classifier.label_names)
    if classifier.label_descriptions:
        labels['label_descriptions'] = classifier.label_descriptions
    # the tag names the run, not timm's 'untrained' of the registered default config
    pretrained_cfg = dict(tag=(state.get('config') or {}).get('experiment') or 'trained')
    save_for_hf(model, out, model_config=dict(labels, export=export_info, pretrained_cfg=pretrained_cfg),
                safe_serialization=True, data_config=classifier.data_cfg)
    # safetensors writes its file readable by its owner alone; it gets the mode of the others (the umask's)
    (out / 'model.safetensors').chmod((out / 'config.json').stat().st_mode & 0o777)
    copy_demo(out, own_architecture)
    for source, name in (('curves.png', 'curves.png'), ('config.yaml', 'train_config.yaml')):
        if (run_dir / source).is_file():
            shutil.copy2(run_dir / source, out / name)
    imagenet = classifier.label_descriptions is not None
    (out / 'README.md').write_text(model_card(state, weights, classifier.data_cfg, run_dir, architecture, imagenet,
                                              own_architecture))
    print(f'export.py: {architecture} ({weights_described(state, weights)}) written to {out}')
    if onnx:
        print(f'export.py: {out / "model.onnx"}: {export_onnx(model, classifier.data_cfg, out / "model.onnx")}')
    return out


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        export(args.checkpoint, Path(args.out), args.weights, args.onnx)
    except UserError as e:
        print(f'export.py: error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
