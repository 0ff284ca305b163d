"""Where TinyStories comes from: a local copy, or the Hugging Face hub, and which one a run uses.

Three sources:
- `local`: a folder with `train/*.txt` and `valid.txt`, stories separated by a
  line that holds exactly `<|endoftext|>` (the hub's story text, as shards);
- `hub`: `roneneldan/TinyStories`, streamed: a run takes only the first N
  stories of each split (a few thousand, not the hub's 2.1M), cached on disk;
- `auto` (the default): the local folder when one is found (the given folder,
  $LMREP_DATA_DIR, or ../shared/data/tinystories beside the checkout), else the hub.

Both `data.tokenizer` (its command line trains on the stories) and
`data.tinystories` (the data module) read stories through this module, which
imports neither of them.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from pathlib import Path
from typing import Literal

from data.files import write_text_atomic

EOS_TOKEN = "<|endoftext|>"  # ends every story in the shards; also the tokenizer's end-of-text token
DATA_DIR_ENV = "LMREP_DATA_DIR"
SHARED_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories"  # beside the checkout
HUB_DATASET = "roneneldan/TinyStories"
SOURCES = ("auto", "local", "hub")
SPLITS = ("train", "validation")
# Stories a hub run takes per split unless told otherwise: about the size of the shared local copy
# (7,428 train / 1,035 validation stories), enough for the configs' 2000 steps at ~3 epochs.
HUB_STORIES = {"train": 8_000, "validation": 1_000}
DEFAULT_CACHE_DIR = ".cache/lmrep"
_STORY_SEPARATOR = re.compile(r"^" + re.escape(EOS_TOKEN) + r"$", flags=re.MULTILINE)

Split = Literal["train", "validation"]


def default_data_dir() -> Path:
    """The local TinyStories folder: $LMREP_DATA_DIR, else ../shared/data/tinystories beside the checkout."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else SHARED_DATA_DIR


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


class DataSourceError(ValueError):
    """No stories can be had from the configured source (a missing folder, an unreachable hub)."""


def _ways_out() -> str:
    return (f"set ${DATA_DIR_ENV} or --data.data_dir to a local TinyStories copy (train/*.txt, valid.txt; "
            f"data source auto or local), or go online for the hub ({HUB_DATASET})")


def resolve_source(source: str, data_dir: str | Path | None) -> tuple[Literal["local", "hub"], Path | None]:
    """("local", folder) or ("hub", None): what `source` (auto, local or hub) means on this machine.

    A folder that is asked for (`data_dir`, or $LMREP_DATA_DIR) must exist, also under
    auto: a typo is an error, not a silent switch to the hub. Only the default
    ../shared copy may be absent, and then auto takes the hub.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; expected one of {SOURCES}")
    if source == "hub":
        return "hub", None
    folder = Path(data_dir) if data_dir is not None else default_data_dir()
    asked = data_dir is not None or bool(os.environ.get(DATA_DIR_ENV))
    if folder.is_dir():
        return "local", folder
    if source == "local" or asked:
        raise DataSourceError(f"TinyStories folder {folder} does not exist: {_ways_out()}")
    return "hub", None


def describe_source(requested: str, source: str, folder: Path | None, counts: dict[str, int | None]) -> str:
    """One line saying where a run's stories come from (`requested` is the configured source, `source` the resolved)."""
    if source == "local":
        return f"data: the local TinyStories folder {folder}"
    takes = " and ".join(f"{n} {split}" for split, n in counts.items() if n)
    why = f" (no local copy found; set ${DATA_DIR_ENV} to use one)" if requested == "auto" else ""
    return f"data: {HUB_DATASET} from the Hugging Face hub, the first {takes} stories{why}"


@functools.cache
def announce(line: str) -> None:
    """Print a line to stderr once per process, from global rank 0 only (every rank chooses alike)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only  # set from RANK/LOCAL_RANK/SLURM_PROCID

    if getattr(rank_zero_only, "rank", 0) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0:
        print(line, file=sys.stderr)


def _hub_cache(cache_dir: Path, split: str, n: int) -> Path:
    return Path(cache_dir) / "hub-stories" / f"{split}-{n}.json"


def _cached_hub_stories(cache_dir: Path, split: str, n: int) -> list[str] | None:
    """The first n stories of a split from the smallest cached take that holds them, if any."""
    takes = []
    for path in (Path(cache_dir) / "hub-stories").glob(f"{split}-*.json"):
        count = path.stem.rpartition("-")[2]
        if count.isdigit() and int(count) >= n:
            takes.append((int(count), path))
    if not takes:
        return None
    return json.loads(min(takes)[1].read_text(encoding="utf-8"))[:n]


def hub_stories(split: Split, n: int, cache_dir: str | Path = DEFAULT_CACHE_DIR) -> list[str]:
    """The first n stories of a hub split, streamed (only those n are fetched) and cached under cache_dir.

    Offline, or with the hub out of reach, it raises DataSourceError with one line
    naming both ways out instead of the hub client's traceback.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if n < 1:
        raise ValueError(f"the number of hub stories must be >= 1, got {n}")
    cached = _cached_hub_stories(Path(cache_dir), split, n)
    if cached is not None:
        return cached
    import datasets  # here: reading a local copy needs no `datasets`
    from tqdm.auto import tqdm

    try:
        stream = datasets.load_dataset(HUB_DATASET, split=split, streaming=True).take(n)
        rows = tqdm(stream, total=n, desc=f"streaming {split} stories from {HUB_DATASET}", unit=" stories")
        stories = [text for text in (row["text"].strip() for row in rows) if text]
    except OSError as err:  # ConnectionError, the hub client's HTTP and offline errors are all OSErrors
        reason = " ".join(str(err).split()) or type(err).__name__
        raise DataSourceError(f"cannot get {HUB_DATASET} from the Hugging Face hub ({reason}): {_ways_out()}") from None
    if not stories:
        raise DataSourceError(f"{HUB_DATASET} gave no {split} stories")
    write_text_atomic(_hub_cache(Path(cache_dir), split, n), json.dumps(stories))
    return stories


def validation_stories(source: str, data_dir: str | Path | None, n: int, *,
                       cache_dir: str | Path = DEFAULT_CACHE_DIR) -> list[str]:
    """The first n validation stories: the one source of default prompts (probe.py, ProbeCallback, benchmarks)."""
    return first_stories(source, data_dir, "validation", n, cache_dir=cache_dir)


def first_stories(source: str, data_dir: str | Path | None, split: Split, n: int | None = None, *,
                  cache_dir: str | Path = DEFAULT_CACHE_DIR) -> list[str]:
    """The first n stories of a split (None: all of a local folder, HUB_STORIES[split] of the hub)."""
    if n is not None and n < 1:
        raise ValueError(f"the number of stories must be >= 1, got {n}")
    resolved, folder = resolve_source(source, data_dir)
    if resolved == "local":
        assert folder is not None
        return read_local_stories(folder, split)[:n]
    return hub_stories(split, n if n is not None else HUB_STORIES[split], cache_dir)
