"""Export a llama checkpoint to a Hugging Face model directory (weights + tokenizer).

    python -m lmrep.export runs/llama/checkpoints/last.ckpt exported/llama

The directory loads with `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained`, so other tools can use lmrep's checkpoints: its
config carries the tokenizer's end-of-text and pad ids, and the tokenizer's
`model_max_length` is the model's context length (`models.llama.export_hf`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmrep.checkpoints import CheckpointError, load_checkpoint
from models import export_hf


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write the checkpoint's HF llama and its tokenizer to out_dir."""
    loaded = load_checkpoint(checkpoint)
    if loaded.spec["family"] != "llama":
        raise CheckpointError(f"{checkpoint} holds a {loaded.spec['family']} model: only llama exports to HF")
    return export_hf(loaded.model, loaded.tokenizer, Path(out_dir))


def main(argv: list[str] | None = None) -> None:
    """Command line: checkpoint path, output directory."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        print(export_checkpoint(args.checkpoint, args.out_dir))
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
