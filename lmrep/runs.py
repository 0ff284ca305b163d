"""Probing runs: models and prompts in, result rows on disk.

Sits between the engine (`lmrep.probe`, tensors only) and the report: it probes
a model (an untrained one, one checkpoint, or a directory of them in step
order), adds the text and identity of every row (the columns `lmrep.schema`
declares), and keeps `results.jsonl` up to date atomically after every
checkpoint so that an interrupted run resumes where it stopped and a re-run
skips finished work. With a `Shard` of a process group the prompts are split
over the ranks (`lmrep.sharding`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from data.files import write_text_atomic
from lmrep import schema
from lmrep.checkpoints import list_checkpoints, load_checkpoint, read_checkpoint
from lmrep.module import CHECKPOINT_KEY
from lmrep.probe import ProbeSettings, probe
from lmrep.prompts import PromptSet, parse_blocks
from lmrep.sharding import Shard, gather_rows, single_process_order
from models.surface import ProbeSurface

RESULTS_FILE = "results.jsonl"
# Settings that may differ between rows of one results file (they are row keys, not settings).
_ROW_KEY_SETTINGS = ("context",)


def settings_id(settings: ProbeSettings, prompts: PromptSet) -> str:
    """A short hash of the requested settings, prompts and result schema: what decides a row but is not a row key.

    Taken before per-model defaults are filled in (the start scale follows each
    checkpoint's embedding std), so every checkpoint of a run shares one id.
    """
    record = {k: v for k, v in dataclasses.asdict(settings).items() if k not in _ROW_KEY_SETTINGS}
    record["schema"] = schema.SCHEMA_VERSION
    record["prompts"] = prompts.ids.tolist()
    record["lengths"] = prompts.lengths.tolist()
    text = json.dumps(record, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def probe_rows(model: ProbeSurface, prompts: PromptSet, tokenizer: PreTrainedTokenizerFast, *,
               blocks: Sequence[int], masks: Sequence[int], settings: ProbeSettings, step: int,
               source: str, pinv: torch.Tensor | None = None,
               prompt_indices: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Probe one model and return one plain row per (block, mask, prompt), with its text and the run's columns.

    `prompt_indices` probes only those prompts of the set (with their global indices).
    The identity columns `source_id` and `settings_id` are added by `run_probe`.
    """
    ids, lengths = prompts.ids, prompts.lengths
    if prompt_indices is not None:
        # Rows of the full (B, T) batch: the padded width T stays that of the whole set.
        ids, lengths = ids[list(prompt_indices)], lengths[list(prompt_indices)]
    result = probe(model, ids, blocks=blocks, masks=masks, settings=settings, prompt_indices=prompt_indices,
                   pad_token_id=tokenizer.pad_token_id, prompt_lengths=lengths, pinv=pinv)
    text_of = {  # the schema's TEXT columns, from a row's ids
        "prompt": lambda row: prompts.texts[row["prompt_index"]],
        "target_tokens": lambda row: tokenizer.convert_ids_to_tokens(row["target_ids"]),
        "recovered_tokens": lambda row: tokenizer.convert_ids_to_tokens(row["recovered_ids"]),
        "recovered_text": lambda row: tokenizer.decode(row["recovered_ids"]),
    }
    rows = []
    for row in result.rows():
        row.update({c.name: text_of[c.name](row) for c in schema.columns(source=schema.TEXT)})
        row.update(step=step, checkpoint=source, family=model.family)
        rows.append(row)
    return rows


# ---------------------------------------------------------------- results file


def read_results(out_dir: str | Path) -> list[dict[str, Any]]:
    """Rows of `out_dir/results.jsonl` ([] if none)."""
    path = Path(out_dir) / RESULTS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_results(out_dir: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Replace `results.jsonl` atomically with these rows."""
    text = "".join(json.dumps(row) + "\n" for row in rows)
    write_text_atomic(Path(out_dir) / RESULTS_FILE, text)


# ---------------------------------------------------------------- probing runs


@dataclass
class ModelSource:
    """A model to probe: a checkpoint file, or a model in memory (untrained, or the one being trained).

    `source_id` names the weights themselves (a checkpoint's content hash; an untrained
    model's config and seed), so finished work is only ever reused for the same model.
    """

    name: str
    step: int
    source_id: str
    path: Path | None = None
    model: ProbeSurface | None = None

    def load(self, tokenizer_hash: str | None, device: torch.device | str | None = None) -> ProbeSurface:
        """The model, on `device` when given (an in-memory model is moved there in place)."""
        model = self.model if self.model is not None else load_checkpoint(self.path, tokenizer_hash=tokenizer_hash).model
        return model if device is None else model.to(device)


def file_digest(path: Path) -> str:
    """Short sha256 of a file's bytes."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def untrained_source_id(spec: dict[str, Any], seed: int) -> str:
    """Identity of an untrained model: its family, config and initialisation seed."""
    text = json.dumps({"spec": spec, "seed": seed}, sort_keys=True)
    return "init-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def checkpoint_sources(path: str | Path) -> list[ModelSource]:
    """A checkpoint file, or every checkpoint of a directory in step order."""
    path = Path(path)
    paths = list_checkpoints(path) if path.is_dir() else [path]
    sources = []
    for p in paths:
        # Validated (safe load, lmrep metadata) before any probing starts; mapped, not read, until probed.
        meta = read_checkpoint(p, mmap=True)[CHECKPOINT_KEY]
        sources.append(ModelSource(name=p.name, step=int(meta.get("step", 0)), source_id=file_digest(p), path=p))
    return sources


def run_probe(sources: Sequence[ModelSource], prompts: PromptSet, tokenizer: PreTrainedTokenizerFast, *,
              blocks_spec: str | Sequence[int], masks: Sequence[int], settings: ProbeSettings,
              contexts: Sequence[str], out_dir: str | Path, tokenizer_hash: str | None = None,
              progress: bool = True, shard: Shard | None = None,
              device: torch.device | str | None = None) -> list[dict[str, Any]]:
    """Probe every source in every context, appending to `out_dir/results.jsonl` after each.

    Work already in the results file with the same settings is skipped; a results
    file made with other settings is an error, never mixed. With a `shard` of a
    process group every rank must call this with the same arguments: each probes its
    share of the prompts (on `device`), and rank 0 reads and writes the results file.
    Rank 0 returns every row of the file; the other ranks return this call's new rows.
    """
    shard = shard or Shard()
    out_dir = Path(out_dir)
    existing = read_results(out_dir) if shard.is_main else []
    rows = list(existing)
    sid = settings_id(settings, prompts)
    done = {(r["source_id"], r["context"], r["block"], r["mask"]) for r in existing}
    others = sorted(map(str, {r.get("settings_id") for r in existing} - {sid}))
    ours = {(src.name, src.step): src.source_id for src in sources}
    clashes = sorted({r["checkpoint"] for r in existing
                      if ours.get((r["checkpoint"], r["step"]), r["source_id"]) != r["source_id"]})
    done, others, clashes = shard.broadcast((done, others, clashes))  # only rank 0 reads the output directory
    if others:
        raise ValueError(f"{out_dir / RESULTS_FILE} holds results made with other settings "
                         f"({', '.join(others)}): use another --out")
    if clashes:
        raise ValueError(f"{out_dir / RESULTS_FILE} holds results of another model named {', '.join(clashes)}: "
                         "use another --out")
    mine = shard.prompt_indices(len(prompts))
    gathered: list[dict[str, Any]] = []
    with tqdm(total=len(sources) * len(contexts), desc="probing", unit="run",
              disable=not (progress and shard.is_main)) as bar:
        for source in sources:
            model = None
            for context in contexts:
                bar.set_postfix_str(f"{source.name} {context}")
                run_settings = dataclasses.replace(settings, context=context)
                if model is None:
                    model = source.load(tokenizer_hash, device)
                    blocks = parse_blocks(blocks_spec, model.n_blocks)
                    pinv = torch.linalg.pinv(model.embedding_matrix.detach())  # once per checkpoint
                missing: dict[tuple[int, ...], list[int]] = {}  # missing masks -> blocks missing exactly those
                for k in blocks:
                    todo_masks = tuple(m for m in masks if (source.source_id, context, k, m) not in done)
                    if todo_masks:
                        missing.setdefault(todo_masks, []).append(k)
                for todo_masks, todo_blocks in missing.items():
                    def compute() -> list[dict[str, Any]]:
                        if not mine:  # more ranks than prompts
                            return []
                        try:
                            return probe_rows(model, prompts, tokenizer, blocks=todo_blocks, masks=todo_masks,
                                              settings=run_settings, step=source.step, source=source.name,
                                              pinv=pinv, prompt_indices=mine if shard.world_size > 1 else None)
                        except FloatingPointError as err:
                            raise FloatingPointError(f"probing {source.name} ({context} context): {err}") from None

                    new = gather_rows(shard, compute)
                    if shard.world_size > 1:
                        new = single_process_order(new)
                    for row in new:
                        row.update(settings_id=sid, source_id=source.source_id)
                    gathered.extend(new)
                    redo = {(source.source_id, context, k, m) for k in todo_blocks for m in todo_masks}
                    rows = [r for r in rows if (r["source_id"], r["context"], r["block"], r["mask"]) not in redo] + new
                    if shard.is_main:
                        write_results(out_dir, rows)
                bar.update(1)
    return rows if shard.is_main else gathered
