"""Smoke runs of every benchmark script at tiny sizes, so they cannot rot.

No timings are asserted (the machine is shared); only that each script runs
end to end and writes its JSON with the keys the results page is built from.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import exact_vs_gd, memory, probe_vs_source, scaling, train_overhead

TINY_MODEL = ["--d", "32", "--blocks", "2", "--context", "32"]


def read(path: Path) -> dict:
    payload = json.loads(path.read_text())
    assert payload["machine"]["threads"] >= 1
    return payload


def test_probe_vs_source_smoke(tmp_path: Path, data_cache: Path) -> None:
    out = tmp_path / "pvs.json"
    probe_vs_source.main([*TINY_MODEL, "--prompts", "3", "--prompt-len", "6", "--steps", "12",
                          "--source-prompts", "1", "--train-steps", "2", "--train-batch", "4", "--patience", "10",
                          "--cache-dir", str(data_cache), "--out", str(out)])
    payload = read(out)
    assert payload["matmul_gflops"] > 0
    rows = payload["rows"]
    assert {(r["family"], r["state"]) for r in rows} == {(f, s) for f in ("mixer", "llama")
                                                          for s in ("untrained", "trained")}
    runners = {(r["runner"], r["context"]) for r in rows}
    assert ("source", "padded") in runners and ("lmrep defaults", "padded") in runners
    assert ("lmrep patience=10", "prompt") in runners
    for r in rows:
        assert r["seconds"] > 0 and r["speedup"] > 0
        assert 0 <= r["self"] <= 1 and 0 <= r["nonself"] <= 1
        assert set(r["per_block"]) == {f"{k}/{m}" for k in (1, 2) for m in (0, 1)}
    assert ("lmrep patience=10 free=real", "padded") in runners
    assert len(payload["prompts"]) == 3 and len(payload["prompts"][0]) == 6

    # The same prompts again without any data (as on a GPU machine): untrained models need none.
    again = tmp_path / "again.json"
    probe_vs_source.main([*TINY_MODEL, "--prompts", "3", "--prompt-len", "6", "--steps", "4", "--source-prompts", "1",
                          "--families", "mixer", "--states", "untrained", "--prompts-from", str(out),
                          "--cache-dir", str(tmp_path / "no-data-here"), "--out", str(again)])
    assert read(again)["prompts"] == payload["prompts"]
    assert not (tmp_path / "no-data-here").exists()


def test_train_overhead_smoke(tmp_path: Path, data_cache: Path) -> None:
    out = tmp_path / "train.json"
    train_overhead.main([*TINY_MODEL, "--families", "mixer", "--batch", "4", "--steps", "4",
                         "--warmup", "1", "--repeats", "1", "--cache-dir", str(data_cache), "--out", str(out)])
    payload = read(out)
    runners = {r["runner"]: r for r in payload["rows"]}
    assert set(runners) == {"plain", "lightning/full"}
    for r in runners.values():
        assert r["tokens_per_s"] > 0 and r["utilisation"] > 0
    assert runners["plain"]["overhead"] == 0
    assert payload["loader_seconds_per_batch"] > 0


def test_scaling_smoke(tmp_path: Path, data_cache: Path) -> None:
    out = tmp_path / "scaling.json"
    scaling.main([*TINY_MODEL, "--prompt-len", "6", "--prompt-counts", "1", "2", "--block-counts", "1", "2",
                  "--fixed-prompts", "2", "--steps", "2", "--cache-dir", str(data_cache), "--out", str(out)])
    payload = read(out)
    assert [r["prompts"] for r in payload["by_prompts"]] == [1, 2]
    assert [r["blocks"] for r in payload["by_blocks"]] == [1, 2]
    assert payload["by_blocks"][1]["work_ratio"] == 3  # blocks 1..2 cost 1 + 2 block passes vs 1
    assert all(r["seconds"] > 0 for r in payload["by_prompts"] + payload["by_blocks"])


def test_memory_smoke(tmp_path: Path, data_cache: Path) -> None:
    out = tmp_path / "memory.json"
    memory.main([*TINY_MODEL, "--families", "mixer", "--prompts", "2", "--prompt-len", "6", "--steps", "1",
                 "--batch", "4", "--cache-dir", str(data_cache), "--out", str(out)])
    rows = read(out)["rows"]
    assert [r["task"] for r in rows] == ["baseline", "probe-prompt", "probe-padded", "train"]
    assert all(r["peak_rss_mib"] > 50 for r in rows)  # a Python process with torch loaded


@pytest.mark.slow  # ~70 s on 2 cores: eight exact and gradient probes and a 2-step training per family
def test_exact_vs_gd_smoke(tmp_path: Path, data_cache: Path) -> None:
    out = tmp_path / "exact.json"
    exact_vs_gd.main(["--d", "16", "--blocks", "2", "--context", "16", "--prompts", "2", "--tokens", "4",
                      "--gd-steps", "5", "--train-steps", "2", "--scaling", "--cache-dir", str(data_cache), "--out", str(out)])
    payload = read(out)
    rows = payload["rows"]
    assert {(r["family"], r["state"], r["context"]) for r in rows} == {
        (f, s, c) for f in ("mixer", "llama") for s in ("untrained", "trained 2") for c in ("prompt", "padded")}
    for r in rows:
        assert r["gd"] > 0 and r["exact"] > 0 and r["fast == fallback"] is True
        # every scored position falls in exactly one class
        for region in ("self", "nonself"):
            assert abs(sum(r[f"{region} {k}"] for k in ("recovered", "missed", "lost", "tie")) - 1) < 1e-9
    assert {s["axis"] for s in payload["scaling"]} == {"tokens", "vocab", "depth"}
