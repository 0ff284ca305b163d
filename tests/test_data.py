"""The TinyStories data module: reading shards, fixed-length rows, padding out of the loss, caching."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from data.stories import DATA_DIR_ENV, EOS_TOKEN, default_data_dir, read_local_stories
from data.tinystories import IGNORE_INDEX, TinyStoriesDataModule, load_stories
from data.tokenizer import VOCAB_SIZE, tokenizer_hash
from tests.corpus import local_stories_dir, write_synthetic_corpus

L = 160  # near the median story length (~190 tokens): truncated and padded rows are both common
N_TRAIN, N_VAL = 300, 40


@pytest.fixture(scope="module")
def real_dir() -> Path:
    return local_stories_dir()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the module, so the real tokenizer is trained once (~1 s)."""
    return tmp_path_factory.mktemp("lmrep-cache")


def make_dm(real_dir: Path, cache_dir: Path, **kwargs: object) -> TinyStoriesDataModule:
    args: dict[str, object] = dict(
        data_dir=str(real_dir), cache_dir=str(cache_dir), context_length=L, batch_size=8,
        max_train_stories=N_TRAIN, max_val_stories=N_VAL,
    )
    args.update(kwargs)
    return TinyStoriesDataModule(**args)  # type: ignore[arg-type]


def rows(dm: TinyStoriesDataModule, split: str) -> torch.Tensor:
    """Every row of a loaded split, in order, as one (n, L) tensor."""
    loader = dm.val_dataloader() if split == "validation" else dm.train_dataloader()
    return loader.dataset[:]["input_ids"]


def prepared(real_dir: Path, cache_dir: Path, **kwargs: object) -> TinyStoriesDataModule:
    """make_dm, with its data prepared and set up."""
    dm = make_dm(real_dir, cache_dir, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def padded(real_dir: Path, cache_dir: Path) -> TinyStoriesDataModule:
    return prepared(real_dir, cache_dir, packing=False)


@pytest.fixture(scope="module")
def packed(real_dir: Path, cache_dir: Path) -> TinyStoriesDataModule:
    return prepared(real_dir, cache_dir, packing=True)


# ---- reading local shards ---------------------------------------------------------


def test_reads_the_real_splits(real_dir: Path) -> None:
    train, valid = read_local_stories(real_dir, "train"), read_local_stories(real_dir, "validation")
    assert len(train) > 1000 and len(valid) > 100
    assert all(s == s.strip() and s for s in train + valid)
    assert not any(EOS_TOKEN in s for s in train + valid)
    assert not set(train) & set(valid)
    ds = load_stories("local", real_dir, "validation")
    assert ds.column_names == ["text"] and ds["text"] == valid


def test_splits_only_on_whole_separator_lines(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "b.txt").write_text(f"  Second file.\n{EOS_TOKEN}\n", encoding="utf-8")
    (tmp_path / "train" / "a.txt").write_text(
        f"{EOS_TOKEN}\nOne.\n\nStill one, {EOS_TOKEN} inline.\n{EOS_TOKEN}\n\n{EOS_TOKEN}\nTwo, no closing line.",
        encoding="utf-8",
    )
    assert read_local_stories(tmp_path, "train") == [
        f"One.\n\nStill one, {EOS_TOKEN} inline.",
        "Two, no closing line.",
        "Second file.",  # files in sorted order
    ]


def test_empty_or_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "x.txt").write_text(f"\n{EOS_TOKEN}\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"no train stories in {tmp_path / 'train'}"):
        read_local_stories(tmp_path, "train")
    with pytest.raises(ValueError, match="no validation stories"):
        read_local_stories(tmp_path, "validation")
    with pytest.raises(ValueError, match="does not exist"):
        read_local_stories(tmp_path / "missing", "train")
    with pytest.raises(ValueError, match="does not exist"):
        TinyStoriesDataModule(data_dir=str(tmp_path / "missing"), context_length=L)
    dm = TinyStoriesDataModule(data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"), context_length=L)
    with pytest.raises(ValueError, match=f"no train stories in {tmp_path / 'train'}") as info:
        dm.prepare_data()
    assert "\n" not in str(info.value)


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    repo_root = Path(__file__).resolve().parents[1]
    assert default_data_dir() == repo_root.parent / "shared" / "data" / "tinystories"
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert default_data_dir() == tmp_path


# ---- bad configuration --------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"source": "web"}, "unknown data source 'web'"),
        ({"context_length": 0}, "context_length must be >= 1"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"max_train_stories": 0}, "max_train_stories must be >= 1"),
    ],
)
def test_bad_arguments_are_clear_errors(real_dir: Path, tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_dm(real_dir, tmp_path, **kwargs)


def test_missing_context_length_is_a_clear_error(real_dir: Path, cache_dir: Path) -> None:
    dm = make_dm(real_dir, cache_dir, context_length=None)
    with pytest.raises(ValueError, match="context_length is not set"):
        dm.prepare_data()
    with pytest.raises(ValueError, match="context_length is not set"):
        dm.setup("fit")


def test_setup_before_prepare_is_a_clear_error(real_dir: Path, cache_dir: Path) -> None:
    dm = make_dm(real_dir, cache_dir, context_length=L + 1)
    with pytest.raises(RuntimeError, match="call prepare_data"):
        dm.setup("fit")
    with pytest.raises(RuntimeError, match="call prepare_data"):
        dm.train_dataloader()


# ---- batches ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_batches_are_fixed_length_long_tensors(mode: str, request: pytest.FixtureRequest) -> None:
    dm: TinyStoriesDataModule = request.getfixturevalue(mode)
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        batch = next(iter(loader))
        assert set(batch) == {"input_ids", "labels"}
        for t in batch.values():
            assert t.shape == (8, L) and t.dtype == torch.long
        assert int(batch["input_ids"].max()) < VOCAB_SIZE and int(batch["input_ids"].min()) >= 0


def test_padding_is_exactly_where_labels_are_ignored(padded: TinyStoriesDataModule) -> None:
    pad, eos = padded.pad_token_id, padded.eos_token_id
    n_padded_rows = 0
    for batch in padded.val_dataloader():
        ids, labels = batch["input_ids"], batch["labels"]
        is_pad = ids == pad
        assert torch.equal(labels == IGNORE_INDEX, is_pad)
        assert torch.equal(labels[~is_pad], ids[~is_pad])  # unshifted: the module shifts
        for row, row_pad in zip(ids, is_pad):
            n_real = int((~row_pad).sum())
            assert not row_pad[:n_real].any()  # right padding only
            if n_real < L:  # a story that fits ends with EOS, then padding
                n_padded_rows += 1
                assert row[n_real - 1] == eos
            assert (row[: n_real - 1] != eos).all()  # one story per row
    assert n_padded_rows > 0


def test_padded_rows_hold_one_story_each_in_order(padded: TinyStoriesDataModule, real_dir: Path) -> None:
    tok = padded.tokenizer
    stories = read_local_stories(real_dir, "validation")[:N_VAL]
    rows_ = rows(padded, "validation")
    assert len(rows_) == N_VAL
    for story, row in zip(stories, rows_):
        expected = (tok(story, add_special_tokens=False)["input_ids"] + [padded.eos_token_id])[:L]
        assert row[: len(expected)].tolist() == expected


def test_packed_rows_have_no_padding_and_join_stories_with_eos(packed: TinyStoriesDataModule, real_dir: Path) -> None:
    pad, eos, tok = packed.pad_token_id, packed.eos_token_id, packed.tokenizer
    for loader in (packed.train_dataloader(), packed.val_dataloader()):
        for batch in loader:
            assert not (batch["input_ids"] == pad).any()
            assert torch.equal(batch["labels"], batch["input_ids"])
    stream = rows(packed, "validation").reshape(-1).tolist()
    stories = read_local_stories(real_dir, "validation")[:N_VAL]
    expected = [t for s in stories for t in tok(s, add_special_tokens=False)["input_ids"] + [eos]]
    assert len(expected) - L < len(stream) <= len(expected)  # only the ragged tail is dropped
    assert stream == expected[: len(stream)]


def test_training_shuffle_is_seeded(real_dir: Path, cache_dir: Path, padded: TinyStoriesDataModule) -> None:
    def first_batch(seed: int) -> torch.Tensor:
        return next(iter(prepared(real_dir, cache_dir, seed=seed).train_dataloader()))["input_ids"]

    assert torch.equal(first_batch(0), first_batch(0))
    assert not torch.equal(first_batch(0), first_batch(1))
    assert torch.equal(next(iter(padded.val_dataloader()))["input_ids"], rows(padded, "validation")[:8])


def test_worker_processes_give_the_same_batches(real_dir: Path, cache_dir: Path, padded: TinyStoriesDataModule) -> None:
    dm = prepared(real_dir, cache_dir, num_workers=1)
    assert all(
        torch.equal(a["labels"], b["labels"]) for a, b in zip(dm.val_dataloader(), padded.val_dataloader())
    )


# ---- tokenizer wiring and caching ---------------------------------------------------------


def test_tokenizer_properties(padded: TinyStoriesDataModule, cache_dir: Path) -> None:
    assert len(padded.tokenizer) == VOCAB_SIZE
    assert padded.tokenizer_file.is_file() and padded.tokenizer_file.is_relative_to(cache_dir)
    assert padded.tokenizer_hash == tokenizer_hash(padded.tokenizer_file)
    assert padded.pad_token_id != padded.eos_token_id
    assert padded.pad_token_id == padded.tokenizer.pad_token_id


def test_tokenizer_is_prepared_lazily_and_shared(real_dir: Path, cache_dir: Path, padded: TinyStoriesDataModule) -> None:
    dm = make_dm(real_dir, cache_dir, context_length=None)
    assert dm.tokenizer_hash == padded.tokenizer_hash  # same data, same cached tokenizer
    assert dm.tokenizer_file == padded.tokenizer_file


def test_tokenized_data_is_cached(real_dir: Path, cache_dir: Path, padded: TinyStoriesDataModule,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for split in ("train", "validation"):
        assert padded.split_cache_path(split).is_dir()
    dm = make_dm(real_dir, cache_dir)

    def no_tokenizing(*args: object) -> None:
        raise AssertionError("prepare_data tokenized again instead of loading the cache")

    monkeypatch.setattr(TinyStoriesDataModule, "_tokenize", no_tokenizing)
    start = time.perf_counter()
    dm.prepare_data()
    dm.setup("fit")
    assert time.perf_counter() - start < 2.0
    assert torch.equal(rows(dm, "validation"), rows(padded, "validation"))
    # Anything that changes the rows gets its own cache entry.
    keys = {make_dm(real_dir, cache_dir, **kw).split_cache_path("train") for kw in
            ({}, {"packing": True}, {"context_length": L + 1}, {"max_train_stories": N_TRAIN + 1})}
    assert len(keys) == 4
    assert make_dm(real_dir, cache_dir, batch_size=3).split_cache_path("train") == padded.split_cache_path("train")
    assert not list(cache_dir.glob("tokenized/.*"))  # no temporary folders left behind


def test_given_tokenizer_file_is_used(real_dir: Path, tmp_path: Path, padded: TinyStoriesDataModule) -> None:
    dm = prepared(real_dir, tmp_path, tokenizer_path=str(padded.tokenizer_file))
    assert dm.tokenizer_hash == padded.tokenizer_hash
    assert not list(tmp_path.glob("tokenizer-*"))  # nothing trained
    assert torch.equal(rows(dm, "validation"), rows(padded, "validation"))


def test_validation_texts(padded: TinyStoriesDataModule, real_dir: Path) -> None:
    valid = read_local_stories(real_dir, "validation")
    assert padded.validation_texts(3) == valid[:3]
    assert len(padded.validation_texts(10**6)) == len(valid)


# ---- a synthetic corpus, end to end ---------------------------------------------------------


@pytest.mark.parametrize("packing", [False, True])
def test_synthetic_folder_end_to_end(tmp_path: Path, packing: bool) -> None:
    folder = tmp_path / "stories"
    valid = write_synthetic_corpus(folder)
    dm = TinyStoriesDataModule(
        data_dir=str(folder), cache_dir=str(tmp_path / "cache"), context_length=32, batch_size=4, packing=packing
    )
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.tokenizer) == VOCAB_SIZE
    assert dm.tokenizer_file.is_relative_to(tmp_path / "cache")
    assert dm.validation_texts(2) == valid[:2]
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 32)
    assert torch.equal(batch["labels"] == IGNORE_INDEX, batch["input_ids"] == dm.pad_token_id)
    first = next(iter(dm.val_dataloader()))["input_ids"][0]
    text = dm.tokenizer.decode(first[first != dm.pad_token_id])
    assert (valid[0] + EOS_TOKEN).startswith(text)


def test_too_short_corpus_for_packing_is_a_clear_error(tmp_path: Path, real_dir: Path, cache_dir: Path,
                                                        padded: TinyStoriesDataModule) -> None:
    dm = make_dm(real_dir, tmp_path, tokenizer_path=str(padded.tokenizer_file), packing=True,
                 context_length=100_000, max_val_stories=2)
    with pytest.raises(ValueError, match="too few for packed windows"):
        dm.prepare_data()
