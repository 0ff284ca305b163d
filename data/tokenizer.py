"""Train, load and identify the 4096-token byte-level BPE tokenizer.

The tokenizer is trained with HF `tokenizers` on the training stories, saved as
one `tokenizer.json`, and loaded as a `PreTrainedTokenizerFast`. Its identity is
a short hash of the canonical JSON, which checkpoints record so that a model is
never paired with a tokenizer it was not trained with.

CLI: `python -m data.tokenizer --data-dir DIR --out PATH` trains and saves one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from data.files import write_text_atomic
from data.stories import EOS_TOKEN, default_data_dir, read_local_stories

VOCAB_SIZE = 4096
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN]  # ids 0 and 1, in this order
TOKENIZER_FILE = "tokenizer.json"
HASH_CHARS = 16  # 64 bits of sha256: plenty to tell tokenizers apart
# The parts of tokenizer.json that decide which ids a text gets and how ids decode.
# Left out: padding/truncation (run-time settings) and the post-processor, which
# transformers fills in with an empty template when it wraps the tokenizer, so a
# saved file and the loaded tokenizer would otherwise hash differently.
IDENTITY_KEYS = ("added_tokens", "normalizer", "pre_tokenizer", "model", "decoder")


def wrap_tokenizer(tok: Tokenizer | str, *, name: str = "tokenizer") -> PreTrainedTokenizerFast:
    """The one way lmrep wraps a raw tokenizer (a `tokenizers.Tokenizer` or its JSON text).

    EOS and PAD are set and must already be in the vocabulary (wrapping would
    otherwise add them as new tokens and change the vocabulary size); `name`
    says which tokenizer in the error.
    """
    if isinstance(tok, str):
        tok = Tokenizer.from_str(tok)
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        raise ValueError(f"{name} lacks the special tokens {missing}: not a tokenizer written by lmrep")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        # Byte-level BPE round-trips text exactly; the "clean-up" would not (" ." -> ".").
        clean_up_tokenization_spaces=False,
    )


def train_tokenizer(
    texts: Iterable[str], out_path: Path, vocab_size: int = VOCAB_SIZE
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with `vocab_size` tokens on `texts` and save it to `out_path`."""
    tok = Tokenizer(models.BPE())
    # No prefix space: decode(encode(s)) == s for every string, the first word included.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    got = tok.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:
        raise ValueError(
            f"tokenizer has {got} tokens, expected {vocab_size}: the training text is too small"
        )
    out_path = Path(out_path)
    write_text_atomic(out_path, tok.to_str(pretty=True))
    return wrap_tokenizer(tok, name="the trained tokenizer")


def load_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """Load a `tokenizer.json` written by `train_tokenizer` as a `PreTrainedTokenizerFast`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer file at {path}")
    return wrap_tokenizer(Tokenizer.from_file(str(path)), name=f"tokenizer {path}")


def tokenizer_hash(tok_or_path: PreTrainedTokenizerFast | Tokenizer | Path | str) -> str:
    """A short stable sha256 hex of the tokenizer's canonical JSON (same tokenizer, same hash)."""
    if isinstance(tok_or_path, (str, Path)):
        raw = Path(tok_or_path).read_text(encoding="utf-8")
    elif isinstance(tok_or_path, PreTrainedTokenizerFast):
        raw = tok_or_path.backend_tokenizer.to_str()
    elif isinstance(tok_or_path, Tokenizer):
        raw = tok_or_path.to_str()
    else:
        raise TypeError(f"cannot hash a {type(tok_or_path).__name__}; pass a tokenizer or a path")
    spec = json.loads(raw)
    identity = {key: spec.get(key) for key in IDENTITY_KEYS}
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:HASH_CHARS]


def get_or_train_tokenizer(
    train_texts_fn: Callable[[], Iterable[str]], cache_dir: Path, fingerprint: str
) -> tuple[PreTrainedTokenizerFast, Path]:
    """Load the tokenizer cached under `fingerprint`, training it from `train_texts_fn()` once if absent."""
    path = Path(cache_dir) / f"tokenizer-{fingerprint}" / TOKENIZER_FILE
    if path.is_file():
        return load_tokenizer(path), path
    return train_tokenizer(train_texts_fn(), path), path


def main(argv: list[str] | None = None) -> None:
    """Train the tokenizer on a local TinyStories folder's training split and save it."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--data-dir", type=Path, default=None, help="local TinyStories folder")
    parser.add_argument("--out", type=Path, required=True, help="where to write tokenizer.json")
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = parser.parse_args(argv)
    data_dir = args.data_dir if args.data_dir is not None else default_data_dir()
    try:
        stories = read_local_stories(data_dir, "train")
        tok = train_tokenizer(stories, args.out, args.vocab_size)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(1, f"error: {e}\n")
    print(f"{args.out}: {len(tok)} tokens, hash {tokenizer_hash(args.out)}, trained on {len(stories)} stories")


if __name__ == "__main__":
    main()
