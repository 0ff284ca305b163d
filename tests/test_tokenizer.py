"""The 4096-token byte-level BPE: size, special tokens, exact round trips, identity, caching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from data.stories import read_local_stories
from data.tokenizer import (
    EOS_TOKEN,
    PAD_TOKEN,
    VOCAB_SIZE,
    get_or_train_tokenizer,
    load_tokenizer,
    main,
    tokenizer_hash,
    train_tokenizer,
)
from tests.corpus import local_stories_dir

MOJIBAKE = "â€"  # the V1 sources' broken quotes, kept in the data on purpose


@pytest.fixture(scope="module")
def data_dir() -> Path:
    return local_stories_dir()


@pytest.fixture(scope="module")
def valid_stories(data_dir: Path) -> list[str]:
    return read_local_stories(data_dir, "validation")


@pytest.fixture(scope="module")
def trained(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[PreTrainedTokenizerFast, Path]:
    """The real tokenizer, trained once for this module on the full training split (~1 s)."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    return train_tokenizer(read_local_stories(data_dir, "train"), path), path


def test_vocabulary_is_exactly_4096(trained: tuple[PreTrainedTokenizerFast, Path]) -> None:
    tok, path = trained
    assert VOCAB_SIZE == 4096
    assert len(tok) == VOCAB_SIZE
    assert len(load_tokenizer(path)) == VOCAB_SIZE
    assert len(json.loads(path.read_text())["model"]["vocab"]) == VOCAB_SIZE


def test_eos_and_pad_are_distinct_special_tokens(trained: tuple[PreTrainedTokenizerFast, Path]) -> None:
    tok = load_tokenizer(trained[1])
    assert tok.eos_token == EOS_TOKEN and tok.pad_token == PAD_TOKEN
    assert tok.eos_token_id is not None and tok.pad_token_id is not None
    assert tok.eos_token_id != tok.pad_token_id
    assert {tok.eos_token_id, tok.pad_token_id} <= set(tok.all_special_ids)
    # Written out in text, a special token is one id; no ordinary text produces it.
    assert tok(f"The end.{EOS_TOKEN}", add_special_tokens=False)["input_ids"][-1] == tok.eos_token_id
    ids = tok("A pad and an end of text.", add_special_tokens=False)["input_ids"]
    assert tok.eos_token_id not in ids and tok.pad_token_id not in ids
    # Encoding adds nothing of its own (no BOS/EOS): the data module appends EOS itself.
    assert tok("Hi")["input_ids"] == tok("Hi", add_special_tokens=False)["input_ids"]


def test_round_trips_real_stories_exactly(
    trained: tuple[PreTrainedTokenizerFast, Path], data_dir: Path, valid_stories: list[str]
) -> None:
    tok = load_tokenizer(trained[1])
    # Every validation story, plus the training stories outside ASCII (the mojibake ones among them).
    odd_train = [s for s in read_local_stories(data_dir, "train") if not s.isascii()]
    assert any(MOJIBAKE in s for s in odd_train), "the mojibake stories should be among those tested"
    stories = valid_stories + odd_train
    assert any("\n\n" in s for s in stories) and any(not s.isascii() for s in valid_stories)
    for story, ids in zip(stories, tok(stories, add_special_tokens=False)["input_ids"]):
        assert tok.decode(ids) == story
        assert max(ids) < VOCAB_SIZE


@pytest.mark.parametrize(
    "text", [" leading space", "two  spaces\tand a tab", "line\n\nbreaks\n", "émoji 🐱 and ünïcode", "", "x . y , z"]
)
def test_round_trips_awkward_strings(trained: tuple[PreTrainedTokenizerFast, Path], text: str) -> None:
    tok = trained[0]
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_compresses_stories(trained: tuple[PreTrainedTokenizerFast, Path], valid_stories: list[str]) -> None:
    tok = trained[0]
    n_chars = sum(len(s) for s in valid_stories[:100])
    n_tokens = sum(len(ids) for ids in tok(valid_stories[:100], add_special_tokens=False)["input_ids"])
    assert n_chars / n_tokens > 3  # a trained 4096 BPE takes whole common words; bytes would give 1


def test_hash_is_stable_across_save_and_load(trained: tuple[PreTrainedTokenizerFast, Path]) -> None:
    tok, path = trained
    h = tokenizer_hash(tok)
    assert len(h) == 16 and int(h, 16) >= 0
    assert tokenizer_hash(path) == h
    assert tokenizer_hash(str(path)) == h
    assert tokenizer_hash(load_tokenizer(path)) == h
    assert tokenizer_hash(load_tokenizer(path).backend_tokenizer) == h


def test_training_is_deterministic_and_hash_tracks_the_text(
    trained: tuple[PreTrainedTokenizerFast, Path], valid_stories: list[str], tmp_path: Path
) -> None:
    a = train_tokenizer(valid_stories, tmp_path / "a" / "tokenizer.json")
    b = train_tokenizer(valid_stories, tmp_path / "b" / "tokenizer.json")
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
    assert tokenizer_hash(a) == tokenizer_hash(b)
    assert tokenizer_hash(a) != tokenizer_hash(trained[0])


def test_saving_leaves_no_temporary_files(tmp_path: Path, valid_stories: list[str]) -> None:
    train_tokenizer(valid_stories, tmp_path / "tokenizer.json")
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]


def test_too_little_text_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected 4096"):
        train_tokenizer(["Once upon a time there was a cat."] * 3, tmp_path / "tokenizer.json")
    assert not (tmp_path / "tokenizer.json").exists()


def test_get_or_train_trains_once_then_loads(valid_stories: list[str], tmp_path: Path) -> None:
    calls: list[int] = []

    def texts() -> list[str]:
        calls.append(1)
        return valid_stories

    tok1, path1 = get_or_train_tokenizer(texts, tmp_path, "abc")
    assert path1 == tmp_path / "tokenizer-abc" / "tokenizer.json"
    mtime = path1.stat().st_mtime_ns
    tok2, path2 = get_or_train_tokenizer(texts, tmp_path, "abc")
    assert path2 == path1 and len(calls) == 1
    assert path1.stat().st_mtime_ns == mtime
    assert tokenizer_hash(tok1) == tokenizer_hash(tok2)
    assert tok2.pad_token == PAD_TOKEN and tok2.eos_token == EOS_TOKEN
    get_or_train_tokenizer(texts, tmp_path, "other")  # another fingerprint trains its own
    assert len(calls) == 2


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no tokenizer file at"):
        load_tokenizer(tmp_path / "nope" / "tokenizer.json")


def test_file_without_the_special_tokens_is_rejected(trained: tuple[PreTrainedTokenizerFast, Path], tmp_path: Path) -> None:
    spec = json.loads(trained[1].read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != PAD_TOKEN]
    del spec["model"]["vocab"][PAD_TOKEN]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="lacks the special tokens"):
        load_tokenizer(tmp_path / "tokenizer.json")


def test_cli_trains_and_saves(data_dir: Path, trained: tuple[PreTrainedTokenizerFast, Path], tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli" / "tokenizer.json"
    main(["--data-dir", str(data_dir), "--out", str(out)])
    assert tokenizer_hash(out) == tokenizer_hash(trained[0])  # same text, same tokenizer
    assert "4096 tokens" in capsys.readouterr().out


def test_cli_reports_a_bad_folder_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--data-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "t.json")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "does not exist" in err and "\n" not in err
