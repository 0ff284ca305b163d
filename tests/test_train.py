"""Training end to end through the real CLI on the shared TinyStories copy.

Tiny models, a handful of steps: step-0 checkpoint, periodic and last
checkpoints, resume, W&B offline files, validation loss going down, HF export.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from data.tinystories import TinyStoriesDataModule
from lmrep.checkpoints import list_checkpoints, load_checkpoint, read_checkpoint
from lmrep.cli import TrainCLI, main
from lmrep.configs import BASE_CONFIG, config_args
from lmrep.export import export_checkpoint
from lmrep.module import LanguageModelModule, next_token_loss
from models import build_model
from tests.conftest import FAMILY_CONFIGS, REPO, tiny_config
from tests.wandb_records import read_offline_history


class RecordAtStart(L.Callback):
    """Saves the weights and optimiser state the run starts from (before any update)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.save({"state_dict": {k: v.clone() for k, v in pl_module.state_dict().items()},
                    "optimizer": trainer.optimizers[0].state_dict(), "step": trainer.global_step}, self.path)


def record_callback(path: Path) -> dict:
    return {"class_path": "tests.test_train.RecordAtStart", "init_args": {"path": str(path)}}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("config", sorted(p for p in (REPO / "configs").glob("*.yaml") if p.name != BASE_CONFIG),
                         ids=lambda p: p.name)
def test_every_yaml_loads(config: Path) -> None:
    cli = TrainCLI(LanguageModelModule, TinyStoriesDataModule, args=config_args(config), run=False)
    model = cli.model.model
    assert cli.datamodule.context_length == model.context_length
    assert model.embedding_matrix.shape[0] == 4096


def test_unknown_config_key_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs/quickstart.yaml"), "--model.model.init_args.config.widht=3"])
    assert exit_info.value.code != 0
    assert "widht" in capsys.readouterr().err


def test_a_family_file_without_its_base_is_refused(capsys: pytest.CaptureFixture) -> None:
    """Alone, a family YAML would train with Lightning's defaults (no step limit, no checkpoints)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs/llama.yaml")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--config " + str(REPO / "configs/base.yaml") in err


def test_next_token_loss_ignores_padding() -> None:
    logits = torch.randn(1, 4, 5)
    labels = torch.tensor([[1, 2, -100, -100]])
    loss, n = next_token_loss(logits, labels)
    assert n == 1  # only position 0 predicts a real token (2)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits[0, :1], labels[0, 1:2]))


@pytest.mark.parametrize(("family", "config"), [
    ("mixer", {"mixing": "expanded", "expansion": 2}),
    ("llama", {"n_heads": 2}),
    ("llama", {"n_heads": 2, "tie_embeddings": True}),  # the LM head IS the embedding
], ids=["mixer", "llama", "llama-tied"])
def test_weight_decay_on_matrices_only(family: str, config: dict, tmp_path: Path) -> None:
    model = build_model(family, dict(config, vocab_size=64, d_model=16, n_blocks=2, context_length=8))
    module = LanguageModelModule(model, weight_decay=0.1)
    module.trainer = L.Trainer(max_epochs=-1, max_steps=10, logger=False, enable_checkpointing=False,
                               enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    decay_group, no_decay_group = module.configure_optimizers()["optimizer"].param_groups
    assert (decay_group["weight_decay"], no_decay_group["weight_decay"]) == (0.1, 0.0)
    decayed = {id(p) for p in decay_group["params"]}
    not_decayed = {id(p) for p in no_decay_group["params"]}
    names = dict(model.named_parameters())  # a tied head is listed once, as the embedding
    assert decayed.isdisjoint(not_decayed) and decayed | not_decayed == {id(p) for p in names.values()}
    assert id(model.embedding_matrix) in not_decayed
    for name, p in names.items():
        kept = name.endswith("bias") or "norm" in name or p is model.embedding_matrix
        assert (id(p) in not_decayed) == kept, name
    head = model.hf.lm_head.weight if family == "llama" else model.lm_head.weight
    assert (id(head) in decayed) == (not config.get("tie_embeddings", False))


def test_step0_checkpoint_resume_and_wandb(tmp_path: Path, data_cache: Path) -> None:
    run = tmp_path / "run"
    first = tiny_config(tmp_path / "a.yaml", "flat", run, data_cache, steps=4, every=2,
                        callbacks=[record_callback(tmp_path / "start1.pt")])
    main(["fit", "--config", str(first)])
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "last.ckpt", "step=000000.ckpt", "step=000002.ckpt", "step=000004.ckpt"]

    # step 0 holds the initial weights exactly, before any update
    initial = torch.load(tmp_path / "start1.pt", weights_only=True)
    step0 = read_checkpoint(ckpts / "step=000000.ckpt")
    assert initial["step"] == 0
    for key, value in initial["state_dict"].items():
        torch.testing.assert_close(step0["state_dict"][key], value, rtol=0, atol=0)
    step4 = read_checkpoint(ckpts / "step=000004.ckpt")
    assert not torch.equal(step4["state_dict"]["model.embedding.weight"], step0["state_dict"]["model.embedding.weight"])
    step0_hash = sha(ckpts / "step=000000.ckpt")
    saved_last = read_checkpoint(ckpts / "last.ckpt")

    # the same command with more steps resumes from last.ckpt with its optimiser state
    second = tiny_config(tmp_path / "b.yaml", "flat", run, data_cache, steps=7, every=2,
                         callbacks=[record_callback(tmp_path / "start2.pt")])
    main(["fit", "--config", str(second)])
    resumed = torch.load(tmp_path / "start2.pt", weights_only=True)
    assert resumed["step"] == 4
    for key, value in saved_last["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=0)
    saved_opt = saved_last["optimizer_states"][0]["state"]
    for idx, state in resumed["optimizer"]["state"].items():
        torch.testing.assert_close(state["exp_avg"], saved_opt[idx]["exp_avg"], rtol=0, atol=0)
        torch.testing.assert_close(state["exp_avg_sq"], saved_opt[idx]["exp_avg_sq"], rtol=0, atol=0)
    assert sha(ckpts / "step=000000.ckpt") == step0_hash
    assert load_checkpoint(ckpts / "last.ckpt").step == 7
    assert [load_checkpoint(p).step for p in list_checkpoints(ckpts)] == [0, 2, 4, 6, 7]

    # one W&B run, continued: both offline run directories carry the same run id
    # (two starts in the same second get directories '...-<id>' and '...-<id>-1': read the id off the
    # run-<id>.wandb file inside each)
    run_files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 2 and len({f.stem.split("-", 1)[1] for f in run_files}) == 1
    history = read_offline_history(run)
    losses = {row["trainer/global_step"]: row["train/loss"] for row in history if "train/loss" in row}
    assert set(losses) == set(range(7))
    assert all(math.isfinite(v) for v in losses.values())
    assert any("val/loss" in row for row in history)
    assert any("train/tokens_per_sec" in row for row in history)


@torch.no_grad()
def val_loss(model: torch.nn.Module, dm: TinyStoriesDataModule, batches: int) -> float:
    total, count = 0.0, 0
    for i, batch in enumerate(dm.val_dataloader()):
        if i == batches:
            break
        loss, n = next_token_loss(model(batch["input_ids"]), batch["labels"])
        total, count = total + loss.item() * n.item(), count + n.item()
    return total / count


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_short_training_lowers_validation_loss(family: str, tmp_path: Path, data_cache: Path) -> None:
    run = tmp_path / "run"
    cfg = tiny_config(tmp_path / "c.yaml", family, run, data_cache, steps=60, every=60, d=64, context=64,
                      batch_size=16)
    main(["fit", "--config", str(cfg)])
    dm = TinyStoriesDataModule(cache_dir=str(data_cache), context_length=64, batch_size=16, packing=True)
    dm.prepare_data()
    dm.setup("validate")
    before = val_loss(load_checkpoint(run / "checkpoints" / "step=000000.ckpt").model, dm, 4)
    after = val_loss(load_checkpoint(run / "checkpoints" / "last.ckpt").model, dm, 4)
    assert after < before - 1.0, (family, before, after)


@pytest.mark.slow
def test_llama_export_loads_in_transformers(tmp_path: Path, data_cache: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    main(["fit", "--config", str(tiny_config(tmp_path / "l.yaml", "llama", run, data_cache, steps=3, every=3))])
    ckpt = run / "checkpoints" / "last.ckpt"
    out = export_checkpoint(ckpt, tmp_path / "hf")
    hf_model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tokenizer.encode("Once upon a time there was a cat")])
    ours = load_checkpoint(ckpt).model
    assert (hf_model.config.eos_token_id, hf_model.config.pad_token_id) == (tokenizer.eos_token_id,
                                                                            tokenizer.pad_token_id)
    assert tokenizer.pad_token_id is not None and tokenizer.model_max_length == ours.context_length == 32
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, ours(ids))
    generated = hf_model.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 5
    assert isinstance(tokenizer.decode(generated[0]), str)


def test_one_step_axis_for_losses_and_probes_across_a_resume(tmp_path: Path, data_cache: Path) -> None:
    # A value computed from the weights after N updates carries step N: probes and validation of the
    # checkpoint at N, the training loss of the batch that follows it; validation also at step 0, and
    # at the step a resumed run starts from (its checkpoint was written before that validation).
    run = tmp_path / "run"
    probe = {"class_path": "lmrep.callbacks.ProbeCallback",
             "init_args": {"num_prompts": 1, "tokens": 4, "masks": [0], "contexts": ["prompt"],
                           "settings": {"steps": 2}}}
    for steps in (4, 6):
        cfg = tiny_config(tmp_path / f"{steps}.yaml", "flat", run, data_cache, steps=steps, every=2, val_every=2,
                          callbacks=[probe])
        cli = main(["fit", "--config", str(cfg)])
    history = read_offline_history(run)
    val_steps = sorted({row["trainer/global_step"] for row in history if "val/loss" in row})
    probe_steps = sorted({row["trainer/global_step"] for row in history if "probe/prompt/self/m0/block_1" in row})
    train_steps = sorted({row["trainer/global_step"] for row in history if "train/loss" in row})
    assert val_steps == probe_steps == [0, 2, 4, 6]
    assert train_steps == list(range(6))
    (losses,) = [c.losses for c in cli.trainer.callbacks if type(c).__name__ == "ProbeCallback"]  # what it plots
    assert [step for step, _ in losses["val"]] == [0, 2, 4, 6]  # the PNG's points, none lost or doubled
    assert [step for step, _ in losses["train"]] == list(range(6))
