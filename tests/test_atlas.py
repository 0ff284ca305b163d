"""The atlas (python -m lmrep.atlas): presets and overrides, claim rules on hand-made cells, a tiny run's outputs,
skip-if-done and resume, the run-time estimate, and the smoke preset end to end (slow)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmrep.atlas.claims import DEPENDS, FAILS, HOLDS, UNTESTED, VERDICTS, explain, judge, judge_claims, matches
from lmrep.atlas.cli import PRESET_DIR, main, parse
from lmrep.atlas.preset import SOURCE_PROMPT, Claim, Protocol, Schedule, resolve_blocks
from lmrep.atlas.table import atlas_fields
from lmrep.runs import read_results
from tests.corpus import local_stories_dir

PROTOCOLS = [Protocol("padded", "padded, all free", context="padded", free="all", source=True),
             Protocol("padded_real", "padded, padding held", context="padded", free="real"),
             Protocol("exact", "the ceiling", context="padded", free="all", method="exact")]


def cell(protocol: str, **facts: Any) -> dict[str, Any]:
    """A hand-made atlas cell: an untrained flat mixer d=512, n=8, block 1, mask 1, step 0, unless told."""
    base = {"protocol": protocol, "trained": False, "family": "mixer", "arch": "flat", "d_model": 512,
            "n_blocks": 8, "seed": 0, "step": 0, "final_step": 0, "block": 1, "mask": 1,
            "self_acc": 1.0, "nonself_acc": 1.0}
    return {**base, **facts}


THRESHOLD = {"where": {"trained": False, "arch": "flat", "d_model": 512, "block": 1, "mask": 1},
             "metric": "nonself_acc", "reduce": "mean", "op": ">=", "value": 0.9}


# --- claim rules on hand-made cells: every verdict -----------------------------------------------------------

def test_threshold_rule_holds_fails_and_has_no_cells() -> None:
    good = [cell("padded", nonself_acc=0.95), cell("padded", seed=1, nonself_acc=0.97)]
    bad = [cell("padded", nonself_acc=0.5), cell("padded", seed=1, nonself_acc=0.6)]
    assert judge(THRESHOLD, good, "padded").result is True
    assert judge(THRESHOLD, bad, "padded").result is False
    assert judge(THRESHOLD, good, "exact").result is None  # no cell of that protocol
    assert judge(THRESHOLD, [cell("padded", d_model=256)], "padded").result is None  # no cell of that width
    # The evidence names the cells and the value that decided.
    evidence = judge(THRESHOLD, bad, "padded").evidence
    assert "over 2 cells = 0.550" in evidence[0] and any("d=512" in line for line in evidence[1:])


def test_every_verdict_from_a_table_built_to_give_it() -> None:
    claims = [Claim(1, "holds", THRESHOLD), Claim(2, "fails", THRESHOLD), Claim(3, "depends", THRESHOLD),
              Claim(4, "untested", {**THRESHOLD, "where": {**THRESHOLD["where"], "d_model": 1024}})]
    tables = {
        HOLDS: [cell("padded", nonself_acc=0.95), cell("exact", nonself_acc=1.0)],
        FAILS: [cell("padded", nonself_acc=0.2), cell("exact", nonself_acc=0.3)],
        DEPENDS: [cell("padded", nonself_acc=0.2), cell("padded_real", nonself_acc=0.95), cell("exact")],
        UNTESTED: [cell("padded"), cell("exact")],
    }
    names = [p.name for p in PROTOCOLS]
    got = {}
    for claim, (expected, cells) in zip(claims, tables.items()):
        got[expected] = judge_claims([claim], cells, names)[0].verdict
    assert got == {v: v for v in VERDICTS}


def test_depends_on_protocol_names_the_difference_from_the_source() -> None:
    cells = [cell("padded", nonself_acc=0.2), cell("padded_real", nonself_acc=0.95), cell("exact", nonself_acc=1.0)]
    verdict = judge_claims([Claim(2, "c", THRESHOLD)], cells, [p.name for p in PROTOCOLS])[0]
    assert verdict.verdict == DEPENDS
    assert {p: j.result for p, j in verdict.by_protocol.items()} == {"padded": False, "padded_real": True,
                                                                      "exact": True}
    text = explain(verdict, PROTOCOLS)
    assert "source's own protocol (padded) it fails" in text
    assert "padded_real (free all -> real)" in text and "exact (method embedding -> exact)" in text


def test_an_untested_claim_says_when_part_of_it_was_measured() -> None:
    wider = {**THRESHOLD, "where": {**THRESHOLD["where"], "d_model": 1024}}
    cells = [cell("padded", nonself_acc=0.95)]
    names = ["padded"]
    half = judge_claims([Claim(9, "d=512 holds and d=1024 too", {"all": [THRESHOLD, wider]})], cells, names)[0]
    assert half.verdict == UNTESTED
    text = explain(half, PROTOCOLS)
    assert text.startswith("partly measured") and "'d_model': 1024" in text and "'d_model': 512" not in text
    none = judge_claims([Claim(7, "d=1024", wider)], cells, names)[0]
    assert explain(none, PROTOCOLS) == "no cells at this scale"


def test_a_claim_can_be_limited_to_some_protocols() -> None:
    cells = [cell("padded", nonself_acc=0.2), cell("exact", nonself_acc=1.0)]
    verdict = judge_claims([Claim(2, "c", THRESHOLD, protocols=["exact"])], cells, ["padded", "exact"])[0]
    assert verdict.verdict == HOLDS and list(verdict.by_protocol) == ["exact"]


def test_compare_rule_and_all_rule() -> None:
    compare = {"compare": {"a": {"arch": "expanded", "mask": ">=1"}, "b": {"arch": "flat", "mask": ">=1"}},
               "metric": "nonself_acc", "reduce": "mean", "op": "<=", "value": -0.2}
    flat = [cell("padded", nonself_acc=0.9), cell("padded", mask=3, nonself_acc=0.8)]
    assert judge(compare, flat + [cell("padded", arch="expanded", nonself_acc=0.5)], "padded").result is True
    assert judge(compare, flat + [cell("padded", arch="expanded", nonself_acc=0.8)], "padded").result is False
    assert judge(compare, flat, "padded").result is None  # side a has no cells
    # mask 0 is not ">=1": an expanded cell there does not count.
    assert judge(compare, flat + [cell("padded", arch="expanded", mask=0, nonself_acc=0.0)], "padded").result is None
    both = {"all": [THRESHOLD, {**THRESHOLD, "metric": "self_acc", "value": 0.99}]}
    assert judge(both, [cell("padded", nonself_acc=0.95, self_acc=1.0)], "padded").result is True
    assert judge(both, [cell("padded", nonself_acc=0.95, self_acc=0.5)], "padded").result is False
    missing = {"all": [THRESHOLD, {**THRESHOLD, "where": {"d_model": 64}}]}
    assert judge(missing, [cell("padded", nonself_acc=0.95)], "padded").result is None  # a part untested
    assert judge(missing, [cell("padded", nonself_acc=0.1)], "padded").result is False  # a failing part decides


def test_where_matching_last_lists_comparisons_and_empty_metrics() -> None:
    c = cell("padded", trained=True, block=8, n_blocks=8, step=500, final_step=500)
    assert matches(c, {"block": "last", "step": "last"})
    assert not matches(cell("padded", step=4, final_step=500, trained=True), {"step": "last"})
    assert matches(c, {"d_model": ">=32", "block": [2, 8]}) and not matches(c, {"d_model": "<512"})
    rule = {"where": {"free": "masked"}, "metric": "self_acc", "reduce": "min", "op": ">=", "value": 0.9}
    # free=masked has no self positions: its empty self cells do not count.
    assert judge(rule, [cell("padded", free="masked", self_acc=None)], "padded").result is None
    with pytest.raises(ValueError, match="unknown rule op"):
        judge({**THRESHOLD, "op": "=="}, [cell("padded")], "padded")


# --- presets, overrides and the pieces of a stage ------------------------------------------------------------

def test_schedule_blocks_and_protocol_masks() -> None:
    assert Schedule(every=100, log_until=64).steps(300) == [0, 1, 2, 4, 8, 16, 32, 64, 100, 200, 300]
    assert Schedule(every=4, log_until=0).steps(10) == [0, 4, 8, 10]
    with pytest.raises(ValueError, match="every >= 1"):
        Schedule(every=0).steps(10)
    assert resolve_blocks([1, "last", 1], 8) == [1, 8]
    with pytest.raises(ValueError, match="out of range"):
        resolve_blocks([9], 8)
    assert Protocol("m", "", context="padded", free="masked").masks([0, 1, 3]) == [1, 3]
    assert Protocol("e", "", method="exact", max_mask=1).masks([0, 1, 3, 10]) == [0, 1]


def test_preset_overrides_from_the_command_line(tmp_path: Path) -> None:
    preset, out, stages = parse(["--preset", "smoke", "--out", str(tmp_path), "--trained.max_steps", "3",
                                 "--prompts.stories=2", "--probe.steps", "7", "--stages", "[untrained]"])
    assert (preset.name, preset.trained.max_steps, preset.prompts.stories, preset.probe.steps) == \
        ("smoke", 3, 2, 7)
    assert out == tmp_path and stages == ["untrained"]
    default, _, _ = parse(["--preset", "smoke", "--out", str(tmp_path)])
    assert default.trained.max_steps == yaml.safe_load((PRESET_DIR / "smoke.yaml").read_text())["trained"]["max_steps"]
    assert default.probe.steps != 7 and default.trained.schedule == preset.trained.schedule
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        parse(["--preset", "nope", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown stage"):
        parse(["--preset", "smoke", "--out", str(tmp_path), "--stages", "[fly]"])


def test_bad_input_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--preset", "smoke", "--out", str(tmp_path), "--device", "tpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "tpu" in err[0]


@pytest.mark.parametrize("name", ["smoke", "cpu", "gpu"])
def test_every_preset_parses_and_names_every_claim(name: str, tmp_path: Path) -> None:
    preset, _, _ = parse(["--preset", name, "--out", str(tmp_path)])
    assert [c.id for c in preset.claims] == list(range(1, 11))
    assert preset.prompts.extra[0] == SOURCE_PROMPT
    assert {p.name for p in preset.protocols} == {"prompt", "padded", "padded_real", "masked", "exact"}
    assert sum(p.source for p in preset.protocols) == 1
    steps = preset.trained.schedule.steps(preset.trained.max_steps)
    assert steps[:4] == [0, 1, 2, 4] and steps[-1] == preset.trained.max_steps  # log-spaced, then every N
    if name != "smoke":
        assert preset.prompts.stories >= 32
        families = {f.name for f in preset.trained.families}
        assert families == {"llama", "flat", "expanded", "parallel"}
        flat = {d for w in preset.untrained if w.config.get("mixing") == "flat" for d in w.d_models}
        assert {32, 64, 128, 256, 512} <= flat
    if name == "gpu":
        assert 1024 in flat and preset.trained.d_models == [256, 512]
        assert any(w.config.get("n_blocks") == 24 for w in preset.untrained)
        for sweep in preset.untrained:
            assert len(sweep.seeds) == 3, sweep.name  # seed-averaged over 3 model seeds


# --- a tiny atlas through the real command: outputs, skip-if-done, resume ------------------------------------

def tiny_preset(tmp_path: Path, cache: Path) -> Path:
    """The smoke preset cut to one untrained sweep of one width, 2 prompts, 2 protocols and no training."""
    preset = yaml.safe_load((PRESET_DIR / "smoke.yaml").read_text())
    preset["name"] = "tiny"
    preset["data"] = {"source": "local", "data_dir": str(local_stories_dir()), "cache_dir": str(cache)}
    preset["prompts"] = {"stories": 1, "tokens": 12}
    preset["probe"] = {"steps": 5}
    preset["protocols"] = [p for p in preset["protocols"] if p["name"] in ("padded", "exact")]
    preset["untrained"] = [{"name": "flat-n1", "family": "mixer",
                            "config": {"mixing": "flat", "n_blocks": 1, "context_length": 16},
                            "d_models": [32], "seeds": [0, 1], "blocks": [1]}]
    preset["masks"] = [0, 1]
    preset["trained"]["families"] = []
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path


def test_tiny_atlas_writes_every_output_and_skips_what_is_done(tmp_path: Path, data_cache: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    config, out = tiny_preset(tmp_path, data_cache), tmp_path / "atlas"
    assert main(["--preset", str(config), "--out", str(out)]) == 0
    first = capsys.readouterr().out
    assert first.count(" probed: ") == 2 and "done already" not in first
    for name in ("atlas.csv", "atlas_columns.json", "claims.json", "report.md", "report.html", "atlas_times.json"):
        assert (out / name).is_file(), name
    with (out / "atlas.csv").open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == atlas_fields()
    # One row per protocol x seed x block x mask: padded (masks 0, 1) and exact (masks 0, 1), 2 seeds, block 1.
    keys = {(r["protocol"], r["seed"], r["block"], r["mask"]) for r in rows}
    assert len(rows) == len(keys) == 2 * 2 * 1 * 2
    assert {r["n_prompts"] for r in rows} == {"2"}  # the source's prompt and one story
    assert {r["method"] for r in rows} == {"embedding", "exact"}
    claims = json.loads((out / "claims.json").read_text())
    assert [c["id"] for c in claims] == list(range(1, 11))
    assert all(c["verdict"] in VERDICTS and set(c["by_protocol"]) == {"padded", "exact"} for c in claims)
    assert claims[0]["by_protocol"]["exact"]["cells"]  # claim 1 (d >= 32, block 1, self) has cells here
    report = (out / "report.md").read_text()
    assert "## Claims" in report and "Mario, the Idea" in report  # the source's prompt, cut to 12 tokens
    times = json.loads((out / "atlas_times.json").read_text())
    assert times["untrained"] > 0

    # The same command again does no work: every stage is found done, the times are unchanged.
    results = sorted(out.glob("untrained/*/*/results.jsonl"))
    before = {p: p.read_text() for p in results}
    assert main(["--preset", str(config), "--out", str(out)]) == 0
    second = capsys.readouterr().out
    assert second.count("done already") == 2 and " probed: " not in second
    assert {p: p.read_text() for p in results} == before
    assert json.loads((out / "atlas_times.json").read_text()) == times

    # A killed run resumes: with the last rows of one folder gone, only that folder probes again.
    victim = next(p for p in results if p.parent.name.startswith("padded-"))
    lines = before[victim].splitlines(keepends=True)
    victim.write_text("".join(lines[: len(lines) // 2]))
    assert main(["--preset", str(config), "--out", str(out)]) == 0
    third = capsys.readouterr().out
    assert third.count(" probed: ") == 1 and third.count("done already") == 1
    assert len(read_results(victim.parent)) == len(lines)


def test_estimate_counts_the_work_and_writes_it(tmp_path: Path, data_cache: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    config, out = tiny_preset(tmp_path, data_cache), tmp_path / "atlas"
    assert main(["--preset", str(config), "--out", str(out), "--estimate"]) == 0
    text = capsys.readouterr().out
    # 2 seeds x 2 prompts x block 1 x masks 0, 1 = 8 rows under each protocol; nothing trained or probed.
    lines = [line for line in text.splitlines() if "flat-n1 d=32" in line]
    assert len(lines) == 2 and all(" 8 probe rows " in line for line in lines)
    seconds_each = [float(line.split(" x ")[1].split(" s ")[0]) for line in lines]
    assert all(s > 0 for s in seconds_each)  # measured, not assumed
    total = next(line for line in text.splitlines() if line.strip().startswith("total:"))
    assert total in (out / "estimate.txt").read_text()
    assert not (out / "untrained").exists() and not (out / "atlas.csv").exists()  # an estimate runs no stage


# --- the smoke preset end to end ------------------------------------------------------------------------------

@pytest.mark.slow
def test_smoke_preset_end_to_end(tmp_path: Path, data_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "atlas"
    args = ["--preset", "smoke", "--out", str(out), "--data.source", "local", "--data.data_dir",
            str(local_stories_dir()), "--data.cache_dir", str(data_cache)]
    assert main(args) == 0
    first = capsys.readouterr().out
    preset, _, _ = parse(args)
    n_protocols = len(preset.protocols)
    n_dirs = n_protocols * (len(preset.untrained) + len(preset.trained.families) * len(preset.trained.d_models))
    assert first.count(" probed: ") == n_dirs
    assert first.count(": trained: ") == len(preset.trained.families)
    assert "Epoch 0:" in first  # tqdm's training bar (Rich, in a non-terminal, writes only "Epoch 0/-2" at the end)
    cells = list(csv.DictReader((out / "atlas.csv").open()))
    assert {c["protocol"] for c in cells} == {p.name for p in preset.protocols}
    assert {c["stage"] for c in cells} == {"untrained", "trained probes"}
    trained_steps = {int(c["step"]) for c in cells if c["stage"] == "trained probes"}
    assert trained_steps == set(preset.trained.schedule.steps(preset.trained.max_steps))
    claims = json.loads((out / "claims.json").read_text())
    assert [c["id"] for c in claims] == [c.id for c in preset.claims]
    assert all(c["verdict"] in VERDICTS for c in claims)
    # Claim 1 (untrained mixers, block 1, self) has cells at this scale, so a verdict other than untested.
    assert claims[0]["verdict"] != UNTESTED and claims[0]["by_protocol"]["exact"]["cells"]
    for name in ("untrained_vs_width", "validation_loss", "gd_vs_ceiling", "families_vs_step", "curves_flat-d32",
                 "heatmap_llama-d32"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000, name
    report = (out / "report.md").read_text()
    for claim in preset.claims:
        assert f"| {claim.id} | {claim.text} |" in report
    assert "source author's" in report and (out / "report.html").stat().st_size > 10_000
    for family in preset.trained.families:
        run = next(out.glob(f"trained/{family.name}-d32-*"))
        assert (run / "train.done").is_file() and list((run / "wandb").glob("offline-run-*"))

    assert main(args) == 0  # again: nothing trains or probes
    second = capsys.readouterr().out
    assert " probed: " not in second and ": trained: " not in second
    assert second.count("done already") == n_dirs + len(preset.trained.families)
