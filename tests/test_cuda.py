"""On a CUDA GPU: the probe gives the CPU's answers, and both families train under bf16-mixed.

Skipped where no GPU is visible (CI, the development machine); run on a GPU node with
`python -m pytest -q tests/test_cuda.py`.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lmrep.module import LanguageModelModule
from lmrep.probe import ProbeSettings, probe
from models import LlamaLM, LlamaModelConfig, MaskedMixer, MixerConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")

VOCAB, PAD = 4096, 1


def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    mixer = MaskedMixer(MixerConfig(vocab_size=VOCAB, d_model=64, n_blocks=2, context_length=32))
    torch.manual_seed(0)
    llama = LlamaLM(LlamaModelConfig(vocab_size=VOCAB, d_model=64, n_blocks=2, n_heads=2, context_length=32))
    return {"mixer": mixer, "llama": llama}


@pytest.mark.parametrize("family", ["mixer", "llama"])
@pytest.mark.parametrize("context", ["prompt", "padded"])
def test_probe_on_cuda_gives_the_cpu_answers(family: str, context: str) -> None:
    model = models()[family].eval()
    prompts = torch.randint(2, VOCAB, (3, 8), generator=torch.Generator().manual_seed(0))
    settings = ProbeSettings(context=context, steps=200, patience=50)
    kwargs = dict(blocks=[1, 2], masks=[0, 1], pad_token_id=PAD, settings=settings)
    cpu = probe(model, prompts, **kwargs)
    gpu = probe(model.cuda(), prompts, **kwargs)
    self_rows = cpu.mask == 0
    assert cpu.exact[self_rows].all() and gpu.exact[self_rows].all()  # both invert exactly for self
    assert torch.equal(cpu.recovered_ids[self_rows], gpu.recovered_ids[self_rows])
    assert gpu.recovered_ids.device.type == "cpu"  # results come back to the host
    torch.testing.assert_close(gpu.loss[self_rows], cpu.loss[self_rows], rtol=0.5, atol=1e-3)


@pytest.mark.parametrize("family", ["mixer", "llama"])
def test_training_on_cuda_lowers_the_loss(family: str) -> None:
    torch.manual_seed(0)
    ids = torch.randint(2, 64, (64, 32))  # a small alphabet: learnable in a few dozen steps
    batches = [{"input_ids": row, "labels": row} for row in ids]
    module = LanguageModelModule(models()[family], lr=3e-3, warmup_steps=5)
    first = module._shared_step({"input_ids": ids[:8], "labels": ids[:8]})[0].item()
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=60, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(batches, batch_size=8, shuffle=True))
    module = module.cuda().eval()
    with torch.no_grad():
        last = module._shared_step({"input_ids": ids[:8].cuda(), "labels": ids[:8].cuda()})[0].item()
    assert last < first - 1.0  # from ~ln(4096) = 8.3 towards ln(62) = 4.1
