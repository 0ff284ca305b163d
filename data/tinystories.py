"""TinyStories as a LightningDataModule: hub or local shards -> tokenized, cached Arrow.

The stories come from `data.stories`: `source: auto` (the default) takes the
local folder when one is found, else streams the first few thousand stories of
`roneneldan/TinyStories` from the hub; `local` and `hub` force one of them.

`prepare_data` trains (once) or loads the 4096-token tokenizer and writes each
split, tokenized to rows of a fixed context length L, as an Arrow dataset under
the cache folder, keyed by everything that decides its content; `setup` only
loads those. Batches are `{"input_ids", "labels"}` (b, L) LongTensors with
labels unshifted and -100 at padding, so padding never enters the loss.

The training loader is resumable: each epoch's order is a seeded permutation of
(seed, epoch), and its place in the epoch is saved in every checkpoint, so a
resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import torch
from torch import Tensor
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
from transformers import PreTrainedTokenizerFast

from data.files import atomic_directory
from data.stories import (
    DEFAULT_CACHE_DIR,
    HUB_DATASET,
    HUB_STORIES,
    SPLITS,
    Split,
    announce,
    describe_source,
    first_stories,
    resolve_source,
    split_files,
    validation_stories,
)
from data.tokenizer import (
    VOCAB_SIZE,
    get_or_train_tokenizer,
    load_tokenizer,
    tokenizer_hash,
)

# The hub tokenizer is trained on this many first training stories whatever a run takes, so that runs
# over more or fewer hub stories share one tokenizer (and their checkpoints stay comparable).
HUB_TOKENIZER_STORIES = HUB_STORIES["train"]
IGNORE_INDEX = -100  # label of padding positions, skipped by the loss (torch cross-entropy, HF convention)
# Bump when the tokenized layout changes, so old caches are not read as new ones.
CACHE_FORMAT = 1
_MAP_BATCH = 1000  # stories per datasets.map batch


def load_stories(source: str, data_dir: str | Path | None, split: Split, n: int | None = None, *,
                 cache_dir: str | Path = DEFAULT_CACHE_DIR) -> datasets.Dataset:
    """The first n stories of one split (None: see `data.stories.first_stories`) as a Dataset with a `text` column."""
    return datasets.Dataset.from_dict({"text": first_stories(source, data_dir, split, n, cache_dir=cache_dir)})


def _sha(obj: Any) -> str:
    """A short sha256 of a JSON-able object, for cache keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def data_fingerprint(source: str, data_dir: Path | None) -> str:
    """A key for the stories themselves: the hub name and tokenizer take, or a hash of the local files' contents."""
    if source == "hub":
        return _sha({"hub": HUB_DATASET, "tokenizer_stories": HUB_TOKENIZER_STORIES})
    if data_dir is None:
        raise ValueError("a local data fingerprint needs the folder")
    folder = Path(data_dir)
    digest = hashlib.sha256()
    for split in SPLITS:
        for path in split_files(folder, split):
            digest.update(f"{split}/{path.name}\0".encode())
            digest.update(path.read_bytes())  # a few MB: hashing is cheaper than trusting mtimes
    return digest.hexdigest()[:16]


class _Collate:
    """Stack rows into a batch and mask padding out of the labels (a class so workers can pickle it)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        input_ids = torch.stack([row["input_ids"] for row in rows]).long()  # (b, L)
        labels = input_ids.masked_fill(input_ids == self.pad_token_id, IGNORE_INDEX)  # (b, L)
        return {"input_ids": input_ids, "labels": labels}


def _world() -> tuple[int, int]:
    """(world size, rank) of the torch.distributed process group, or (1, 0) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class EpochSampler(DistributedSampler):
    """A seeded permutation per (seed, epoch), sharded by rank, that can start part-way into an epoch.

    It is a DistributedSampler (same order, same sharding), so Lightning never replaces
    it with one of its own under DDP: Lightning injects a sampler only when the loader's
    is not a DistributedSampler. Rank and world size come from `torch.distributed`
    when a process group exists (the loader is built after DDP starts one), so the
    sharding holds also with `use_distributed_sampler=False`. Lightning calls
    `set_epoch` before each epoch.
    """

    def __init__(self, dataset: Any, *, seed: int) -> None:
        world, rank = _world()
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.start = 0  # samples of this rank skipped at the start of the current iteration
        self.iter_epoch = 0  # the epoch the current iteration draws from
        self._resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, samples: int) -> None:
        """Make the next iteration, if it is of `epoch`, skip the first `samples` of this rank's share."""
        self._resume = (epoch, samples)

    def __iter__(self) -> Any:
        indices = list(super().__iter__())
        self.start, self.iter_epoch = 0, self.epoch
        if self._resume is not None:
            epoch, samples = self._resume
            if epoch == self.epoch:  # a checkpoint at an epoch's end resumes in the next epoch, from 0
                self.start = min(samples, len(indices))
            self._resume = None
        return iter(indices[self.start:])


class ResumableLoader(DataLoader):
    """Training DataLoader that Lightning checkpoints: `state_dict()` is its place in the epoch.

    Lightning saves `state_dict()` of a stateful train loader in every checkpoint and
    calls `load_state_dict()` on resume before it asks for an iterator. The state is the
    epoch and the samples of this rank handed out in it; the loader counts batches as
    it yields them. Lightning's fit loop does not fetch ahead for a loader with a length
    (`_PrefetchDataFetcher` skips prefetching when it knows the length), so a batch
    yielded is a batch trained on when a checkpoint is written.
    """

    def __init__(self, dataset: Any, *, batch_size: int, seed: int, collate_fn: Any, num_workers: int = 0) -> None:
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=EpochSampler(dataset, seed=seed),
            collate_fn=collate_fn,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            # only seeds worker processes; without it each iterator draws from torch's global RNG
            generator=torch.Generator().manual_seed(seed),
        )
        self._yielded = 0  # batches yielded by the current iteration

    def __iter__(self) -> Any:
        self._yielded = 0
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Where the current epoch stands: its number and the samples of this rank consumed in it."""
        sampler: EpochSampler = self.sampler  # type: ignore[assignment]
        samples = min(sampler.start + self._yielded * int(self.batch_size or 1), sampler.num_samples)
        return {"epoch": sampler.iter_epoch, "samples": samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue the saved epoch where it stopped (the next iteration skips what was consumed)."""
        self.sampler.resume_at(int(state["epoch"]), int(state["samples"]))  # type: ignore[attr-defined]


class TinyStoriesDataModule(L.LightningDataModule):
    """TinyStories tokenized to fixed-length rows, from the hub or a local folder.

    Args:
        source: "auto" (the local folder when one is found, else the hub), "local" (a folder of
            text shards) or "hub" (roneneldan/TinyStories, streamed).
        data_dir: the local folder; None means $LMREP_DATA_DIR or ../shared/data/tinystories.
        cache_dir: where the tokenizer and the tokenized datasets are cached.
        tokenizer_path: use this tokenizer.json instead of training one.
        context_length: tokens per row L (the training script fills it from the model config).
        batch_size: rows per batch.
        packing: False: one story per row, truncated or right-padded with PAD;
            True: stories joined with EOS and cut into full windows of L tokens.
        max_train_stories: use only the first this many training stories (None: all of a local
            folder; from the hub, the first 8,000 of its 2.1M, about the local copy's size).
        max_val_stories: use only the first this many validation stories (None: all of a local
            folder; from the hub, the first 1,000).
        num_workers: DataLoader worker processes.
        seed: seed of the training shuffle.
    """

    def __init__(
        self,
        *,
        source: str = "auto",
        data_dir: str | None = None,
        cache_dir: str = DEFAULT_CACHE_DIR,
        tokenizer_path: str | None = None,
        context_length: int | None = None,
        batch_size: int = 16,
        packing: bool = False,
        max_train_stories: int | None = None,
        max_val_stories: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if context_length is not None and context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for name, value in (("max_train_stories", max_train_stories), ("max_val_stories", max_val_stories)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        self.save_hyperparameters()
        self.source, self.data_dir = resolve_source(source, data_dir)  # "local" and its folder, or "hub" and None
        self.cache_dir = Path(cache_dir)
        self.tokenizer_path = Path(tokenizer_path) if tokenizer_path is not None else None
        self.context_length = context_length
        self.batch_size = batch_size
        self.packing = packing
        self.max_stories = {"train": max_train_stories, "validation": max_val_stories}
        if self.source == "hub":  # never the whole hub data set unless asked for by number
            self.max_stories = {split: n or HUB_STORIES[split] for split, n in self.max_stories.items()}
        announce(describe_source(source, self.source, self.data_dir, self.max_stories))
        self.num_workers = num_workers
        self.seed = seed
        self._tokenizer: PreTrainedTokenizerFast | None = None
        self._tokenizer_file: Path | None = None
        self._tokenizer_hash: str | None = None
        self._data_fingerprint: str | None = None
        self._datasets: dict[str, datasets.Dataset] = {}

    # ---- tokenizer -------------------------------------------------------------

    @property
    def data_fingerprint(self) -> str:
        """Key of the source stories (computed once per process)."""
        if self._data_fingerprint is None:
            self._data_fingerprint = data_fingerprint(self.source, self.data_dir)
        return self._data_fingerprint

    def _load_or_train_tokenizer(self) -> None:
        """Load the configured tokenizer, or the cached one, training it first if absent."""
        if self.tokenizer_path is not None:
            tok, path = load_tokenizer(self.tokenizer_path), self.tokenizer_path
        else:
            key = _sha({"data": self.data_fingerprint, "vocab": VOCAB_SIZE, "format": CACHE_FORMAT})

            def train_texts() -> list[str]:  # every local training story; the hub's first HUB_TOKENIZER_STORIES
                n = HUB_TOKENIZER_STORIES if self.source == "hub" else None
                return first_stories(self.source, self.data_dir, "train", n, cache_dir=self.cache_dir)

            tok, path = get_or_train_tokenizer(train_texts, self.cache_dir, key)
        self._tokenizer, self._tokenizer_file, self._tokenizer_hash = tok, path, tokenizer_hash(tok)

    @property
    def tokenizer(self) -> PreTrainedTokenizerFast:
        """The tokenizer (loaded, or trained and cached, on first use)."""
        if self._tokenizer is None:
            self._load_or_train_tokenizer()
        assert self._tokenizer is not None
        return self._tokenizer

    @property
    def tokenizer_hash(self) -> str:
        """Identity of the tokenizer, for checkpoints."""
        if self._tokenizer_hash is None:
            self._load_or_train_tokenizer()
        assert self._tokenizer_hash is not None
        return self._tokenizer_hash

    @property
    def tokenizer_file(self) -> Path:
        """Path of the tokenizer.json in use."""
        if self._tokenizer_file is None:
            self._load_or_train_tokenizer()
        assert self._tokenizer_file is not None
        return self._tokenizer_file

    @property
    def pad_token_id(self) -> int:
        """Id of the padding token."""
        return int(self.tokenizer.pad_token_id)

    @property
    def eos_token_id(self) -> int:
        """Id of the end-of-text token."""
        return int(self.tokenizer.eos_token_id)

    # ---- tokenized datasets ----------------------------------------------------

    def _require_context_length(self) -> int:
        if self.context_length is None:
            raise ValueError("context_length is not set: pass it, or let the training script fill it from the model")
        if self.context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {self.context_length}")
        return self.context_length

    def split_cache_path(self, split: str) -> Path:
        """Where the tokenized Arrow dataset of `split` is cached, keyed by all that decides its content."""
        key = _sha(
            {
                "format": CACHE_FORMAT,
                "source": self.source,
                "data": self.data_fingerprint,
                "tokenizer": self.tokenizer_hash,
                "split": split,
                "context_length": self._require_context_length(),
                "packing": self.packing,
                "max_stories": self.max_stories[split],
            }
        )
        mode = "packed" if self.packing else "padded"
        return self.cache_dir / "tokenized" / f"{split}-{mode}-L{self.context_length}-{key}"

    def _tokenize(self, stories: datasets.Dataset, split: str) -> datasets.Dataset:
        """Stories -> rows of exactly L token ids (each story ends with EOS)."""
        length = self._require_context_length()
        tok, eos, pad = self.tokenizer, self.eos_token_id, self.pad_token_id
        packing = self.packing

        def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
            ids = tok(batch["text"], add_special_tokens=False)["input_ids"]
            if packing:
                stream = [t for story in ids for t in (*story, eos)]
                n_windows = len(stream) // length  # the ragged tail of each map batch is dropped
                return {"input_ids": [stream[i * length : (i + 1) * length] for i in range(n_windows)]}
            rows = [(story + [eos])[:length] for story in ids]  # truncated stories keep no EOS
            return {"input_ids": [row + [pad] * (length - len(row)) for row in rows]}

        features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"), length=length)})
        return stories.map(
            encode,
            batched=True,
            batch_size=_MAP_BATCH,
            remove_columns=stories.column_names,
            features=features,
            desc=f"tokenizing {split}",
        )

    def prepare_data(self) -> None:
        """Train/load the tokenizer and write each tokenized split to the cache (disk work only)."""
        for split in SPLITS:
            path = self.split_cache_path(split)
            if path.is_dir():
                continue
            stories = load_stories(self.source, self.data_dir, split, self.max_stories[split],  # type: ignore[arg-type]
                                   cache_dir=self.cache_dir)
            rows = self._tokenize(stories, split)
            if len(rows) == 0:
                raise ValueError(
                    f"no {split} rows: {len(stories)} stories are too few for packed windows of {self.context_length} tokens"
                )
            with atomic_directory(path) as tmp:  # a killed run never leaves a half-written cache
                rows.save_to_disk(str(tmp))

    def setup(self, stage: str | None = None) -> None:
        """Load the cached tokenized splits (written by prepare_data) as torch tensors."""
        for split in SPLITS:
            path = self.split_cache_path(split)
            if not path.is_dir():
                raise RuntimeError(f"no tokenized {split} data at {path}: call prepare_data() first")
            ds = datasets.load_from_disk(str(path))
            ds.set_format("torch", columns=["input_ids"])
            self._datasets[split] = ds

    def _dataset(self, split: str) -> datasets.Dataset:
        if split not in self._datasets:
            raise RuntimeError(f"the {split} data is not loaded: call prepare_data() and setup() first")
        return self._datasets[split]

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches: a seeded order per epoch, resumable mid-epoch."""
        return ResumableLoader(
            self._dataset("train"),
            batch_size=self.batch_size,
            seed=self.seed,
            collate_fn=_Collate(self.pad_token_id),
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        """Validation batches in file order."""
        return DataLoader(
            self._dataset("validation"),  # type: ignore[arg-type]
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=_Collate(self.pad_token_id),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def validation_texts(self, n: int) -> list[str]:
        """The first n validation stories as raw text (default prompts for the probe)."""
        return validation_stories(self.source, self.data_dir, n, cache_dir=self.cache_dir)
