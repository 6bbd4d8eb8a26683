"""Reads the records of a W&B run file (run-<id>.wandb), as the tests check what W&B wrote.

The file is W&B's header (':W&B', magic 0xBEE1, version 0) followed by LevelDB's log format: 32 KiB blocks of
chunks, each with a 7-byte header (CRC-32 of type and data, little-endian length, type: 1 full, 2 first, 3 middle,
4 last); a record is the data of one full chunk or of a first..last sequence, and holds one
wandb_internal_pb2.Record.
"""
import json
import struct
import time
import zlib
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    data = Path(path).read_bytes()
    assert data[:4] == b':W&B' and struct.unpack('<HB', data[4:7]) == (0xBEE1, 0), 'not a W&B run file'
    result, pending, pos = [], b'', 7
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # a block's tail too short for a header is padding
            pos += room
            continue
        checksum, length, kind = struct.unpack('<IHB', data[pos:pos + HEADER])
        if kind == 0:  # zero padding up to the end of the block
            pos += room
            continue
        chunk = data[pos + HEADER:pos + HEADER + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == checksum, f'bad checksum at byte {pos}'
        pos += HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            result.append(record)
    return result


def _items(items) -> dict:
    return {item.key or '/'.join(item.nested_key): json.loads(item.value_json) for item in items}


def complete_records(path: Path, seconds: float = 30) -> list:
    """The records of a run file, once they hold the run record: W&B's service process may still be writing the file
    when wandb.finish() has returned (seen with two test processes at once)."""
    deadline = time.monotonic() + seconds
    while True:
        found = records(path)
        if any(r.WhichOneof('record_type') == 'run' for r in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def read_run(path: Path) -> dict:
    """The run record (id, name, group, tags, config), its history rows and its summary updates."""
    run, history, summary = None, [], {}
    for record in complete_records(path):
        kind = record.WhichOneof('record_type')
        if kind == 'run':
            run = record.run
        elif kind == 'history':
            history.append(_items(record.history.item))
        elif kind == 'summary':
            summary.update({k: v for k, v in _items(record.summary.update).items() if k})
    config = _items(run.config.update)
    return dict(id=run.run_id, name=run.display_name, group=run.run_group, tags=list(run.tags), config=config,
                history=history, summary=summary)


def artifacts(path: Path) -> list:
    """The artifacts a run logged: name, type, aliases, metadata and {path: (digest, staged local copy)} of its files.

    Offline, W&B writes the manifest into the run file and keeps each file's copy in its staging area for `wandb sync`.
    """
    logged = []
    for record in complete_records(path):
        if record.WhichOneof('record_type') == 'artifact':
            a = record.artifact
            manifest = a.manifest
            if manifest.manifest_file_path:  # large manifests are written to a file beside the record
                files = json.loads(Path(manifest.manifest_file_path).read_text())['contents']
                contents = {k: (v['digest'], v.get('local_path')) for k, v in files.items()}
            else:
                contents = {e.path: (e.digest, e.local_path) for e in manifest.contents}
            metadata = json.loads(a.metadata) if a.metadata else {}  # a table's artifact has none
            logged.append(dict(name=a.name, type=a.type, aliases=list(a.aliases), metadata=metadata, files=contents))
    return logged
