"""Writing files so that a reader (or a crash) never sees half of one, with the usual permissions.

Every file lmrep writes (results, summaries, the report, tokenizers, checkpoints,
benchmark JSON) goes through `atomic_write`: the bytes go to a temporary file
beside the target, are flushed to disk, and a rename gives them the target's
name, so the name holds either the old file or the whole new one. The temporary
file is created the way `open()` creates one (mode 0666 less the process umask:
0644 under umask 022, 0664 under 002), not with `tempfile.mkstemp`'s fixed 0600,
which would hide outputs from collaborators on a shared machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Literal

NEW_FILE_MODE = 0o666  # what open() asks for; the kernel takes the umask away from it
_NAME_TRIES = 100  # random temporary names tried before giving up (a clash is a 1 in 2**32 event)


def _temp_beside(path: Path) -> tuple[int, Path]:
    """Create a new, empty temporary file in path's folder: (its descriptor, its path)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(_NAME_TRIES):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, NEW_FILE_MODE), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {path}")


@contextmanager
def atomic_write(path: str | Path, mode: Literal["w", "wb"] = "w") -> Iterator[IO[Any]]:
    """A file object whose contents replace `path` in one rename when the block ends without an error.

    `mode` is "w" (UTF-8 text) or "wb" (bytes). On an error, or a kill, `path` keeps its
    old contents (or stays absent) and the temporary file is removed (or, after a kill,
    left as a dot-file that never carries the target's name).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write text (UTF-8) to path atomically: the old file or the whole new one."""
    with atomic_write(path, "w") as f:
        f.write(text)


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """A temporary folder beside `path` to fill; renamed to `path` when the block ends without an error.

    For caches whose content is decided by their name: if another process renamed its
    (identical) folder into place first, this one's copy is dropped. On an error the
    temporary folder is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not path.is_dir():  # not the lost race for an identical cache: a real failure
            raise


@contextmanager
def staged_files(out_dir: str | Path) -> Iterator[Path]:
    """A private folder for a library that writes files its own way; on success each is moved into out_dir.

    `save_pretrained` (safetensors) creates its files 0600; staging them here and
    writing each through `atomic_write` gives them the umask's permissions, and a
    failed export leaves out_dir's old files as they were.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=".staging-"))
    try:
        yield staging
        for src in sorted(p for p in staging.rglob("*") if p.is_file()):
            with src.open("rb") as f_in, atomic_write(out_dir / src.relative_to(staging), "wb") as f_out:
                shutil.copyfileobj(f_in, f_out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
