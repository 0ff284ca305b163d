"""A WandbLogger that goes offline without credentials and continues its run on resume.

Under DDP every process builds the logger, but only global rank 0 creates the W&B
run and owns the run id file (other ranks log nothing: WandbLogger's experiment is
a dummy there), so a multi-process run is one W&B run.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

RUN_ID_FILE = "wandb_run_id.txt"  # kept beside the run so a resumed run logs into the same W&B run


def has_wandb_credentials() -> bool:
    """True when W&B could log online: an API key in the environment or a netrc entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def is_global_rank_zero() -> bool:
    """True in the process that will be global rank 0, also before the process group exists.

    Lightning sets `rank_zero_only.rank` at import from RANK, LOCAL_RANK or SLURM_PROCID;
    LOCAL_RANK alone is 0 on every node, so a NODE_RANK other than 0 rules a process out.
    """
    return rank_zero_only.rank == 0 and int(os.environ.get("NODE_RANK", "0")) == 0


def persistent_run_id(save_dir: str | Path) -> str:
    """The W&B run id of the run in `save_dir`, created on first use."""
    path = Path(save_dir) / RUN_ID_FILE
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id + "\n")
    return run_id


class RunLogger(WandbLogger):
    """W&B logging for an lmrep run: offline when no credentials, one W&B run per run directory."""

    def __init__(
        self,
        *,
        save_dir: str = "runs/default",
        project: str = "lmrep",
        name: str | None = None,
        offline: bool | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            save_dir: the run directory; W&B files and the run id live here.
            project: W&B project.
            name: W&B run name (default: the run directory's name).
            offline: force offline/online; None = offline unless W&B credentials are present.
            kwargs: passed on to WandbLogger.
        """
        if offline is None:
            offline = not has_wandb_credentials() or os.environ.get("WANDB_MODE") == "offline"
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        if is_global_rank_zero():  # the other ranks never start a W&B run, so they need no id
            kwargs.setdefault("id", persistent_run_id(save_dir))
        kwargs.setdefault("resume", "allow")
        super().__init__(save_dir=save_dir, project=project, name=name or Path(save_dir).name, offline=offline, **kwargs)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        # Close the W&B run, so a later run in the same process (a resume, a test) starts its own.
        if self._experiment is not None:
            self._experiment.finish(exit_code=0 if status == "success" else 1)
            self._experiment = None
            finish_writing()


def finish_writing() -> None:
    """Wait until W&B has written everything to disk.

    `run.finish()` can return before the W&B service has flushed an offline run's
    file (seen here: 1 run in 8 read back empty right after finish); shutting the
    service down waits for it. A later `wandb.init` starts a new service.
    """
    import wandb

    wandb.teardown()


# The .wandb file of an offline run is a LevelDB-style log of protobuf Records:
# a 7-byte file header, then 32 KiB blocks of chunks, each with a 7-byte header
# (crc32, length, type). Offline runs write no summary JSON, so this is how a
# test or a script reads back what was logged.
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
