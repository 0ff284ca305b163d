"""Stories for the tests: the real local copy (or a skip), and a made-up corpus in the TinyStories shard format."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from data.stories import DATA_DIR_ENV, EOS_TOKEN, default_data_dir

SYLLABLES = [a + b for a in "bdfgklmnprstvz" for b in "aeiou"]


def local_stories_dir() -> Path:
    """The real TinyStories folder the tests read, or skip the test when there is none."""
    folder = default_data_dir()
    if not (folder / "valid.txt").is_file():
        pytest.skip(f"real TinyStories not found at {folder} (set ${DATA_DIR_ENV})")
    return folder


def story_maker(seed: int = 0) -> Callable[[], str]:
    """A seeded source of made-up stories: random syllable words, one to three paragraphs.

    The corpus has enough distinct, repeated words for a 4096-token BPE to fill its vocabulary.
    """
    rng = random.Random(seed)
    words = sorted({"".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(3000)})

    def story() -> str:
        paragraphs = []
        for _ in range(rng.randint(1, 3)):
            sentences = [" ".join(rng.choices(words, k=rng.randint(3, 12))).capitalize() + "." for _ in range(4)]
            paragraphs.append(" ".join(sentences))
        return "\n\n".join(paragraphs)

    return story


def write_synthetic_corpus(folder: Path, n_train: int = 400, n_val: int = 40, seed: int = 0) -> list[str]:
    """Write a made-up corpus in the TinyStories shard format; returns the validation stories."""
    story = story_maker(seed)
    train = [story() for _ in range(n_train)]
    valid = [story() for _ in range(n_val)]
    (folder / "train").mkdir(parents=True)
    half = n_train // 2
    for name, chunk in (("shard-0.txt", train[:half]), ("shard-1.txt", train[half:])):
        (folder / "train" / name).write_text("".join(f"{s}\n{EOS_TOKEN}\n" for s in chunk), encoding="utf-8")
    (folder / "valid.txt").write_text("".join(f"{s}\n{EOS_TOKEN}\n" for s in valid), encoding="utf-8")
    return valid
