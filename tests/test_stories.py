"""Where the stories come from: the data package's import order, the local folder, the hub, `source: auto`."""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import pytest

import data.stories as stories
import data.tinystories as tinystories
from data.stories import (
    DATA_DIR_ENV,
    HUB_DATASET,
    HUB_STORIES,
    DataSourceError,
    hub_stories,
    read_local_stories,
    resolve_source,
)
from data.tinystories import TinyStoriesDataModule
from data.tokenizer import VOCAB_SIZE
from lmrep.cli import main as train_main
from lmrep.probe_cli import main as probe_main, parse
from lmrep.prompts import validation_prompts
from tests.conftest import REPO, tiny_config
from tests.corpus import local_stories_dir, story_maker, write_synthetic_corpus


def data_imports() -> dict[str, set[str]]:
    """Module of data/ -> the data modules it imports anywhere in it (function bodies included)."""
    graph: dict[str, set[str]] = {}
    for path in sorted((REPO / "data").glob("*.py")):
        name = f"data.{path.stem}"
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = {m for m in found if m.startswith("data.") and m != name}
    return graph


def test_the_data_package_has_no_import_cycle() -> None:
    graph = data_imports()
    assert "data.tokenizer" in graph and "data.tinystories" in graph
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module in done:
            return
        for dep in sorted(graph.get(module, ())):
            visit(dep, (*path, module))
        done.add(module)

    for module in graph:
        visit(module, ())
    assert "data.tinystories" not in graph["data.tokenizer"]  # the tokenizer reads stories through data.stories


# ---- choosing the source ------------------------------------------------------------------


@pytest.fixture(autouse=True)
def fresh_announcements() -> None:
    """Each test sees the data line of its own data modules (announce prints a line once per process)."""
    stories.announce.cache_clear()


@pytest.fixture()
def no_local_copy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A machine without a local copy: $LMREP_DATA_DIR unset, no ../shared folder (a missing path)."""
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    missing = tmp_path / "no-shared" / "tinystories"
    monkeypatch.setattr(stories, "SHARED_DATA_DIR", missing)
    return missing


class FakeHub:
    """Stands in for `datasets.load_dataset`: an endless stream of made-up stories per split, counting reads."""

    def __init__(self, offline: bool = False) -> None:
        self.offline = offline
        self.calls: list[dict[str, Any]] = []
        self.taken: dict[str, list[int]] = {}
        self.read = {"train": 0, "validation": 0}

    def __call__(self, name: str, **kwargs: Any) -> Any:
        self.calls.append({"name": name, **kwargs})
        if self.offline:
            raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")
        hub = self
        split = kwargs["split"]

        class Stream:
            def take(self, n: int) -> Iterator[dict[str, str]]:
                hub.taken.setdefault(split, []).append(n)
                return itertools.islice(self._rows(), n)

            def _rows(self) -> Iterator[dict[str, str]]:
                story = story_maker(seed=0 if split == "train" else 1)
                while True:  # the hub's 2.1M stories: endless, as far as a run is concerned
                    hub.read[split] += 1
                    yield {"text": f"  {story()}\n"}

        return Stream()


def test_auto_takes_the_local_folder_when_one_is_found(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    real = local_stories_dir()
    monkeypatch.setenv(DATA_DIR_ENV, str(real))
    hub = FakeHub()
    monkeypatch.setattr(datasets, "load_dataset", hub)
    assert resolve_source("auto", None) == ("local", real)
    assert resolve_source("auto", tmp_path) == ("local", tmp_path)  # --data.data_dir comes first
    assert resolve_source("hub", real) == ("hub", None)
    dm = TinyStoriesDataModule(cache_dir=str(tmp_path / "cache"), context_length=32)  # source auto by default
    assert dm.source == "local" and dm.data_dir == real
    assert dm.validation_texts(2) == read_local_stories(real, "validation")[:2]
    assert capsys.readouterr().err.count(f"data: the local TinyStories folder {real}") == 1
    assert hub.calls == []


def test_auto_takes_the_hub_without_a_local_copy(no_local_copy: Path) -> None:
    assert resolve_source("auto", None) == ("hub", None)


@pytest.mark.parametrize("how", ["data_dir", "env"])
def test_a_folder_asked_for_must_exist(no_local_copy: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                       how: str) -> None:
    typo = tmp_path / "tinystoris"
    if how == "env":
        monkeypatch.setenv(DATA_DIR_ENV, str(typo))
    for source in ("auto", "local"):
        with pytest.raises(DataSourceError, match=f"TinyStories folder {typo} does not exist") as info:
            resolve_source(source, typo if how == "data_dir" else None)
        assert DATA_DIR_ENV in str(info.value) and "--data.data_dir" in str(info.value)
    with pytest.raises(DataSourceError, match="does not exist"):
        resolve_source("local", None) if how == "env" else resolve_source("local", typo)
    with pytest.raises(ValueError, match="unknown data source 'web'"):
        resolve_source("web", None)


# ---- the hub: only what the run needs -------------------------------------------------------


def test_hub_streams_only_the_stories_asked_for_and_caches_them(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    hub = FakeHub()
    monkeypatch.setattr(datasets, "load_dataset", hub)
    got = hub_stories("validation", 25, tmp_path)
    assert hub.calls == [{"name": HUB_DATASET, "split": "validation", "streaming": True}]
    assert hub.taken == {"validation": [25]} and hub.read["validation"] == 25
    assert len(got) == 25 and all(s == s.strip() and s for s in got)
    assert hub_stories("validation", 25, tmp_path) == got  # from the cache: no second download
    assert hub_stories("validation", 10, tmp_path) == got[:10]  # a smaller take is a slice of a cached one
    assert len(hub.calls) == 1
    hub_stories("validation", 30, tmp_path)  # more than cached: streamed again
    assert hub.taken == {"validation": [25, 30]}


def test_data_module_on_the_hub_takes_n_stories_per_split(no_local_copy: Path, monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hub = FakeHub()
    monkeypatch.setattr(datasets, "load_dataset", hub)
    monkeypatch.setattr(tinystories, "HUB_TOKENIZER_STORIES", 400)  # 8,000 by default: more than a test needs
    dm = TinyStoriesDataModule(cache_dir=str(tmp_path / "cache"), context_length=32, batch_size=4,
                               max_train_stories=300, max_val_stories=20)
    assert dm.source == "hub" and dm.data_dir is None
    err = capsys.readouterr().err
    assert f"data: {HUB_DATASET} from the Hugging Face hub, the first 300 train and 20 validation stories" in err
    assert "no local copy found" in err
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.tokenizer) == VOCAB_SIZE
    assert hub.taken == {"train": [400], "validation": [20]}  # the tokenizer's 400 serve the 300 rows too
    assert hub.read == {"train": 400, "validation": 20}
    assert len(dm.val_dataloader().dataset) == 20
    assert next(iter(dm.train_dataloader()))["input_ids"].shape == (4, 32)
    assert dm.validation_texts(3) == hub_stories("validation", 20, tmp_path / "cache")[:3]
    assert len(hub.calls) == 2  # validation texts come from the cached take
    default = TinyStoriesDataModule(source="hub", cache_dir=str(tmp_path / "cache"), context_length=32)
    assert default.max_stories == HUB_STORIES  # never the whole hub set unless asked for by number


# ---- offline without a local copy: one line, both ways out ---------------------------------------


def test_offline_without_a_local_copy_names_both_ways_out(no_local_copy: Path, monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    monkeypatch.setattr(datasets, "load_dataset", FakeHub(offline=True))
    dm = TinyStoriesDataModule(cache_dir=str(tmp_path / "cache"), context_length=32)
    with pytest.raises(DataSourceError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert "\n" not in message and "Couldn't reach" in message
    assert DATA_DIR_ENV in message and "--data.data_dir" in message and "go online" in message
    with pytest.raises(DataSourceError, match="go online"):
        validation_prompts(4)


def test_train_and_probe_commands_offline_print_one_line(no_local_copy: Path, monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path, data_cache: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(datasets, "load_dataset", FakeHub(offline=True))
    config = tiny_config(tmp_path / "flat.yaml", "flat", tmp_path / "run", tmp_path / "cache", steps=1, every=1)
    with pytest.raises(SystemExit) as exit_info:
        train_main(["fit", "--config", str(config), "--data.source", "auto"])
    assert exit_info.value.code == 2
    assert probe_main(["--init", str(config), "--data.source", "auto", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2  # one line from each command
    for line in errors:
        assert "Couldn't reach" in line and DATA_DIR_ENV in line and "go online" in line


def test_probe_takes_the_training_data_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                               no_local_copy: Path) -> None:
    real = tmp_path / "stories"
    valid = write_synthetic_corpus(real)
    command = parse(["--init", str(REPO / "configs" / "mixer_flat.yaml"), "--data.source", "local",
                     "--data.data_dir", str(real), "--out", str(tmp_path / "p")])
    assert (command.request.data_source, command.request.data_dir) == ("local", str(real))
    assert parse(["--checkpoint", "x.ckpt", "--data_source", "hub", "--out", "o"]).request.data_source == "hub"
    assert validation_prompts(3, "auto", real) == valid[:3]
    hub = FakeHub()
    monkeypatch.setattr(datasets, "load_dataset", hub)
    assert len(validation_prompts(3, cache_dir=tmp_path / "cache")) == 3  # auto, no local copy: the hub
    assert hub.taken == {"validation": [3]}
