"""Tests for the model families: causality at every block, the probing surface, the registry, HF parity and export."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import Tensor, nn
from torch.nn import functional as F

import models
from lmrep.checkpoints import load_checkpoint
from lmrep.cli import main as train_main
from lmrep.configs import BASE_CONFIG, read_config
from lmrep.probe import ProbeSettings, probe
from lmrep.probe_cli import main as probe_main
from lmrep.runs import read_results
from models import MODEL_FAMILIES, ProbeSurface, build_model, model_class, model_spec, register_family
from models.llama import LlamaLM, LlamaModelConfig, export_hf
from models.mixer import MaskedMixer, MixerConfig, SequenceLinear
from tests.conftest import REPO, tiny_config
from tests.toy_family import ToyLM

VOCAB = 97
LENGTH = 10
N_BLOCKS = 3
TOLERANCE = 1e-6  # positions before a changed token must not move by more than this
SEED = 1234
# The shape every spec is shrunk to (fields a family's config lacks are left out).
TINY_SHAPE = dict(vocab_size=VOCAB, n_blocks=N_BLOCKS, context_length=LENGTH, d_model=16)


def yaml_specs() -> dict[str, tuple[str, dict]]:
    """One tiny spec per distinct model of configs/*.yaml: a new family's YAML brings it under every test here."""
    specs: dict[str, tuple[str, dict]] = {}
    for path in sorted((REPO / "configs").glob("*.yaml")):
        if path.name == BASE_CONFIG:
            continue
        section = read_config(path)["model"]["model"]
        cls = model_class(section["class_path"])
        fields = {field.name for field in dataclasses.fields(cls.config_class)}
        config = dict(section["init_args"]["config"], **{k: v for k, v in TINY_SHAPE.items() if k in fields})
        if (cls.family, config) not in specs.values():  # quickstart.yaml shrinks to mixer_flat.yaml's model
            specs[path.stem] = (cls.family, config)
    return specs


# Every family and mixing the causality tests must cover: each YAML's model, plus the variants no YAML
# trains (grouped-query attention, expansion 1 and 3).
SPECS: dict[str, tuple[str, dict]] = {
    **yaml_specs(),
    "llama_gqa": ("llama", dict(TINY_SHAPE, d_model=32, n_heads=4, n_kv_heads=2)),
    "expanded1": ("mixer", dict(TINY_SHAPE, mixing="expanded", expansion=1)),
    "expanded3": ("mixer", dict(TINY_SHAPE, mixing="expanded", expansion=3)),
}
MIXER_SPECS = [name for name, (family, _) in SPECS.items() if family == "mixer"]


def make(name: str, seed: int = SEED) -> nn.Module:
    """A tiny seeded model for one entry of SPECS."""
    family, config = SPECS[name]
    torch.manual_seed(seed)
    return build_model(family, config).eval()


def random_ids(batch: int = 2, length: int = LENGTH, seed: int = 0) -> Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def outputs(model: nn.Module, ids: Tensor) -> list[Tensor]:
    """The hidden state after every block 1..n, then the logits."""
    with torch.no_grad():
        e = model.embed(ids)
        return [model.hidden(e, k) for k in range(1, model.n_blocks + 1)] + [model(ids)]


def assert_causal(model: nn.Module) -> None:
    """Changing token j leaves every output before j unchanged and changes every output at j and after."""
    ids = random_ids()
    base = outputs(model, ids)
    for j in (0, 1, LENGTH // 2, LENGTH - 1):
        changed = ids.clone()
        changed[:, j] = (changed[:, j] + 1) % VOCAB
        for k, (before, after) in enumerate(zip(base, outputs(model, changed)), start=1):
            where = f"block {k}" if k <= model.n_blocks else "logits"
            diff = (before - after).abs().amax(dim=-1)  # (b, t)
            assert (diff[:, :j] <= TOLERANCE).all(), f"{where}: token {j} leaks to earlier positions"
            assert (diff[:, j:] > TOLERANCE).all(), f"{where}: token {j} does not reach positions >= {j}"


def train_a_little(model: nn.Module, steps: int = 5) -> None:
    """A few AdamW steps on a random next-token loss."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        ids = random_ids(batch=4, seed=100 + step)
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@pytest.mark.parametrize("name", SPECS)
def test_causal_at_every_block_and_logits(name: str) -> None:
    assert_causal(make(name))


@pytest.mark.parametrize("name", SPECS)
def test_causal_after_training_and_state_dict_round_trip(name: str, tmp_path: Path) -> None:
    model = make(name)
    train_a_little(model)
    assert_causal(model)
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    fresh = make(name, seed=SEED + 1)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    ids = random_ids()
    for ours, theirs in zip(outputs(model, ids), outputs(fresh, ids)):
        torch.testing.assert_close(theirs, ours, rtol=0, atol=0)
    assert_causal(fresh)


@pytest.mark.parametrize("name", MIXER_SPECS)
def test_mixer_short_input_equals_right_padding(name: str) -> None:
    model = make(name)
    t = 6
    ids = random_ids(length=t)
    padded = torch.cat([ids, random_ids(length=LENGTH - t, seed=7)], dim=1)  # (b, L), any tokens after t
    for short, full in zip(outputs(model, ids), outputs(model, padded)):
        assert short.shape[1] == t
        torch.testing.assert_close(short, full[:, :t])


@pytest.mark.parametrize("name", MIXER_SPECS)
def test_masked_mixing_weights_get_no_gradient(name: str) -> None:
    model = make(name)
    model(random_ids()).square().mean().backward()
    maps = [module for module in model.modules() if isinstance(module, SequenceLinear)]
    assert maps
    for mixing in maps:
        assert mixing.mask.logical_not().any() and mixing.mask.any()
        assert torch.count_nonzero(mixing.weight.grad[~mixing.mask]) == 0
        assert torch.count_nonzero(mixing.weight.grad[mixing.mask]) > 0


def test_expanded_masks_follow_channel_positions() -> None:
    model = make("expanded3")
    mixing = model.blocks[0].mix
    channel_position = torch.arange(3 * LENGTH) // 3
    position = torch.arange(LENGTH)
    torch.testing.assert_close(mixing.up.mask, position[None, :] <= channel_position[:, None])
    torch.testing.assert_close(mixing.down.mask, channel_position[None, :] <= position[:, None])
    assert "mask" not in "".join(model.state_dict())  # derived from the config, never loaded


@pytest.mark.parametrize("name", SPECS)
def test_probe_surface(name: str) -> None:
    model = make(name)
    assert isinstance(model, ProbeSurface)
    assert MODEL_FAMILIES[model.family] is type(model) and model.n_blocks == N_BLOCKS == len(model.blocks)
    assert model.probe_lr and all(lr > 0 for lr in model.probe_lr.values())
    assert model.context_length == LENGTH
    assert model.embedding_matrix.shape == (VOCAB, model.config.d_model)
    assert model.embedding_matrix is next(p for p in model.parameters() if p.shape == (VOCAB, model.config.d_model))
    ids = random_ids(length=4)
    e = model.embed(ids)
    assert e.shape == (2, 4, model.config.d_model)
    torch.testing.assert_close(e, model.embedding_matrix[ids])
    assert model.hidden(e, 0) is e
    # Running the blocks piecewise equals running them at once.
    with torch.no_grad():
        piecewise = model.run_blocks(model.run_blocks(e, 0, 1), 1, N_BLOCKS)
        torch.testing.assert_close(piecewise, model.hidden(e, N_BLOCKS))


@pytest.mark.parametrize("name", SPECS)
def test_hidden_is_differentiable_wrt_embeddings(name: str) -> None:
    model = make(name)
    e = model.embed(random_ids(length=5)).detach().requires_grad_(True)
    model.hidden(e, N_BLOCKS)[:, -1].sum().backward()
    assert e.grad is not None and e.grad.abs().sum(dim=-1).gt(0).all()


@pytest.mark.parametrize("name", SPECS)
def test_bad_block_and_length_are_clear_errors(name: str) -> None:
    model = make(name)
    e = model.embed(random_ids(length=3))
    with pytest.raises(ValueError, match="out of range"):
        model.hidden(e, N_BLOCKS + 1)
    with pytest.raises(ValueError, match="start must be <= stop"):
        model.run_blocks(e, 2, 1)
    with pytest.raises(ValueError, match="longer than the model's context length"):
        model(random_ids(length=LENGTH + 1))


def test_llama_hidden_matches_hf_hidden_states() -> None:
    model = make("llama_gqa")
    ids = random_ids()
    with torch.no_grad():
        reference = model.hf(input_ids=ids, output_hidden_states=True)
        e = model.embed(ids)
        assert len(reference.hidden_states) == N_BLOCKS + 1
        for k in range(N_BLOCKS):
            torch.testing.assert_close(model.hidden(e, k), reference.hidden_states[k])
        # transformers 5.x puts the final RMSNorm on the last hidden state; ours is the raw block output.
        last = model.hidden(e, N_BLOCKS)
        torch.testing.assert_close(model.hf.model.norm(last), reference.hidden_states[N_BLOCKS])
        assert not torch.allclose(last, reference.hidden_states[N_BLOCKS])
        torch.testing.assert_close(model(ids), reference.logits)


def test_llama_short_input_matches_hf_on_any_length() -> None:
    model = make("llama_gqa")
    for t in (1, 4):
        ids = random_ids(length=t)
        with torch.no_grad():
            reference = model.hf(input_ids=ids, output_hidden_states=True).hidden_states
            for k in range(N_BLOCKS):
                torch.testing.assert_close(model.hidden(model.embed(ids), k), reference[k])


def tiny_tokenizer():
    """A word-level tokenizer with a handful of words and the two special tokens, built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<|endoftext|>", "<pad>", "<unk>", "once", "upon", "a", "time", "there", "was", "cat", "."]
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.mark.parametrize("tie", [False, True])
def test_llama_export_round_trip(tmp_path: Path, tie: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(SEED)
    model = LlamaLM(LlamaModelConfig(vocab_size=VOCAB, d_model=32, n_blocks=2, n_heads=4, context_length=16,
                                     tie_embeddings=tie)).eval()
    ours_tokenizer = tiny_tokenizer()
    unlimited = ours_tokenizer.model_max_length
    out_dir = export_hf(model, ours_tokenizer, tmp_path / "hf")
    assert (out_dir / "model.safetensors").exists()
    assert ours_tokenizer.model_max_length == unlimited  # the caller's tokenizer is left as it was

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    loaded = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    assert loaded.generation_config.eos_token_id == tokenizer.eos_token_id == 0
    assert loaded.generation_config.pad_token_id == tokenizer.pad_token_id == 1
    # config.json carries the tokenizer's ids too (HF reads them from there, not only for generation) ...
    saved_config = json.loads((out_dir / "config.json").read_text())
    assert saved_config["eos_token_id"] == 0 and saved_config["pad_token_id"] == 1
    assert loaded.config.eos_token_id == 0 and loaded.config.pad_token_id == 1
    # ... and the tokenizer truncates where the model's context ends.
    assert tokenizer.model_max_length == model.context_length == 16
    long_ids = tokenizer(" ".join(["cat"] * 40), truncation=True).input_ids
    assert len(long_ids) == 16
    ids = tokenizer("once upon a time there was a cat .", return_tensors="pt").input_ids
    assert ids.shape == (1, 9)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(ids))
        generated = loaded.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert generated.shape == (1, 13)
    # Greedy generation agrees with our own argmax decoding.
    with torch.no_grad():
        ours = ids
        for _ in range(4):
            ours = torch.cat([ours, model(ours)[:, -1:].argmax(-1)], dim=1)
    torch.testing.assert_close(generated, ours)


def test_build_model_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown model family 'gpt': choose one of llama, mixer"):
        build_model("gpt", {})
    with pytest.raises(ValueError, match=r"unknown config key\(s\) heads, nope .*valid keys are vocab_size"):
        build_model("mixer", {"nope": 1, "heads": 2})


@pytest.mark.parametrize("name", SPECS)
def test_model_spec_rebuilds_the_same_model(name: str) -> None:
    model = make(name)
    spec = json.loads(json.dumps(model_spec(model)))  # plain JSON-able types
    rebuilt = build_model(**spec)
    assert type(rebuilt) is type(model) and rebuilt.config == model.config
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    rebuilt.load_state_dict(torch.load(buffer, weights_only=True))
    ids = random_ids()
    torch.testing.assert_close(rebuilt.eval()(ids), model(ids))


@pytest.mark.parametrize(
    "config_class, fields, message",
    [
        (MixerConfig, dict(mixing="conv"), "unknown mixing 'conv'"),
        (MixerConfig, dict(expansion=0), "expansion must be >= 1"),
        (MixerConfig, dict(context_length=0), "context_length must be >= 1"),
        (MixerConfig, dict(d_model=0), "d_model must be >= 1"),
        (MixerConfig, dict(n_parallel=0), "n_parallel must be >= 1"),
        (LlamaModelConfig, dict(d_model=30, n_heads=4), "not divisible by n_heads"),
        (LlamaModelConfig, dict(n_heads=4, n_kv_heads=3), "must be >= 1 and divide n_heads"),
        (LlamaModelConfig, dict(n_blocks=0), "n_blocks must be >= 1"),
        (LlamaModelConfig, dict(rope_theta=0.0), "rope_theta must be > 0"),
    ],
)
def test_config_validation(config_class: type, fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config_class(**fields)


def test_llama_default_mlp_width_is_swiglu_sized() -> None:
    assert LlamaModelConfig(d_model=256).mlp_width == 704  # 8/3 * 256 = 682.7, rounded up to 64
    assert LlamaModelConfig(d_model=256, intermediate_size=1024).to_hf().intermediate_size == 1024
    assert isinstance(MaskedMixer(MixerConfig(vocab_size=8, d_model=4, n_blocks=1, context_length=3)), ProbeSurface)


# ---------------------------------------------------------------- the registry


def register_toy(monkeypatch: pytest.MonkeyPatch) -> type[ToyLM]:
    """Register ToyLM through the public registry into a copy of it that monkeypatch takes back."""
    monkeypatch.setattr(models, "MODEL_FAMILIES", dict(models.MODEL_FAMILIES))
    return register_family(ToyLM)


@pytest.fixture()
def toy_registered(monkeypatch: pytest.MonkeyPatch) -> type[ToyLM]:
    """ToyLM is a registered family for one test only."""
    return register_toy(monkeypatch)


def test_every_family_has_a_yaml() -> None:
    """So every registered family is under the causality and YAML-parsing tests."""
    assert {family for family, _ in yaml_specs().values()} == set(MODEL_FAMILIES)


def test_model_class_names_registered_families_only() -> None:
    assert model_class("models.mixer.MaskedMixer") is MaskedMixer
    assert model_class("models.llama.LlamaLM") is LlamaLM
    with pytest.raises(ValueError, match=r"^cannot import model class 'models.mixer.Transformer'$"):
        model_class("models.mixer.Transformer")
    with pytest.raises(ValueError, match=r"^cannot import model class 'MaskedMixer'$"):
        model_class("MaskedMixer")
    with pytest.raises(ValueError, match=r"^'tests.toy_family.ToyLM' is not a registered model family: registered "
                                         r"are llama, mixer \(add one with models.register_family\)$"):
        model_class("tests.toy_family.ToyLM")


def test_register_family(toy_registered: type[ToyLM]) -> None:
    assert model_class("tests.toy_family.ToyLM") is ToyLM
    assert type(build_model("toy", {"d_model": 8, "n_blocks": 1})) is ToyLM
    assert register_family(ToyLM) is ToyLM  # registering the same class again changes nothing
    other = type("OtherToy", (ToyLM,), {})
    with pytest.raises(ValueError, match="model family 'toy' is already registered to tests.toy_family.ToyLM"):
        register_family(other)
    with pytest.raises(TypeError, match="not a models.surface.SurfaceModel subclass"):
        register_family(nn.Linear)


def test_a_test_registration_leaves_no_trace() -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        register_toy(monkeypatch)
        assert build_model("toy", {}).family == "toy"
    assert "toy" not in models.MODEL_FAMILIES and models.MODEL_FAMILIES is MODEL_FAMILIES
    with pytest.raises(ValueError, match="unknown model family 'toy'"):
        build_model("toy", {})


TOY_STEPS = 3  # a few optimiser steps of the toy family through the real training CLI


def test_a_family_outside_models_trains_and_probes_with_its_defaults(
        toy_registered: type[ToyLM], tmp_path: Path, data_cache: Path) -> None:
    """A file, one registry entry and a YAML: the real training CLI, then the probe with no lr given."""
    run = tmp_path / "run"
    config = tiny_config(tmp_path / "toy.yaml", "flat", run, data_cache, steps=TOY_STEPS, every=TOY_STEPS)
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["model"] = {"class_path": "tests.toy_family.ToyLM",
                             "init_args": {"config": {"vocab_size": 4096, "d_model": 64, "n_blocks": 2,
                                                      "context_length": 32}}}
    config.write_text(yaml.safe_dump(cfg))
    train_main(["fit", "--config", str(config)])
    step0 = run / "checkpoints" / "step=000000.ckpt"
    loaded = load_checkpoint(step0)
    assert type(loaded.model) is ToyLM and loaded.step == 0
    assert load_checkpoint(run / "checkpoints" / "last.ckpt").step == TOY_STEPS  # the Lightning module trained it
    default_lr = ToyLM.probe_lr[("embedding", "adam")]

    texts = ["Once upon a time, there was a little dog.", "Lily liked to play in the park with her ball."]
    prompts = torch.tensor([loaded.tokenizer.encode(text)[:8] for text in texts])
    result = probe(loaded.model, prompts, blocks=[1, 2], masks=[0], pad_token_id=loaded.tokenizer.pad_token_id,
                   settings=ProbeSettings(steps=150))
    assert result.settings.lr == default_lr
    assert result.exact[result.block == 1].all()  # an untrained d=64 model inverts exactly at block 1

    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(texts) + "\n")
    out = tmp_path / "probe"
    assert probe_main(["--checkpoint", str(step0), "--prompts", str(prompt_file), "--mask", "0", "--steps", "150",
                       "--out", str(out), "--no-wandb"]) == 0
    rows = read_results(out)
    assert len(rows) == 2 * len(texts)  # blocks x prompts
    assert {(r["family"], r["lr"], r["step"]) for r in rows} == {("toy", default_lr, 0)}
    assert all(r["self_acc"] == 1.0 for r in rows if r["block"] == 1)
