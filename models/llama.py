"""Llama-style transformer: HF `LlamaForCausalLM` behind the probing surface.

RoPE, RMSNorm, SwiGLU and causal attention all come from `transformers`; this
file only maps a small typed config onto `LlamaConfig` and runs the HF decoder
layers one by one, so that the probe can read (and backpropagate through) the
raw output of any block. In transformers 5.x `output_hidden_states[-1]` has the
final RMSNorm applied; `hidden(e, upto=n)` here is the un-normed block output.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from data.files import staged_files
from models.surface import ModelShape, SurfaceModel, check_length, check_positive, check_run, probe_lr_table

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# SwiGLU has three matrices instead of two, so Llama shrinks its hidden width to
# 2/3 of 4d to keep the MLP's parameter count; rounded up to a multiple of 64.
SWIGLU_WIDTH_FACTOR = 8 / 3
INTERMEDIATE_MULTIPLE = 64
# PyTorch's SDPA: deterministic on CPU, the same kernel HF picks by default.
ATTENTION_IMPLEMENTATION = "sdpa"


@dataclass
class LlamaModelConfig(ModelShape):
    """Shape of a small Llama-style transformer (vocab_size, d_model, n_blocks, context_length: ModelShape)."""

    n_heads: int = 4
    """Number of attention (query) heads; d_model must be divisible by it."""
    n_kv_heads: int | None = None
    """Number of key/value heads (grouped-query attention); None means n_heads."""
    intermediate_size: int | None = None
    """SwiGLU hidden width; None means 8/3 * d_model rounded up to a multiple of 64."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    tie_embeddings: bool = False
    """Share the input embedding matrix with the LM head."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, ("n_heads",))
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads != 0):
            raise ValueError(f"n_kv_heads {self.n_kv_heads} must be >= 1 and divide n_heads {self.n_heads}")
        if self.intermediate_size is not None and self.intermediate_size < 1:
            raise ValueError(f"intermediate_size must be >= 1, got {self.intermediate_size}")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")

    @property
    def mlp_width(self) -> int:
        """The SwiGLU hidden width actually used."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        return INTERMEDIATE_MULTIPLE * math.ceil(SWIGLU_WIDTH_FACTOR * self.d_model / INTERMEDIATE_MULTIPLE)

    def to_hf(self) -> LlamaConfig:
        """The equivalent `transformers.LlamaConfig`."""
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.d_model,
            intermediate_size=self.mlp_width,
            num_hidden_layers=self.n_blocks,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads if self.n_kv_heads is not None else self.n_heads,
            max_position_embeddings=self.context_length,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            tie_word_embeddings=self.tie_embeddings,
            # Our tokenizer's special ids are not Llama's 1/2; export_hf records the real ones.
            bos_token_id=None,
            eos_token_id=None,
            attn_implementation=ATTENTION_IMPLEMENTATION,
        )


_MASK_PARAMETERS = frozenset(inspect.signature(create_causal_mask).parameters)


def _mask_arguments(h: Tensor) -> dict[str, Any]:
    """The embeddings and "no cache" under the names this transformers version's create_causal_mask takes.

    The argument names moved between releases (5.24 takes `cache`, which 5.17 refuses; older
    releases name it `past_key_values` and may want `cache_position`), so they are read off the
    installed function's signature once, at import.
    """
    args: dict[str, Any] = {}
    args["inputs_embeds" if "inputs_embeds" in _MASK_PARAMETERS else "input_embeds"] = h
    for name in ("cache", "past_key_values"):
        if name in _MASK_PARAMETERS:
            args[name] = None
    if "cache_position" in _MASK_PARAMETERS:
        args["cache_position"] = torch.arange(h.shape[1], device=h.device)
    return args


def _attend_own(attn: nn.Module, true: Tensor, own: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """HF Llama attention output at each t for own[:, t] after the true prefix: (1, t, d), (c, t, d) -> (c, t, d).

    Position t's query reads the true keys and values of positions < t (shared by every
    candidate) and its own; the same RoPE, scaling and softmax as the layer's own forward.
    """
    c, t, _ = own.shape

    def heads(proj: nn.Module, x: Tensor) -> Tensor:
        return proj(x).view(x.shape[0], t, -1, attn.head_dim).transpose(1, 2)  # (b, heads, t, head_dim)

    q, k_own = apply_rotary_pos_emb(heads(attn.q_proj, own), heads(attn.k_proj, own), cos, sin)
    _, k_true = apply_rotary_pos_emb(k_own[:1], heads(attn.k_proj, true), cos, sin)
    v_own, v_true = heads(attn.v_proj, own), heads(attn.v_proj, true)
    groups = attn.num_key_value_groups  # grouped-query attention: each key/value head serves `groups` queries
    k_own, k_true, v_own, v_true = (x.repeat_interleave(groups, dim=1) for x in (k_own, k_true, v_own, v_true))
    prefix = (q @ k_true.transpose(-1, -2)) * attn.scaling  # (c, H, t, t): query t, true key s
    earlier = torch.ones(t, t, dtype=torch.bool, device=own.device).tril(-1)  # s < t
    prefix = prefix.masked_fill(~earlier, -math.inf)
    itself = (q * k_own).sum(-1, keepdim=True) * attn.scaling  # (c, H, t, 1)
    weights = torch.softmax(torch.cat([prefix, itself], -1), dim=-1)  # (c, H, t, t + 1)
    mixed = weights[..., :t] @ v_true + weights[..., t:] * v_own  # (c, H, t, head_dim)
    return attn.o_proj(mixed.transpose(1, 2).reshape(c, t, -1))  # (c, t, d)


class LlamaLM(SurfaceModel):
    """HF `LlamaForCausalLM` exposing the probing surface."""

    family: ClassVar[str] = "llama"
    config_class: ClassVar[type] = LlamaModelConfig
    # Measured on untrained llamas (embedding std ~0.02): benchmarks/RESULTS.md, "Default probe learning rates".
    probe_lr: ClassVar[Mapping[tuple[str, str], float]] = probe_lr_table(
        embedding_adam=0.005, embedding_gd=0.001, onehot_adam=0.1, onehot_gd=10.0)

    def __init__(self, config: LlamaModelConfig) -> None:
        super().__init__()
        self.config = config
        self.hf = LlamaForCausalLM(config.to_hf())
        self.blocks = self.hf.model.layers  # the HF ModuleList itself, not a copy

    @property
    def embedding_matrix(self) -> Tensor:
        """The input embedding matrix W_E, (vocab, d)."""
        return self.hf.model.embed_tokens.weight

    def embed(self, ids: Tensor) -> Tensor:
        """Token ids (b, t) -> input embeddings (b, t, d)."""
        return self.hf.model.embed_tokens(ids)

    def run_blocks(self, h: Tensor, start: int, stop: int) -> Tensor:
        """Apply decoder layers start..stop-1 to the hidden state after `start` layers (b, t, d)."""
        check_run(start, stop, h.shape[1], self.n_blocks, self.context_length)
        if start == stop:
            return h
        # Exactly what LlamaModel.forward prepares for its layers (no cache, no padding mask):
        # positions 0..t-1, RoPE (cos, sin) for them, and the causal mask (None for SDPA,
        # which then attends with is_causal=True).
        position_ids = torch.arange(h.shape[1], device=h.device)[None, :]  # (1, t)
        mask = create_causal_mask(
            config=self.hf.config, attention_mask=None, position_ids=position_ids, **_mask_arguments(h)
        )
        position_embeddings = self.hf.model.rotary_emb(h, position_ids=position_ids)  # 2 x (1, t, head_dim)
        for layer in self.blocks[start:stop]:
            h = layer(
                h, attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings
            )  # (b, t, d)
        return h

    def candidate_states(self, states: Sequence[Tensor], own: Tensor, upto: int) -> list[Tensor]:
        """Fast path of `SurfaceModel.candidate_states`: the true prefix's keys and values are computed once
        per layer; each candidate's query at t attends to them (positions < t) and to its own key."""
        t = own.shape[1]
        position_ids = torch.arange(t, device=own.device)[None, :]  # (1, t)
        cos, sin = self.hf.model.rotary_emb(own, position_ids=position_ids)  # 2 x (1, t, head_dim)
        out = []
        h = own  # (c, t, d)
        for j, layer in enumerate(self.blocks[:upto]):
            h = h + _attend_own(layer.self_attn, layer.input_layernorm(states[j])[None], layer.input_layernorm(h),
                                cos, sin)
            h = h + layer.mlp(layer.post_attention_layernorm(h))  # (c, t, d)
            out.append(h)
        return out

    def forward(self, ids: Tensor) -> Tensor:
        """Token ids (b, t) -> next-token logits (b, t, vocab)."""
        check_length(ids.shape[1], self.context_length)
        return self.hf(input_ids=ids, use_cache=False).logits  # (b, t, vocab)


def export_hf(model: LlamaLM, tokenizer: PreTrainedTokenizerFast | None, out_dir: Path) -> Path:
    """Save the model (safetensors) and tokenizer so `AutoModelForCausalLM.from_pretrained(out_dir)` works.

    With a tokenizer, config.json and generation_config.json carry its end-of-text and pad ids (stop at
    end-of-text, pad with pad), and the saved tokenizer's `model_max_length` is the model's context length,
    so HF tools truncate where the model ends instead of at the library's "unlimited" default.
    """
    out_dir = Path(out_dir)
    with staged_files(out_dir) as staging:  # HF writes its files 0600: staged, then written with the umask's mode
        if tokenizer is not None:
            eos_id = tokenizer.eos_token_id
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
            for config in (model.hf.config, model.hf.generation_config):
                config.eos_token_id = eos_id
                config.pad_token_id = pad_id
            saved = copy.deepcopy(tokenizer)  # the caller's tokenizer keeps its own limit
            saved.model_max_length = model.context_length
            saved.save_pretrained(staging)
        model.hf.save_pretrained(staging, safe_serialization=True)
    return out_dir
