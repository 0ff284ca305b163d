"""Probing runs: models and prompts in, result rows on disk.

Sits between the engine (`lmrep.probe`, tensors only) and the report: it turns
text prompts into token ids, probes a model (an untrained one, one checkpoint,
or a directory of them in step order), adds the text and identity of every row,
and keeps `results.jsonl` up to date atomically after every checkpoint so that
an interrupted run resumes where it stopped and a re-run skips finished work.

A run can be sharded over the processes of a `torch.distributed` process group
(set up by Lightning: Fabric in probe.py, the Trainer's strategy in training):
each rank probes its share of the prompts with their global prompt indices, so
every prompt gets the start noise it gets alone; rank 0 gathers the rows, puts
them in the single-process order and writes the results file. A prompt's
numbers depend only on (seed, prompt index), patience or not, so a
sharded run writes the rows a single process writes: the same decoded tokens and
accuracies, and floats equal up to rounding (a BLAS may pick other kernels for
another batch shape; for small models they are bitwise equal).
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
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from data.files import write_text_atomic
from lmrep.checkpoints import list_checkpoints, load_checkpoint, read_checkpoint
from lmrep.module import CHECKPOINT_KEY
from lmrep.probe import ProbeSettings, probe

RESULTS_FILE = "results.jsonl"
# Settings that may differ between rows of one results file (they are row keys, not settings).
_ROW_KEY_SETTINGS = ("context",)


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


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    prompts = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"empty prompt set: {path} has no non-empty lines")
    return prompts


def validation_prompts(n: int, data_dir: str | Path | None = None) -> list[str]:
    """The first n TinyStories validation stories (the default prompt set)."""
    from data.tinystories import default_data_dir, read_local_stories

    stories = read_local_stories(Path(data_dir) if data_dir else default_data_dir(), "validation")
    return stories[:n]


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


def settings_id(settings: ProbeSettings, prompts: PromptSet) -> str:
    """A short hash of the requested settings and prompts: what decides a row's numbers but is not a row key.

    Taken before per-model defaults are filled in (the start scale follows each
    checkpoint's embedding std), so every checkpoint of a run shares one id.
    """
    record = {k: v for k, v in dataclasses.asdict(settings).items() if k not in _ROW_KEY_SETTINGS}
    record["prompts"] = prompts.ids.tolist()
    record["lengths"] = prompts.lengths.tolist()
    text = json.dumps(record, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def probe_rows(model: nn.Module, prompts: PromptSet, tokenizer: PreTrainedTokenizerFast, *,
               blocks: Sequence[int], masks: Sequence[int], settings: ProbeSettings, step: int,
               source: str, pinv: torch.Tensor | None = None,
               prompt_indices: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Probe one model and return one plain row per (block, mask, prompt) with its text.

    `prompt_indices` probes only those prompts of the set (with their global indices).
    """
    ids, lengths = prompts.ids, prompts.lengths
    if prompt_indices is not None:
        # Rows of the full (B, T) batch: the padded width T stays that of the whole set.
        ids, lengths = ids[list(prompt_indices)], lengths[list(prompt_indices)]
    result = probe(model, ids, blocks=blocks, masks=masks, settings=settings, prompt_indices=prompt_indices,
                   pad_token_id=tokenizer.pad_token_id, prompt_lengths=lengths, pinv=pinv)
    rows = []
    for row in result.rows():
        row["prompt"] = prompts.texts[row["prompt_index"]]
        row["recovered_text"] = tokenizer.decode(row["recovered_ids"])
        row["recovered_tokens"] = tokenizer.convert_ids_to_tokens(row["recovered_ids"])
        row["target_tokens"] = tokenizer.convert_ids_to_tokens(row["target_ids"])
        row["loss_fn"] = row.pop("loss")  # the settings' distance ("l1", ...); `loss` is the final value
        row["loss"] = row["final_loss"]
        row.update(step=step, checkpoint=source, family=model.family)
        rows.append(row)
    return rows


# ---------------------------------------------------------------- sharding

# Errors that cross ranks keep their type (probe.py turns these into one-line errors).
_SHARED_ERRORS: dict[str, type[Exception]] = {
    cls.__name__: cls for cls in (ValueError, FloatingPointError, FileNotFoundError, RuntimeError)}


@dataclass(frozen=True)
class Shard:
    """This process's part of a probe sharded over `world_size` processes (rank 0 writes the results)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> Shard:
        """The shard of this process in the initialised process group; a single process without one."""
        if dist.is_available() and dist.is_initialized():
            return cls(rank=dist.get_rank(), world_size=dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        """True on the rank that reads and writes the results file."""
        return self.rank == 0

    def prompt_indices(self, n_prompts: int) -> list[int]:
        """Global indices of this rank's prompts: a contiguous block, sizes differing by at most one."""
        base, extra = divmod(n_prompts, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return list(range(start, start + base + (self.rank < extra)))

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def _gather_rows(shard: Shard, compute: Any) -> list[dict[str, Any]]:
    """Run `compute()` on every rank and gather its rows; a failure on any rank is raised on all of them.

    Every rank reaches the gather even when its own part failed, so no rank is left
    waiting in a collective for one that died.
    """
    try:
        part, failure = compute(), None
    except Exception as err:  # noqa: BLE001 - passed on to every rank below, then raised
        if shard.world_size == 1:
            raise
        part, failure = [], (type(err).__name__, str(err))
    gathered = shard.gather((part, failure))
    failures = [(rank, f) for rank, (_, f) in enumerate(gathered) if f is not None]
    if failures:
        rank, (name, message) = failures[0]
        raise _SHARED_ERRORS.get(name, RuntimeError)(f"{message} (on rank {rank} of {shard.world_size})")
    return [row for rows, _ in gathered for row in rows]


def _single_process_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of one probe call in the engine's order: deepest block first, then mask, then prompt."""
    return sorted(rows, key=lambda r: (-r["block"], r["mask"], r["prompt_index"]))


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
    model: nn.Module | None = None

    def load(self, tokenizer_hash: str | None, device: torch.device | str | None = None) -> nn.Module:
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

                    new = _gather_rows(shard, compute)
                    if shard.world_size > 1:
                        new = _single_process_order(new)
                    for row in new:
                        row.update(settings_id=sid, source_id=source.source_id)
                    gathered.extend(new)
                    redo = {(source.source_id, context, k, m) for k in todo_blocks for m in todo_masks}
                    rows = [r for r in rows if (r["source_id"], r["context"], r["block"], r["mask"]) not in redo] + new
                    if shard.is_main:
                        write_results(out_dir, rows)
                bar.update(1)
    return rows if shard.is_main else gathered
