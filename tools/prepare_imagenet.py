#!/usr/bin/env python
"""Write the class-folder tree train.py reads (train/<synset>/, val/<synset>/) and a manifest from ImageNet's tars.

    python tools/prepare_imagenet.py --train-tar ILSVRC2012_img_train.tar --val-tar ILSVRC2012_img_val.tar \\
        --val-labels LOC_val_solution.csv --out data/imagenet [--max-side 500] [--quality 90] [-j 16]

Either tar may be left out. --val-labels is Kaggle's LOC_val_solution.csv or a list of synsets in file order, as for
tools/sort_imagenet_val.py; labels that give an image two synsets, or a synset the train tar has no class tar for, are
refused before anything is written. Without --max-side and --quality the images are copied byte for byte; with either,
every image is decoded and saved again as a JPEG of that quality (default 90), its longer side at most --max-side.

A stopped run continues when run again: each class tar, and each chunk of 1,000 validation images, is marked done
in OUT/.prepare_imagenet/ once all its files are written, and files are renamed into place only when complete.
SIGINT (Ctrl-C) and SIGTERM end the worker processes before the tool exits; on Linux they also end with a tool killed
outright.

OUT/manifest.json describes the result; its sha256 is that of the tree's listing:
    cd OUT && find train val -type f -printf '%p\\t%s\\n' | LC_ALL=C sort | sha256sum
"""
import argparse
import contextlib
import ctypes
import fcntl
import functools
import hashlib
import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Optional

from PIL import Image, UnidentifiedImageError

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tools.sort_imagenet_val import read_labels  # noqa: E402
from training.config import UserError  # noqa: E402

FULL_IMAGES = {'train': 1_281_167, 'val': 50_000}
FULL_CLASSES = 1000
DEFAULT_QUALITY = 90
VAL_CHUNK = 1000  # validation images per unit of work: about the bytes of one class tar
STATE = '.prepare_imagenet'
MANIFEST_FORMAT = 1
SHOWN_FILES = 50  # bad files printed; the manifest lists all
PR_SET_PDEATHSIG = 1  # prctl's option, from linux/prctl.h


@dataclass(frozen=True)
class Settings:
    max_side: Optional[int]
    quality: Optional[int]  # None: bytes are copied

    @property
    def reencode(self) -> bool:
        return self.quality is not None

    @property
    def described(self) -> str:
        if not self.reencode:
            return 'copying bytes'
        return f're-encoding at quality {self.quality}, longer side <= {self.max_side or "unchanged"}'


@dataclass(frozen=True)
class Unit:
    """Work marked done as a whole: one class tar of the train tar, or a chunk of the validation images."""
    split: str
    key: str  # the synset of a class tar, the number of a validation chunk
    tar: str  # the official tar
    offset: int  # where a class tar's bytes start in the train tar
    size: int  # bytes read from the tar
    images: tuple = ()  # (name, synset, offset, size) of each validation image


# reading the official tars

def tar_members(path: Path) -> list:
    """The regular files of an uncompressed tar."""
    if not path.is_file():
        raise UserError(f'not found: {path}' if not path.exists() else f'{path} is not a file')
    try:
        with tarfile.open(path, 'r:') as tar:
            members = [m for m in tar if m.isfile()]
    except (tarfile.TarError, OSError) as e:
        raise UserError(f'{path} is not a readable uncompressed tar: {e}') from None  # a cut tar: unexpected end
    return members


def train_units(path: Path) -> list:
    """One unit per class tar, largest first so that no large one is left running alone at the end."""
    members = tar_members(path)
    other = next((m.name for m in members if not m.name.endswith('.tar')), None)
    if other or not members:
        found = f'holds {other}' if other else 'holds no files'
        raise UserError(f'{path} {found}: the train tar holds only class tars (n01440764.tar ...); is it the val tar?')
    units = [Unit('train', PurePosixPath(m.name).stem, str(path), m.offset_data, m.size) for m in members]
    return sorted(units, key=lambda unit: -unit.size)


def val_units(path: Path, labels_path: Path) -> list:
    """Chunks of VAL_CHUNK images in name order, each image with its synset."""
    members = tar_members(path)
    class_tar = next((m.name for m in members if m.name.endswith('.tar')), None)
    if class_tar:
        raise UserError(f'{path} holds {class_tar}: the val tar holds only images; is it the train tar?')
    labels = val_labels(labels_path)
    by_name = {PurePosixPath(m.name).name: m for m in members}
    if len(by_name) < len(members):
        raise UserError(f'{path} holds two images of the same name')
    check_labels_match(path, by_name, labels_path, labels)
    images = [(m.name, labels[name], m.offset_data, m.size) for name, m in sorted(by_name.items())]
    chunks = [tuple(images[i:i + VAL_CHUNK]) for i in range(0, len(images), VAL_CHUNK)]
    return [Unit('val', f'{i:03d}', str(path), 0, sum(image[3] for image in chunk), chunk)
            for i, chunk in enumerate(chunks)]


def val_labels(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f'labels not found: {path}' if not path.exists() else f'{path} is not a file')
    try:
        return read_labels(path)
    except ValueError as e:
        raise UserError(str(e)) from None


def check_val_classes(train_tar: Path, class_tars: list, labels_path: Path, chunks: list):
    """Refuse val labels naming a synset that the train tar has no class tar for: train.py needs the same classes in
    both splits, and a made-up synset would be written and counted as a class."""
    classes = {unit.key for unit in class_tars}
    unknown = {synset: name for chunk in chunks for name, synset, _, _ in chunk.images if synset not in classes}
    if unknown:
        synset, name = min(unknown.items())
        raise UserError(f'{labels_path.name} names synsets that {train_tar.name} has no class tar for '
                        f'({len(unknown):,}, e.g. {synset} for {PurePosixPath(name).name}): train.py needs the same '
                        'classes in train and val; wrong labels file?')


def check_labels_match(tar: Path, images: dict, labels_path: Path, labels: dict):
    unlabelled = sorted(set(images) - set(labels))
    unknown = sorted(set(labels) - set(images))
    if unlabelled or unknown:
        details = ([f'no label for {len(unlabelled):,} of its images (e.g. {unlabelled[0]})'] if unlabelled else []) + (
            [f'no image for {len(unknown):,} of the labels (e.g. {unknown[0]})'] if unknown else [])
        raise UserError(f'{labels_path.name} labels {len(labels):,} images and {tar.name} holds {len(images):,}: '
                        f'{" and ".join(details)}; wrong labels file?')


class Window(io.RawIOBase):
    """Bytes [start, start + size) of an open file, as a file of their own: a class tar inside the train tar."""

    def __init__(self, file, start: int, size: int):
        super().__init__()
        self.file, self.start, self.size, self.position = file, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.position = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence] + offset
        return self.position

    def readinto(self, buffer) -> int:
        count = max(0, min(len(buffer), self.size - self.position))
        self.file.seek(self.start + self.position)
        count = self.file.readinto(memoryview(buffer)[:count])
        self.position += count
        return count


def unit_images(unit: Unit):
    """(path in the tar, synset, bytes) of each image of a unit, in the order they lie in the tar."""
    with open(unit.tar, 'rb') as file:
        if unit.split == 'val':
            for name, synset, offset, size in unit.images:
                file.seek(offset)
                yield name, synset, file.read(size)
            return
        window = Window(file, unit.offset, unit.size)
        try:
            with tarfile.open(fileobj=io.BufferedReader(window, buffer_size=1 << 20), mode='r:') as tar:
                for member in tar:
                    if member.isfile():
                        yield f'{unit.key}.tar/{member.name}', unit.key, tar.extractfile(member).read()
        except tarfile.TarError as e:
            raise UserError(f'{Path(unit.tar).name}: {unit.key}.tar is damaged: {e}') from None


# checking and re-encoding one image

def inspect(data: bytes) -> tuple:
    """(problem, content) seen without decoding: the header parses and a JPEG ends with its end-of-image marker.

    content names an image that is not an RGB or grayscale JPEG (ImageNet's train tar has 22 CMYK JPEGs and a PNG).
    """
    if not data:
        return 'empty file', None
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = f'{image.format} {image.mode}'
            if image.format != 'JPEG':  # the rare other formats get their own check (PNG: chunk checksums)
                image.verify()
    except UnidentifiedImageError:
        return 'not an image PIL knows', None
    except Exception as e:  # PIL raises many types for a broken file; each means it cannot be read
        return f'cannot read: {e}', None
    content = None if kind in ('JPEG RGB', 'JPEG L') else kind
    # a truncated JPEG loses its last bytes, the end-of-image marker FF D9; allow a little padding after it
    if kind.startswith('JPEG') and b'\xff\xd9' not in data[-64:]:
        return 'truncated: no JPEG end-of-image marker', content
    return None, content


def reencode(data: bytes, settings: Settings) -> bytes:
    """An RGB (or grayscale) JPEG of the image at settings.quality, its longer side at most settings.max_side."""
    with Image.open(io.BytesIO(data)) as image:
        if image.mode not in ('RGB', 'L'):
            image = image.convert('RGB')  # the same conversion the training loader applies
        if settings.max_side:
            # keeps the aspect ratio and never enlarges; lets libjpeg decode at a reduced scale first
            image.thumbnail((settings.max_side, settings.max_side), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, 'JPEG', quality=settings.quality)
    return buffer.getvalue()


def convert(data: bytes, settings: Settings) -> tuple:
    """(bytes to write, problem or None, unusual content or None); an image with a problem is written as it is."""
    problem, content = inspect(data)
    if problem or not settings.reencode:
        return data, problem, content
    try:
        return reencode(data, settings), None, content
    except Exception as e:  # as in inspect()
        return data, f'cannot decode: {e}', content


# writing

def write_atomic(path: Path, data: bytes):
    """Write <name>.part, then rename it: a file under its final name is complete, and the re-run of a stopped
    unit overwrites the .part files it left."""
    part = path.with_name(path.name + '.part')
    part.write_bytes(data)
    os.replace(part, path)


def write_json(path: Path, value, indent: Optional[int] = None):
    write_atomic(path, (json.dumps(value, indent=indent) + '\n').encode())


def record_path(out: Path, split: str, key: str) -> Path:
    return out / STATE / split / f'{key}.json'


def process_unit(unit: Unit, out: Path, settings: Settings) -> dict:
    """Write every image of a unit, then its record, which marks it done; returns the record."""
    record = dict(split=unit.split, key=unit.key, source_bytes=unit.size, files=[], bad=[], unusual=[])
    folders = set()
    for source, synset, data in unit_images(unit):
        relpath = f'{synset}/{PurePosixPath(source).name}'
        if synset not in folders:
            (out / unit.split / synset).mkdir(parents=True, exist_ok=True)
            folders.add(synset)
        data, problem, content = convert(data, settings)
        write_atomic(out / unit.split / relpath, data)
        record['files'].append([relpath, len(data)])
        where = dict(source=source, file=f'{unit.split}/{relpath}')
        if problem:
            record['bad'].append(dict(where, problem=problem))
        if content:
            record['unusual'].append(dict(where, content=content))
    path = record_path(out, unit.split, unit.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record)
    return record


class Interrupted(BaseException):
    """SIGINT or SIGTERM, raised in the main process wherever it is. A BaseException, as KeyboardInterrupt is, so that
    the `except Exception` around the decoding of one image does not take it for a bad image."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


@contextlib.contextmanager
def interruptible():
    """SIGINT and SIGTERM raise Interrupted while the run lasts, so that leaving the pool's block terminates its
    workers before this process ends. A signal that whoever started us ignores (SIGINT of a background job) stays
    ignored."""
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    for number, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(number, _raise_interrupted)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _worker_signals(parent: int):
    """Ctrl-C reaches every process of the terminal: the main process alone handles it, and terminates the workers.
    SIGTERM, which terminate() sends, ends a worker at once and silently (the handler inherited from the main process
    would print a traceback): the unit it was writing has no record yet, so a rerun writes all of it again. On Linux a
    worker also ends when the main process dies without terminating it (SIGKILL, out of memory), rather than finish
    its units alone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith('linux'):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the main process died before prctl took effect
            os._exit(1)


def run_units(units: list, out: Path, settings: Settings, jobs: int, progress: 'Progress'):
    work = functools.partial(process_unit, out=out, settings=settings)
    if jobs == 1:
        for record in map(work, units):
            progress.advance(record)
        return
    # leaving the block, on an error or Interrupted too, terminates the workers and waits for them to end
    with multiprocessing.Pool(min(jobs, len(units)), initializer=_worker_signals, initargs=(os.getpid(),)) as pool:
        for record in pool.imap_unordered(work, units):
            progress.advance(record)


class Progress:
    """One line redrawn on a terminal; elsewhere (a log file) a plain line every `interval` seconds and at the end."""

    def __init__(self, units: int, total_bytes: int, stream=None, interval: float = 30.0):
        self.units, self.total_bytes, self.interval = units, max(total_bytes, 1), interval
        self.stream = stream or sys.stderr
        self.done_units = self.done_bytes = self.images = 0
        self.start = self.shown = time.monotonic()
        self.redraw = self.stream.isatty()
        if self.redraw:
            self.show(self.start)

    def advance(self, record: dict):
        self.done_units += 1
        self.done_bytes += record['source_bytes']
        self.images += len(record['files'])
        now = time.monotonic()
        if self.redraw or (now - self.shown >= self.interval) or (self.done_units == self.units):
            self.shown = now
            self.show(now)

    def line(self, now: float) -> str:
        rate = self.done_bytes / max(now - self.start, 1e-9)
        eta = (self.total_bytes - self.done_bytes) / rate if rate else 0.0
        return (f'{100 * self.done_bytes / self.total_bytes:3.0f}% {self.done_units}/{self.units} tars and chunks, '
                f'{self.images:,} images, {size_text(self.done_bytes)} of {size_text(self.total_bytes)} read, '
                f'{rate / 1e6:.0f} MB/s, {clock(now - self.start)} elapsed, ETA {clock(eta)}')

    def show(self, now: float):
        end = '\n' if (not self.redraw) or (self.done_units == self.units) else ''
        self.stream.write(('\r\033[K' if self.redraw else '') + self.line(now) + end)
        self.stream.flush()


def size_text(size: int) -> str:
    return f'{size / 1e9:.1f} GB' if size >= 1e9 else f'{size / 1e6:.1f} MB'


def clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f'{minutes // 60}:{minutes % 60:02d}:{seconds:02d}'


# the state of OUT: settings and sources of earlier runs, units done

@contextlib.contextmanager
def locked(out: Path):
    """Hold OUT while writing: two runs writing the same .part files would spoil each other."""
    try:
        (out / STATE).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f'cannot create {out}: {e.strerror}') from None
    fd = os.open(out / STATE / 'lock', os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f'another prepare_imagenet.py is writing {out}') from None
        yield
    finally:
        os.close(fd)


def checked_state(out: Path, settings: Settings, sources: dict) -> dict:
    """OUT's record of earlier runs, with this run's tars added; refuses other settings or tars than those of its
    earlier work, and folders this tool did not write."""
    if out.exists() and not out.is_dir():
        raise UserError(f'--out {out} is a file, not a folder')
    state_file = out / STATE / 'state.json'
    state = json.loads(state_file.read_text()) if state_file.exists() else dict(settings=asdict(settings), sources={})
    if state['settings'] != asdict(settings):
        raise UserError(f"{out} was written {Settings(**state['settings']).described}, this run would write "
                        f'{settings.described}: use the same settings to continue it, or another --out')
    for split, source in sources.items():
        old = state['sources'].get(split)
        if old and (old != source):
            raise UserError(f'{out / split} was written from {describe(old)}, not {describe(source)}; '
                            'choose another --out')
        if (not old) and (out / split).is_dir() and any((out / split).iterdir()):
            raise UserError(f'{out / split} exists and was not written by this tool; choose another --out')
    if (out / 'manifest.json').exists() and not state_file.exists():
        raise UserError(f'{out / "manifest.json"} was not written by this tool; choose another --out')
    return dict(state, sources={**state['sources'], **sources})


def describe(source: dict) -> str:
    labels = f" with labels {source['labels']} (sha256 {source['labels_sha256'][:12]})" if 'labels' in source else ''
    return f"{source['tar']} ({source['bytes']:,} bytes){labels}"


def source_of(tar: Path, units: list, labels: Optional[Path] = None) -> dict:
    source = dict(tar=tar.name, bytes=tar.stat().st_size, units=len(units))
    if labels:
        source.update(labels=labels.name, labels_sha256=hashlib.sha256(labels.read_bytes()).hexdigest())
    return source


def read_records(out: Path, split: str) -> list:
    folder = out / STATE / split
    return [json.loads(path.read_text()) for path in sorted(folder.glob('*.json'))] if folder.is_dir() else []


# verification and the manifest

def tree_files(folder: Path) -> dict:
    """{path relative to folder: size} of every file under it."""
    files, prefix = {}, len(str(folder)) + 1
    for directory, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(directory, name)  # strings, not Paths: a full train split is 1.3M files
            files[path[prefix:].replace(os.sep, '/')] = os.stat(path).st_size
    return files


def listing_sha256(files: dict) -> str:
    """sha256 of the sorted '<relative path>\\t<size>\\n' lines: `find ... -printf '%p\\t%s\\n' | LC_ALL=C sort`."""
    digest = hashlib.sha256()
    for line in sorted(f'{path}\t{size}\n' for path, size in files.items()):
        digest.update(line.encode())
    return digest.hexdigest()


def verify_split(out: Path, split: str, expected_units: int, records: list, tree: dict) -> list:
    """Problems (one line each) of a split: units not done, files missing or of another size than written.

    The records of units with missing files are removed, so that the next run writes those units again.
    """
    problems = []
    if len(records) < expected_units:
        problems.append(f'{split}: {expected_units - len(records)} of {expected_units} tars or chunks were not written')
    damaged = [r for r in records if any(tree.get(path) != size for path, size in r['files'])]
    for record in damaged:
        wrong = [path for path, size in record['files'] if tree.get(path) != size]
        problems.append(f'{split}: {len(wrong)} files missing or changed, e.g. {split}/{wrong[0]}')
        record_path(out, split, record['key']).unlink()
    return problems


def split_summary(split: str, tree: dict, records: list, source: dict) -> dict:
    per_class = {}
    for path in tree:
        synset = path.split('/')[0]
        per_class[synset] = per_class.get(synset, 0) + 1
    return dict(images=len(tree), classes=len(per_class),
                images_per_class=dict(min=min(per_class.values(), default=0), max=max(per_class.values(), default=0)),
                bytes=sum(tree.values()), sha256=listing_sha256({f'{split}/{p}': s for p, s in tree.items()}),
                source=source, bad_files=[bad for r in records for bad in r['bad']],
                unusual_files=[unusual for r in records for unusual in r['unusual']])


def is_full(splits: dict) -> bool:
    return all((s in splits) and (splits[s]['images'] == n) and (splits[s]['classes'] == FULL_CLASSES)
               for s, n in FULL_IMAGES.items())


def verdict(splits: dict) -> str:
    """One line: the full ImageNet-1k, or which part of it."""
    if is_full(splits):
        return (f'full ImageNet-1k: {FULL_IMAGES["train"]:,} train and {FULL_IMAGES["val"]:,} val images '
                f'in {FULL_CLASSES:,} classes')
    parts = [f"{s} {splits[s]['images']:,} of {n:,} images in {splits[s]['classes']:,} of {FULL_CLASSES:,} classes"
             if s in splits else f'no {s}' for s, n in FULL_IMAGES.items()]
    return f'subset of ImageNet-1k: {"; ".join(parts)}'


def tool_version() -> str:
    """The git commit of this checkout, with '+modified' when this file differs from it; 'unknown' without git."""
    try:
        commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, capture_output=True, text=True, timeout=10,
                                check=True).stdout.strip()
        changed = subprocess.run(['git', 'status', '--porcelain', '--', __file__], cwd=REPO, capture_output=True,
                                 text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return 'unknown'
    return commit + ('+modified' if changed else '')


def build_manifest(splits: dict, trees: dict, settings: Settings) -> dict:
    every_file = {f'{split}/{path}': size for split, tree in trees.items() for path, size in tree.items()}
    return dict(format=MANIFEST_FORMAT, tool='tools/prepare_imagenet.py', tool_version=tool_version(),
                created=datetime.now(timezone.utc).isoformat(timespec='seconds'), settings=asdict(settings),
                imagenet='full' if is_full(splits) else 'subset',
                images=sum(s['images'] for s in splits.values()), bytes=sum(s['bytes'] for s in splits.values()),
                sha256=listing_sha256(every_file), splits=splits)


def report(out: Path, splits: dict, settings: Settings):
    for split, summary in splits.items():
        counts = summary['images_per_class']
        print(f"{split}: {summary['images']:,} images in {summary['classes']:,} classes "
              f"({counts['min']:,}-{counts['max']:,} per class), {size_text(summary['bytes'])}")
    bad = [b for s in splits.values() for b in s['bad_files']]
    unusual = [u for s in splits.values() for u in s['unusual_files']]
    if bad:
        print(f'{len(bad)} bad images, written as they are in the tar:')
        for b in bad[:SHOWN_FILES]:
            print(f"  {b['source']}: {b['problem']}")
    if unusual:
        action = 'converted to RGB JPEG' if settings.reencode else 'copied as they are'
        print(f'{len(unusual)} images are not RGB or grayscale JPEGs ({action}):')
        for u in unusual[:SHOWN_FILES]:
            print(f"  {u['source']}: {u['content']}")
    if len(bad) > SHOWN_FILES or len(unusual) > SHOWN_FILES:
        print(f'  ... all are listed in {out / "manifest.json"}')


# the command

def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--train-tar', type=Path, help='ILSVRC2012_img_train.tar (one tar per class)')
    parser.add_argument('--val-tar', type=Path, help='ILSVRC2012_img_val.tar (50,000 images)')
    parser.add_argument('--val-labels', type=Path, help='LOC_val_solution.csv, or a list of synsets in file order')
    parser.add_argument('--out', type=Path, required=True, help='the data root: train/ and val/ are written in it')
    parser.add_argument('--max-side', type=int, help='re-encode, the longer side at most this many pixels')
    parser.add_argument('--quality', type=int, help=f're-encode at this JPEG quality (default {DEFAULT_QUALITY} when '
                                                    're-encoding)')
    parser.add_argument('-j', '--jobs', type=int, default=os.cpu_count() or 1, help='processes (default: one per CPU)')
    return parser.parse_args(argv)


def settings_of(args: argparse.Namespace) -> Settings:
    if not (args.train_tar or args.val_tar):
        raise UserError('nothing to do: give --train-tar, --val-tar or both')
    if bool(args.val_tar) != bool(args.val_labels):
        raise UserError('--val-tar needs --val-labels' if args.val_tar else '--val-labels needs --val-tar')
    if (args.max_side is not None) and (args.max_side < 1):
        raise UserError(f'--max-side must be a positive number of pixels, got {args.max_side}')
    if (args.quality is not None) and not (1 <= args.quality <= 100):
        raise UserError(f'--quality must be from 1 to 100, got {args.quality}')
    if args.jobs < 1:
        raise UserError(f'-j must be at least 1, got {args.jobs}')
    quality = args.quality if (args.quality is not None) else (DEFAULT_QUALITY if args.max_side else None)
    return Settings(args.max_side, quality)


def prepare(args: argparse.Namespace) -> int:
    started = time.monotonic()
    settings = settings_of(args)
    units, sources = [], {}
    if args.train_tar:
        class_tars = train_units(args.train_tar)
        units += class_tars
        sources['train'] = source_of(args.train_tar, class_tars)
    if args.val_tar:
        chunks = val_units(args.val_tar, args.val_labels)
        if args.train_tar:
            check_val_classes(args.train_tar, class_tars, args.val_labels, chunks)
        units += chunks
        sources['val'] = source_of(args.val_tar, chunks, args.val_labels)
    out = args.out
    state = checked_state(out, settings, sources)
    with locked(out):
        write_json(out / STATE / 'state.json', state, indent=1)
        return write_and_verify(out, units, state, settings, args.jobs, started)


def write_and_verify(out: Path, units: list, state: dict, settings: Settings, jobs: int, started: float) -> int:
    todo = [u for u in units if not record_path(out, u.split, u.key).exists()]
    print(f'writing {len(todo)} of {len(units)} tars and chunks ({size_text(sum(u.size for u in todo))}) into '
          f'{out} with {min(jobs, max(len(todo), 1))} processes, {settings.described}', flush=True)
    if todo:
        run_units(todo, out, settings, jobs, Progress(len(todo), sum(u.size for u in todo)))

    splits, trees, problems = {}, {}, []
    for split, source in sorted(state['sources'].items(), key=lambda item: list(FULL_IMAGES).index(item[0])):
        records, trees[split] = read_records(out, split), tree_files(out / split)
        problems += verify_split(out, split, source['units'], records, trees[split])
        splits[split] = split_summary(split, trees[split], records, source)
    if problems:
        for problem in problems:
            print(f'prepare_imagenet.py: verification failed: {problem}', file=sys.stderr)
        print('prepare_imagenet.py: run the same command again to write what is missing', file=sys.stderr)
        return 1
    manifest = build_manifest(splits, trees, settings)
    write_json(out / 'manifest.json', manifest, indent=1)
    report(out, splits, settings)
    classes = {split: {path.split('/')[0] for path in tree} for split, tree in trees.items()}
    if len(classes) == 2 and (classes['train'] != classes['val']):
        print(f"warning: {len(classes['val'] - classes['train'])} val classes are not in train and "
              f"{len(classes['train'] - classes['val'])} train classes not in val: train.py needs the same in both")
    print(f'verified: every image of the tars is in {out}, as written; took {clock(time.monotonic() - started)}')
    print(f"manifest: {out / 'manifest.json'} (sha256 {manifest['sha256'][:16]}...)")
    print(verdict(splits))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        with interruptible():
            return prepare(args)
    except UserError as e:
        print(f'prepare_imagenet.py: error: {e}', file=sys.stderr)
        return 2
    except Interrupted as e:
        end_progress_line = '\n' if sys.stderr.isatty() else ''
        print(f'{end_progress_line}prepare_imagenet.py: interrupted by {e}: the tars and chunks finished are kept; run '
              'the same command again to continue', file=sys.stderr)
        return 128 + e.signum  # the code a shell gives a process that the signal ended
    except OSError as e:  # a full disk, a tar that went away: what was done is kept
        print(f'prepare_imagenet.py: error: {e}; run the same command again to continue', file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
