"""The one atomic writer: whole files or none, and the permissions the umask gives (not mkstemp's 0600)."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from benchmarks.common import write_json
from data.files import atomic_directory, atomic_write, write_text_atomic
from lmrep.checkpoints import SafeCheckpointIO, atomic_torch_save
from lmrep.report import write_summary
from lmrep.runs import write_results
from models import build_model, export_hf

TINY_LLAMA = {"vocab_size": 64, "d_model": 16, "n_blocks": 1, "n_heads": 2, "context_length": 8}


@pytest.fixture(params=[(0o022, 0o644), (0o002, 0o664)], ids=["umask022", "umask002"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """Run the test under a umask; yields the mode a new file must get under it."""
    mask, expected = request.param
    old = os.umask(mask)
    try:
        yield expected
    finally:
        os.umask(old)


def modes(folder: Path) -> dict[str, str]:
    """Every file below folder -> its permission bits in octal."""
    return {str(p.relative_to(folder)): oct(stat.S_IMODE(p.stat().st_mode)) for p in folder.rglob("*") if p.is_file()}


def test_every_writer_gives_the_umask_permissions(tmp_path: Path, umask: int) -> None:
    write_text_atomic(tmp_path / "text.txt", "hello\n")
    atomic_torch_save({"w": torch.ones(2)}, tmp_path / "plain.pt")
    SafeCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}}, tmp_path / "ckpt" / "step=000000.ckpt")
    write_results(tmp_path / "probe", [{"step": 0, "block": 1}])
    write_summary(tmp_path / "probe", [{"step": 0, "block": 1, "mask": 0, "context": "prompt", "n_prompts": 1}])
    write_json(tmp_path / "bench.json", {"x": 1})
    torch.manual_seed(0)
    export_hf(build_model("llama", TINY_LLAMA), None, tmp_path / "exported")
    found = modes(tmp_path)
    for name in ("text.txt", "plain.pt", "ckpt/step=000000.ckpt", "probe/results.jsonl", "probe/summary.csv",
                 "probe/summary.json", "bench.json", "exported/config.json", "exported/model.safetensors"):
        assert name in found, sorted(found)
    assert found == {name: oct(umask) for name in found}


def test_overwriting_keeps_the_umask_not_the_old_mode(tmp_path: Path, umask: int) -> None:
    target = tmp_path / "results.jsonl"
    target.write_text("old\n")
    target.chmod(0o600)
    write_text_atomic(target, "new\n")
    assert target.read_text() == "new\n"
    assert oct(stat.S_IMODE(target.stat().st_mode)) == oct(umask)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "summary.json"
    write_text_atomic(target, json.dumps({"old": 1}))
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(target) as f:
            f.write('{"new": ')
            raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(tmp_path / "new.bin", "wb") as f:
            f.write(b"half")
            raise RuntimeError("disk full")
    assert json.loads(target.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_text_is_utf8_and_bytes_are_bytes(tmp_path: Path) -> None:
    write_text_atomic(tmp_path / "a.txt", "émoji 🐱\n")
    assert (tmp_path / "a.txt").read_bytes() == "émoji 🐱\n".encode("utf-8")
    with atomic_write(tmp_path / "b.bin", "wb") as f:
        f.write(b"\x00\xff")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff"
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"):
        with atomic_write(tmp_path / "c.txt", "a"):  # type: ignore[arg-type]
            pass


def test_atomic_directory_appears_whole_or_not_at_all(tmp_path: Path, umask: int) -> None:
    target = tmp_path / "cache" / "train-L32"
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_directory(target) as tmp:
            tmp.mkdir()
            (tmp / "part.arrow").write_bytes(b"half")
            raise RuntimeError("killed")
    assert list((tmp_path / "cache").iterdir()) == []
    with atomic_directory(target) as tmp:
        tmp.mkdir()
        (tmp / "data.arrow").write_bytes(b"whole")
    assert (target / "data.arrow").read_bytes() == b"whole"
    assert oct(stat.S_IMODE((target / "data.arrow").stat().st_mode)) == oct(umask)
    with atomic_directory(target) as tmp:  # another process got there first: its identical copy stays
        tmp.mkdir()
        (tmp / "data.arrow").write_bytes(b"twin")
    assert (target / "data.arrow").read_bytes() == b"whole"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["train-L32"]
