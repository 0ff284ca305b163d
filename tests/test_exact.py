"""The exact solver (method=exact): identifiability against a brute-force reference and planted cases."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from lmrep.probe import ExactSolver, ProbeSettings, probe
from lmrep.probe.exact import position_losses
from lmrep.probe.rows import STREAM_SHIFT, prompt_noise
from models import LlamaLM, LlamaModelConfig, MaskedMixer, MixerConfig
from models.surface import SurfaceModel
from tests.toy_family import ToyConfig, ToyLM

PAD = 1
EXACT = ProbeSettings(method="exact")


def mixer(vocab: int = 128, d: int = 32, n: int = 2, length: int = 12, mixing: str = "flat") -> MaskedMixer:
    torch.manual_seed(0)
    return MaskedMixer(MixerConfig(vocab_size=vocab, d_model=d, n_blocks=n, context_length=length, mixing=mixing,
                                   expansion=2)).eval()


def llama(vocab: int = 128, d: int = 32, n: int = 2, length: int = 12) -> LlamaLM:
    torch.manual_seed(0)
    return LlamaLM(LlamaModelConfig(vocab_size=vocab, d_model=d, n_blocks=n, n_heads=4, n_kv_heads=2,
                                    context_length=length)).eval()


def prompts(n: int, t: int, vocab: int, seed: int = 0) -> Tensor:
    return torch.randint(2, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def run(model: SurfaceModel, ids: Tensor, *, blocks: list[int], masks: list[int], context: str = "prompt",
        solver: ExactSolver | None = None, **settings: object):
    return probe(model, ids, blocks=blocks, masks=masks, pad_token_id=PAD, solver=solver,
                 settings=ProbeSettings(method="exact", context=context, **settings))


@pytest.mark.parametrize("build", [lambda: mixer(vocab=512, d=32, n=4), lambda: llama(vocab=512, d=64, n=4)],
                         ids=["flat mixer d=32", "llama d=64"])
def test_untrained_models_identify_every_self_position_at_blocks_1_and_n(build) -> None:
    model = build()
    result = run(model, prompts(3, 8, 512), blocks=[1, model.n_blocks], masks=[0])
    assert result.self_identifiable.tolist() == [1.0] * 6
    assert (result.identifiable == 1).all() and (result.true_rank == 1).all()
    assert (result.recovered_ids == result.target_ids).all()
    assert float(result.min_margin.min()) > 0 and result.exhaustive.all()


def brute_force(model: SurfaceModel, ids: Tensor, block: int, mask: int, context: str, prompt_index: int,
                settings: ProbeSettings = EXACT) -> dict[str, list]:
    """The definition, by a full forward of the whole sequence for every candidate at every position (no fast path)."""
    t_prompt = ids.shape[0]
    t_ctx = model.context_length if context == "padded" else t_prompt
    full = torch.full((t_ctx,), PAD, dtype=torch.long)
    full[:t_prompt] = ids
    vocab, d = model.embedding_matrix.shape
    with torch.no_grad():
        target = model.hidden(model.embed(full[None]), block)[0]  # (Tc, d)
        shift = prompt_noise([prompt_index], (model.context_length, d), settings.seed, STREAM_SHIFT,
                             torch.device("cpu"), torch.float32)[0, :t_ctx]
        shift = shift * settings.baseline_shift * float(model.embedding_matrix.std())
        base_pos = position_losses(model.hidden(model.embed(full[None]) + shift, block)[0], target, settings)
        out: dict[str, list] = {"best": [], "rank": [], "margin": [], "identifiable": []}
        for t in range(t_prompt):
            trial = full[None].repeat(vocab, 1)
            trial[:, t] = torch.arange(vocab)
            pos = position_losses(model.hidden(model.embed(trial), block), target[None], settings)  # (V, Tc)
            if t >= mask:
                dist, threshold = pos[:, t], base_pos[t]
            else:
                dist, threshold = pos[:, mask:].mean(1), base_pos[mask:].mean()
            true = int(ids[t])
            wrong = dist.clone()
            wrong[true] = math.inf
            out["best"].append(int(dist.argmin()))
            out["rank"].append(1 + int((wrong < dist[true]).sum()))
            out["margin"].append(float(wrong.min() - dist[true]))
            out["identifiable"].append(int(bool(wrong.min() > dist[true]) and bool(wrong.min() > threshold)))
    return out


@pytest.mark.parametrize("build", [lambda: mixer(vocab=40, d=16, n=2, length=8),
                                   lambda: llama(vocab=40, d=16, n=2, length=8)], ids=["flat mixer", "llama"])
@pytest.mark.parametrize("context", ["prompt", "padded"])
def test_exact_agrees_with_brute_force_for_self_and_one_masked_position(build, context: str) -> None:
    model = build()
    ids = prompts(2, 5, 40, seed=1)
    result = run(model, ids, blocks=[1, 2], masks=[0, 1], context=context)
    for r in range(len(result.block)):
        want = brute_force(model, ids[int(result.prompt_index[r])], int(result.block[r]), int(result.mask[r]),
                           context, int(result.prompt_index[r]))
        assert result.recovered_ids[r].tolist() == want["best"]
        assert result.true_rank[r].tolist() == want["rank"]
        torch.testing.assert_close(result.margins[r].double(), torch.tensor(want["margin"], dtype=torch.float64),
                                   atol=1e-5, rtol=1e-4)
        assert result.identifiable[r].tolist() == want["identifiable"]


def test_a_planted_collision_is_not_identifiable_and_has_zero_margin() -> None:
    model = mixer(vocab=64, d=32, n=2)
    a, b = 10, 20
    with torch.no_grad():
        model.embedding.weight[b] = model.embedding.weight[a]  # two tokens, one embedding
    ids = torch.tensor([[5, a, 7, 8, b, 9, 11]])
    result = run(model, ids, blocks=[1, 2], masks=[0])
    colliding = (ids == a) | (ids == b)
    for r in range(2):
        assert result.identifiable[r][colliding[0]].tolist() == [0, 0]
        assert result.margins[r][colliding[0]].abs().max() < 1e-5
        assert (result.identifiable[r][~colliding[0]] == 1).all()


def test_a_planted_non_self_loss_hides_position_0_and_restoring_it_shows_it() -> None:
    model = mixer(vocab=64, d=32, n=2)
    ids = prompts(2, 6, 64)
    assert (run(model, ids, blocks=[1, 2], masks=[1]).nonself_identifiable == 1).all()
    with torch.no_grad():
        for block in model.blocks:
            block.mix.mix.weight[1:, 0] = 0.0  # no later position reads position 0, in any block
    cut = run(model, ids, blocks=[1, 2], masks=[1])
    assert (cut.nonself_identifiable == 0).all() and (cut.identifiable[:, 0] == 0).all()
    assert cut.margins[:, 0].abs().max() < 1e-6  # every candidate at 0 gives the same outputs at 1..
    assert (cut.self_identifiable == 1).all()  # the visible positions are untouched


FAMILIES = {
    "flat": lambda: mixer(vocab=48, d=16, n=2, length=8),
    "expanded": lambda: mixer(vocab=48, d=16, n=2, length=8, mixing="expanded"),
    "parallel": lambda: mixer(vocab=48, d=16, n=2, length=8, mixing="parallel"),
    "llama": lambda: llama(vocab=48, d=16, n=2, length=8),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("context", ["prompt", "padded"])
def test_fast_path_equals_the_generic_fallback(family: str, context: str) -> None:
    model = FAMILIES[family]()
    ids = prompts(2, 6, 48, seed=2)
    fast = run(model, ids, blocks=[1, 2], masks=[0, 1], context=context, solver=ExactSolver(PAD))
    slow = run(model, ids, blocks=[1, 2], masks=[0, 1], context=context, solver=ExactSolver(PAD, fast=False))
    assert torch.equal(fast.recovered_ids, slow.recovered_ids)
    assert torch.equal(fast.true_rank, slow.true_rank) and torch.equal(fast.identifiable, slow.identifiable)
    torch.testing.assert_close(fast.margins, slow.margins, atol=1e-5, rtol=1e-4)


def test_any_family_gets_the_generic_fallback_and_restricted_candidates() -> None:
    torch.manual_seed(0)
    model = ToyLM(ToyConfig(vocab_size=64, d_model=32, n_blocks=2, context_length=8)).eval()
    ids = prompts(2, 6, 64)
    result = run(model, ids, blocks=[2], masks=[0, 1])
    assert (result.self_identifiable == 1).all()
    allowed = sorted(set(ids.flatten().tolist()) | {2, 3})
    restricted = run(model, ids, blocks=[2], masks=[0], allowed_tokens=allowed)
    assert set(restricted.topk_ids.flatten().tolist()) <= set(allowed)
    assert (restricted.true_rank <= len(allowed)).all()
    missing = run(model, ids, blocks=[2], masks=[0], allowed_tokens=[2, 3])  # the true tokens are not candidates
    assert (missing.identifiable == 0).all()


def test_several_masked_positions_are_searched_and_marked_not_exhaustive() -> None:
    model = mixer(vocab=64, d=32, n=1)
    ids = prompts(1, 6, 64)
    result = run(model, ids, blocks=[1], masks=[1, 3], context="padded")
    by_mask = {int(m): r for r, m in enumerate(result.mask)}
    assert bool(result.exhaustive[by_mask[1]]) and not bool(result.exhaustive[by_mask[3]])
    assert int(result.steps_run[by_mask[3]]) >= 2  # at least one sweep that changed nothing
    assert (result.true_rank[by_mask[3]] >= 1).all()


def _rows(model: SurfaceModel, ids: Tensor, settings: ProbeSettings, **kw: object) -> list[dict]:
    """Plain rows as a run writes them (the columns the report reads)."""
    rows = []
    for context in ("prompt", "padded"):
        result = probe(model, ids, pad_token_id=PAD, settings=ProbeSettings(**{**vars(settings), "context": context}),
                       **kw)
        for row in result.rows():
            row.update(step=0, checkpoint="init", family=model.family, source_id="s", settings_id=settings.method,
                       prompt="p", target_tokens=[f"t{i}" for i in row["target_ids"]],
                       recovered_tokens=[f"t{i}" for i in row["recovered_ids"]])
            rows.append(row)
    return rows


def test_gradient_recovery_of_a_not_identifiable_position_is_a_reported_tie(tmp_path) -> None:
    from lmrep import ceiling
    from lmrep.report import write_report

    grid = dict(blocks=[1, 2], masks=[0, 1])
    model = mixer(vocab=64, d=32, n=2)
    ids = prompts(3, 6, 64)
    gd = ProbeSettings(lr=0.05, steps=200)
    rows = _rows(model, ids, gd, **grid) + _rows(model, ids, EXACT, **grid)
    counts = ceiling.class_counts(rows)
    assert len(counts) == 2 * 2 * 2 and all(c["compared"] for c in counts)
    assert sum(c["self_tie"] + c["nonself_tie"] for c in counts) == 0  # untrained: GD never beats the ceiling
    assert sum(c["self_recovered"] for c in counts) > 0

    a, b = 10, 20
    with torch.no_grad():
        model.embedding.weight[b] = model.embedding.weight[a]
    ids = torch.tensor([[5, a, 7, 8, b, 9]])
    rows = _rows(model, ids, gd, blocks=[1], masks=[0]) + _rows(model, ids, EXACT, blocks=[1], masks=[0])
    classified = ceiling.classified_rows(rows)
    assert len(classified) == 2  # the gradient rows, each with its exact partner
    for row, classes in classified:
        for pos, cls in enumerate(classes):
            if row["target_ids"][pos] in (a, b):
                assert cls in ("tie", "lost")  # a decode of a or b is a coin toss between equals
            else:
                assert cls == "recovered"
    ties = sum(cls == "tie" for _, classes in classified for cls in classes)
    assert ties >= 1 and sum(c["self_tie"] for c in ceiling.class_counts(rows)) == ties  # counted, never silent
    files = write_report(rows, tmp_path)
    html = (tmp_path / "report.html").read_text()
    assert "class=\"tie\"" in html and "positions per class" in html
    assert (tmp_path / "classes.csv").read_text().splitlines()[0].startswith("step,block,mask,context,compared")
    assert files["classes"].exists()


def test_probe_cli_method_exact_end_to_end(tmp_path, data_cache) -> None:
    import json

    from lmrep.probe_cli import main as probe_main
    from lmrep.runs import read_results
    from tests.conftest import tiny_config

    config = tiny_config(tmp_path / "flat.yaml", "flat", tmp_path / "run", data_cache, steps=1, every=1, d=32)
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("Once upon a time, there was a dog.\nLily liked to play in the park.\n")
    out = tmp_path / "probe"
    common = ["--init", str(config), "--prompts", str(prompt_file), "--mask", "0,1", "--context", "padded",
              "--blocks", "all", "--out", str(out), "--no-wandb"]
    assert probe_main([*common, "--steps", "100"]) == 0  # gradient rows first
    assert probe_main([*common, "--method", "exact"]) == 0  # exact rows beside them, in the same results file
    rows = read_results(out)
    exact = [r for r in rows if r["method"] == "exact"]
    assert len(exact) == len(rows) // 2 == 2 * 2 * 2  # blocks x masks x prompts
    assert len({r["settings_id"] for r in rows}) == 2  # one settings id per method
    assert all(r["self_identifiable"] == 1.0 and r["exhaustive"] for r in exact)
    assert all("self_identifiable" not in r for r in rows if r["method"] != "exact")
    summary = json.loads((out / "summary.json").read_text())
    assert {s["method"] for s in summary} == {"embedding", "exact"}
    assert all((s["self_identifiable"] is None) == (s["method"] != "exact") for s in summary)
    html = (out / "report.html").read_text()
    assert "identifiable (exact)" in html and "positions per class" in html
    assert probe_main([*common, "--method", "exact"]) == 0  # nothing left to do
    assert len(read_results(out)) == len(rows)
