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
import fcntl
import hashlib
import json
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from data.files import write_text_atomic
from lmrep import schema
from lmrep.checkpoints import list_checkpoints, load_checkpoint, read_metadata
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
               prompt_indices: Sequence[int] | None = None,
               on_chunk: Callable[[int], Any] | None = None) -> list[dict[str, Any]]:
    """Probe one model and return one plain row per (block, mask, prompt), with its text and the run's columns.

    `prompt_indices` probes only those prompts of the set (with their global indices);
    `on_chunk(n)` is called as each chunk of n rows is solved (progress).
    The identity columns `source_id` and `settings_id` are added by `run_probe`.
    """
    ids, lengths = prompts.ids, prompts.lengths
    if prompt_indices is not None:
        # Rows of the full (B, T) batch: the padded width T stays that of the whole set.
        ids, lengths = ids[list(prompt_indices)], lengths[list(prompt_indices)]
    result = probe(model, ids, blocks=blocks, masks=masks, settings=settings, prompt_indices=prompt_indices,
                   pad_token_id=tokenizer.pad_token_id, prompt_lengths=lengths, pinv=pinv, on_chunk=on_chunk)
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


LOCK_FILE = ".lmrep-writer.lock"
DAMAGED_SUFFIX = ".damaged"  # unreadable lines of a results file are set aside under this suffix


def read_results(out_dir: str | Path) -> list[dict[str, Any]]:
    """Rows of `out_dir/results.jsonl` ([] if none).

    Lines that are not whole JSON rows (a tail cut by a crash or a full disk) are
    moved to `results.jsonl.damaged` with one line on stderr; the complete rows are
    kept, and what the damaged lines held is solved again by the next run.
    """
    path = Path(out_dir) / RESULTS_FILE
    if not path.exists():
        return []
    rows, damaged = [], []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            damaged.append(line)
    if damaged:
        aside = path.with_name(path.name + DAMAGED_SUFFIX)
        with aside.open("a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in damaged))
        write_results(out_dir, rows)
        print(f"warning: {path} had {len(damaged)} damaged line(s) (a cut write?): set aside in {aside}; "
              f"kept {len(rows)} complete rows, the rest is solved again", file=sys.stderr)
    return rows


def write_results(out_dir: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Replace `results.jsonl` atomically with these rows."""
    text = "".join(json.dumps(row) + "\n" for row in rows)
    write_text_atomic(Path(out_dir) / RESULTS_FILE, text)


def check_output_dir(out_dir: str | Path) -> Path:
    """Fail now, with one line, if the output folder could not be created or written; creates nothing."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output folder {out_dir} is a file: give a folder for --out")
    existing = next(p for p in (out_dir, *out_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"cannot create output folder {out_dir}: {existing} is a file")
    try:
        with tempfile.TemporaryFile(dir=existing):  # the real test: permissions, read-only mounts, quotas
            pass
    except OSError as err:
        raise ValueError(f"cannot write into output folder {out_dir}: {err.strerror or err}") from None
    return out_dir


class OutputLock:
    """Held by the one process that writes an output folder: a second writer fails at once, never loses rows.

    An advisory `flock` on a file in the folder; the kernel drops it when the process
    ends, killed or not, so a crashed run never leaves a stale lock behind.
    """

    def __init__(self, out_dir: str | Path) -> None:
        out_dir = check_output_dir(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / LOCK_FILE
        self._file: Any = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or raise ValueError naming the process that holds it."""
        f = self.path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise ValueError(f"{self.path.parent} is being written by {holder}: wait for it to finish, "
                             "or use another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        """Let the next writer in."""
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


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
    sources, first_spec = [], None
    for p in paths:
        # Validated (safe load, lmrep metadata) before any probing starts; mapped, not read, until probed.
        meta = read_metadata(p)
        # One run's checkpoints share one model: curves over steps of different models mean nothing.
        spec = meta.get("model")
        if first_spec is None:
            first_spec = (p, spec)
        elif spec != first_spec[1]:
            raise ValueError(f"{path} holds checkpoints of different models: {first_spec[0].name} is "
                             f"{describe_model(first_spec[1])}, {p.name} is {describe_model(spec)}: "
                             "probe each run's checkpoints on their own")
        sources.append(ModelSource(name=p.name, step=int(meta.get("step", 0)), source_id=file_digest(p), path=p))
    return sources


def describe_model(spec: dict[str, Any] | None) -> str:
    """A model spec in a few words: 'a mixer (d_model=64, n_blocks=2, mixing=flat, ...)'."""
    if not spec:
        return "a model of unknown shape"
    fields = ", ".join(f"{k}={v}" for k, v in spec.get("config", {}).items())
    return f"a {spec.get('family')} ({fields})"


def _method(row: dict[str, Any]) -> str:
    """The method that wrote a row (rows written before methods could share a file: the default)."""
    return row.get("method", ProbeSettings.method)


def complete_groups(rows: Iterable[dict[str, Any]], n_prompts: int) -> set[tuple[Any, ...]]:
    """(source_id, context, block, mask) groups that hold a row for every one of the n prompts."""
    prompts_of: dict[tuple[Any, ...], set[int]] = {}
    for r in rows:
        prompts_of.setdefault((r["source_id"], r["context"], r["block"], r["mask"]), set()).add(r["prompt_index"])
    return {key for key, seen in prompts_of.items() if len(seen) == n_prompts}


def run_probe(sources: Sequence[ModelSource], prompts: PromptSet, tokenizer: PreTrainedTokenizerFast, *,
              blocks_spec: str | Sequence[int], masks: Sequence[int], settings: ProbeSettings,
              contexts: Sequence[str], out_dir: str | Path, tokenizer_hash: str | None = None,
              progress: bool = True, desc: str = "probing", leave: bool = True, shard: Shard | None = None,
              device: torch.device | str | None = None) -> list[dict[str, Any]]:
    """Probe every source in every context, appending to `out_dir/results.jsonl` after each.

    Work already in the results file with the same settings is skipped; a results
    file made with other settings is an error, never mixed. Rows of another method
    (gradient beside exact, `ProbeSettings.method`) are kept beside ours: each
    method's rows carry their own settings id, and the report sets them side by side. With a `shard` of a
    process group every rank must call this with the same arguments: each probes its
    share of the prompts (on `device`), and rank 0 reads and writes the results file.
    Rank 0 returns every row of the file; the other ranks return this call's new rows.
    """
    shard = shard or Shard()
    out_dir = Path(out_dir)
    everything = read_results(out_dir) if shard.is_main else []
    rows = list(everything)
    existing = [r for r in everything if _method(r) == settings.method]  # the other methods' rows stay as they are
    sid = settings_id(settings, prompts)
    done = complete_groups(existing, len(prompts))
    others = sorted(map(str, {r.get("settings_id") for r in existing} - {sid}))
    ours = {(src.name, src.step): src.source_id for src in sources}
    clashes = sorted({r["checkpoint"] for r in everything
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
    # Counts (block, mask, prompt) rows, this rank's share, as the solver finishes each chunk.
    with tqdm(total=0, desc=desc, unit="row", leave=leave, disable=not (progress and shard.is_main)) as bar:
        for source in sources:
            model = None
            for context in contexts:
                bar.set_postfix_str(f"{source.name} {context}")
                run_settings = dataclasses.replace(settings, context=context)
                if model is None:
                    model = source.load(tokenizer_hash, device)
                    blocks = parse_blocks(blocks_spec, model.n_blocks)
                    pinv = torch.linalg.pinv(model.embedding_matrix.detach())  # once per checkpoint
                    bar.total += len(contexts) * len(blocks) * len(masks) * len(mine)
                    bar.refresh()
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
                                              pinv=pinv, prompt_indices=mine if shard.world_size > 1 else None,
                                              on_chunk=bar.update)
                        except FloatingPointError as err:
                            raise FloatingPointError(f"probing {source.name} ({context} context): {err}") from None

                    new = gather_rows(shard, compute)
                    if shard.world_size > 1:
                        new = single_process_order(new)
                    for row in new:
                        row.update(settings_id=sid, source_id=source.source_id)
                    gathered.extend(new)
                    redo = {(source.source_id, context, k, m) for k in todo_blocks for m in todo_masks}
                    rows = [r for r in rows if _method(r) != settings.method
                            or (r["source_id"], r["context"], r["block"], r["mask"]) not in redo] + new
                    if shard.is_main:
                        write_results(out_dir, rows)
                bar.update(len(blocks) * len(masks) * len(mine) - sum(  # work found done counts as done
                    len(b) * len(m) * len(mine) for m, b in missing.items()))
    return rows if shard.is_main else gathered
