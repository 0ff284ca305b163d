"""Reading back what an offline W&B run logged (offline runs write no summary JSON).

The .wandb file of an offline run is a LevelDB-style log of protobuf Records:
a 7-byte file header, then 32 KiB blocks of chunks, each with a 7-byte header
(crc32, length, type); the records are parsed with wandb's own protobuf types.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_WANDB_HEADER = struct.Struct("<4sHB")
_CHUNK_HEADER = struct.Struct("<IHB")
_BLOCK_SIZE = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_wandb_records(path: str | Path) -> Iterator[Any]:
    """Yield the protobuf `Record`s of a `.wandb` run file, in the order they were written."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    magic, _, _ = _WANDB_HEADER.unpack_from(data, 0)
    if magic != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, pending = _WANDB_HEADER.size, b""
    while pos + _CHUNK_HEADER.size <= len(data):
        left_in_block = _BLOCK_SIZE - pos % _BLOCK_SIZE
        if left_in_block < _CHUNK_HEADER.size:  # block trailer padding
            pos += left_in_block
            continue
        _, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero padding at the end of a file being written
            break
        chunk = data[pos + _CHUNK_HEADER.size: pos + _CHUNK_HEADER.size + length]
        pos += _CHUNK_HEADER.size + length
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def read_offline_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every history row (`wandb.log` call) of all offline W&B runs under `run_dir`, in order."""
    rows = []
    for path in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")):
        for record in iter_wandb_records(path):
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows
