"""Prompts for probing: text -> right-padded token ids, and the block/mask lists of a request."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast


@dataclass
class PromptSet:
    """Prompts as right-padded token ids, with their real lengths and texts."""

    ids: torch.Tensor  # (B, T) long
    lengths: torch.Tensor  # (B,) long
    texts: list[str]

    def __len__(self) -> int:
        return len(self.texts)


def encode_prompts(texts: Sequence[str], tokenizer: PreTrainedTokenizerFast, *,
                   max_tokens: int | None = None) -> PromptSet:
    """Tokenize prompts (cut to max_tokens when given) and right-pad them with the pad token."""
    if len(texts) == 0:
        raise ValueError("empty prompt set: give at least one prompt")
    encoded = []
    for i, text in enumerate(texts):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if max_tokens is not None:
            ids = ids[:max_tokens]
        if not ids:
            raise ValueError(f"prompt {i} tokenizes to nothing: {text!r}")
        encoded.append(ids)
    t = max(len(ids) for ids in encoded)
    batch = torch.full((len(encoded), t), tokenizer.pad_token_id, dtype=torch.long)
    for i, ids in enumerate(encoded):
        batch[i, : len(ids)] = torch.tensor(ids)
    texts = [tokenizer.decode(ids) for ids in encoded]  # what is actually probed, after cutting
    return PromptSet(ids=batch, lengths=torch.tensor([len(ids) for ids in encoded]), texts=texts)


def read_prompt_lines(path: str | Path) -> list[tuple[int, str]]:
    """(line number, prompt) for each non-empty line; a line that is not UTF-8 is an error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    prompts = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid UTF-8 (byte {raw[error.start]:#04x} at column "
                             f"{error.start + 1}); save the prompts file as UTF-8") from None
        if line.strip():
            prompts.append((number, line))
    if not prompts:
        raise ValueError(f"empty prompt set: {path} has no non-empty lines")
    return prompts


def first_too_long(prompts: PromptSet, context_length: int) -> int | None:
    """The index of the first prompt with more tokens than the model's context, None when all fit."""
    over = (prompts.lengths > context_length).nonzero()
    return int(over[0]) if len(over) else None


def validation_prompts(n: int, source: str = "auto", data_dir: str | Path | None = None, *,
                       cache_dir: str | Path | None = None) -> list[str]:
    """The first n TinyStories validation stories (the default prompt set), from the source a run would use."""
    from data.stories import DEFAULT_CACHE_DIR, announce, describe_source, resolve_source, validation_stories

    resolved, folder = resolve_source(source, data_dir)
    announce(describe_source(source, resolved, folder, {"validation": n}))
    return validation_stories(resolved, folder, n, cache_dir=cache_dir or DEFAULT_CACHE_DIR)


def parse_blocks(spec: str | Sequence[int], n_blocks: int) -> list[int]:
    """'all' -> 1..n; '1,4,8' or [1, 4, 8] -> that list, checked against the model."""
    if isinstance(spec, str):
        if spec.strip() == "all":
            return list(range(1, n_blocks + 1))
        blocks = parse_ints(spec, "blocks")
    else:
        blocks = [int(b) for b in spec]
    bad = [b for b in blocks if not 0 <= b <= n_blocks]
    if bad:
        raise ValueError(f"block(s) {bad} out of range: this model has blocks 0..{n_blocks}")
    return blocks


def parse_ints(spec: str, what: str) -> list[int]:
    """'0,1,3' -> [0, 1, 3] with a clear error."""
    try:
        values = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} must be a comma-separated list of integers, got {spec!r}") from None
    if not values:
        raise ValueError(f"no {what} given")
    return values
