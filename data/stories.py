"""Where TinyStories comes from: finding and reading the local copy of the stories.

A local copy is a folder with `train/*.txt` and `valid.txt`, stories separated by
a line that holds exactly `<|endoftext|>` (the hub's story text, as shards).

Both `data.tokenizer` (its command line trains on the stories) and
`data.tinystories` (the data module) read stories through this module, which
imports neither of them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

EOS_TOKEN = "<|endoftext|>"  # ends every story in the shards; also the tokenizer's end-of-text token
DATA_DIR_ENV = "LMREP_DATA_DIR"
SPLITS = ("train", "validation")
_STORY_SEPARATOR = re.compile(r"^" + re.escape(EOS_TOKEN) + r"$", flags=re.MULTILINE)

Split = Literal["train", "validation"]


def default_data_dir() -> Path:
    """The local TinyStories folder: $LMREP_DATA_DIR, else ../shared/data/tinystories beside the checkout."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories"


def split_files(data_dir: Path, split: str) -> list[Path]:
    """The text files that hold one split of a local folder (may be empty)."""
    if split == "train":
        return sorted((data_dir / "train").glob("*.txt"))
    if split == "validation":
        valid = data_dir / "valid.txt"
        return [valid] if valid.is_file() else []
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def read_local_stories(data_dir: Path, split: Split) -> list[str]:
    """The stories of one split of a local folder, stripped, in file order."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"TinyStories folder {data_dir} does not exist")
    stories: list[str] = []
    for path in split_files(data_dir, split):
        text = path.read_text(encoding="utf-8")
        stories.extend(s.strip() for s in _STORY_SEPARATOR.split(text))
    stories = [s for s in stories if s]
    if not stories:
        where = data_dir / "train" if split == "train" else data_dir / "valid.txt"
        raise ValueError(f"no {split} stories in {where} (expected stories separated by {EOS_TOKEN} lines)")
    return stories
