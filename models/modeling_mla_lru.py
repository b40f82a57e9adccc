"""MLA + Latent Reasoning Unit decoder, as a ``transformers`` model. One file, in data-flow order:
attention (with the LRU refining its latent), the decoder layer, the backbone, the causal LM.

Shapes: B batch, T new tokens, S cached + new tokens, H heads, C latent (kv_lora_rank), R rotary head
size, Dn position-free head size, Dv value head size.

**MLA** (DeepSeek-V2, arXiv 2405.04434): keys and values come from a per-token latent c (C wide);
each head's key is [W_UK c ; rope(k_r)] with one rotary key k_r shared by all heads. The cache holds
only c and k_r: (C + R) numbers per token per layer (``models/cache.py``). Decoding folds W_UK into the
query and applies W_UV after attention ("absorption"), so no per-head key or value is ever built from
the cache.

**LRU** (``models/lru.py``: the update and the halting rule): K gated refinements of the latent before
attention. The refined latent is what attention reads and what the cache stores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2MLP,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from models.cache import LatentCache
from models.configuration import LatentReasoningConfig
from models.lru import LatentReasoningUnit, LRUResult, lru_summary


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) position of every token of a left-padded batch from its padding mask: 0 at each row's first
    real token (and on the pads before it), as ``generate()`` numbers them."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


# ---- attention --------------------------------------------------------------------------------------


def _as_bool_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A mask from ``create_causal_mask`` (bool for sdpa, additive float for eager) as True = attend."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask == 0


class MLAttention(nn.Module):
    def __init__(self, config: LatentReasoningConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_heads = config.num_attention_heads
        self.nope, self.rope, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.latent_dim = config.kv_lora_rank
        self.scaling = (self.nope + self.rope) ** -0.5
        self.num_key_value_groups = 1  # read by transformers' attention functions: K and V have H heads
        self.is_causal = True
        self.attention_dropout = config.attention_dropout
        h, d, bias = self.num_heads, config.hidden_size, config.attention_bias
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * (self.nope + self.rope), bias=False)
        else:
            self.q_a_proj = nn.Linear(d, config.q_lora_rank, bias=bias)
            self.q_a_layernorm = Qwen2RMSNorm(config.q_lora_rank, eps=config.rms_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, h * (self.nope + self.rope), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.latent_dim + self.rope, bias=bias)  # [c ; k_r]
        self.kv_a_layernorm = Qwen2RMSNorm(self.latent_dim, eps=config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.latent_dim, h * (self.nope + self.v_dim), bias=False)  # [W_UK ; W_UV]
        self.o_proj = nn.Linear(h * self.v_dim, d, bias=bias)
        self.lru = LatentReasoningUnit(config) if config.has_lru(layer_idx) else None

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q_proj(x) if self.config.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        b, t, _ = x.shape
        return q.view(b, t, self.num_heads, self.nope + self.rope).transpose(1, 2)  # (B, H, T, Dn+R)

    def forward(self, x: torch.Tensor, position_embeddings, attention_mask, valid: torch.Tensor,
                past_key_values: Cache | None = None, lru_diagnostics: bool = True, **kwargs):
        b, t, _ = x.shape
        q_nope, q_rope = self._queries(x).split([self.nope, self.rope], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.latent_dim, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)  # (B, T, C)
        lru_result = None
        if self.lru is not None:
            state = past_key_values.lru_states.get(self.layer_idx) if past_key_values is not None else None
            latent, lru_result, new_state = self.lru(latent, valid, state, diagnostics=lru_diagnostics)
            if past_key_values is not None:
                past_key_values.lru_states[self.layer_idx] = new_state
        cos, sin = position_embeddings
        q_rope, k_rope = apply_rotary_pos_emb(q_rope, k_rope.view(b, 1, t, self.rope), cos, sin)
        latent = latent.view(b, 1, t, self.latent_dim)  # single-head 4-D: what every cache layer stores
        if past_key_values is not None:
            latent, k_rope = past_key_values.update_latent(latent, k_rope, self.layer_idx)  # (B,1,S,C), (B,1,S,R)
        if self.config.mla_absorb and past_key_values is not None and t == 1:
            out = self._absorbed(q_nope, q_rope, latent, k_rope, attention_mask)
        else:
            out = self._naive(q_nope, q_rope, latent, k_rope, attention_mask, **kwargs)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.v_dim)), lru_result

    def _up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_dim, self.latent_dim)
        return w[:, : self.nope], w[:, self.nope:]  # W_UK (H, Dn, C), W_UV (H, Dv, C)

    def _naive(self, q_nope, q_rope, latent, k_rope, attention_mask, **kwargs) -> torch.Tensor:
        """Up-project every cached latent to per-head keys and values, then attend. -> (B, T, H, Dv)"""
        b, _, s, _ = latent.shape
        kv = self.kv_b_proj(latent.squeeze(1)).view(b, s, self.num_heads, self.nope + self.v_dim).transpose(1, 2)
        k_nope, value = kv.split([self.nope, self.v_dim], dim=-1)  # (B, H, S, Dn), (B, H, S, Dv)
        key = torch.cat([k_nope, k_rope.expand(-1, self.num_heads, -1, -1)], dim=-1)  # (B, H, S, Dn+R)
        query = torch.cat([q_nope, q_rope], dim=-1)
        impl = self.config._attn_implementation
        # Flash kernels, and SDPA's fast path on CPU, need one head size for query, key and value: pad the value.
        pad = impl.startswith(("flash", "sdpa")) and self.v_dim != self.nope + self.rope
        if pad:
            value = F.pad(value, (0, self.nope + self.rope - self.v_dim))
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)
        out, _ = attention(self, query, key, value, attention_mask, scaling=self.scaling,
                           dropout=self.attention_dropout if self.training else 0.0, **kwargs)
        return out[..., : self.v_dim] if pad else out

    def _absorbed(self, q_nope, q_rope, latent, k_rope, attention_mask) -> torch.Tensor:
        """Attend in latent space: score_s = (W_UK^T q_nope) . c_s + q_rope . k_r,s; out = W_UV (sum_s a_s c_s).
        The same numbers as ``_naive`` without building per-head keys or values. For one new token per
        sequence (T = 1, as ``forward`` calls it), so a (B, 1, 1, S) mask serves every head. -> (B, T, H, Dv)"""
        w_uk, w_uv = self._up_weights()
        b, h, t, _ = q_nope.shape
        q_latent = torch.einsum("bhtd,hdc->bhtc", q_nope, w_uk)  # (B, H, T, C)
        # One key per position serves every head, so the heads are folded into the query axis: one
        # (B, 1, H*T, S) attention. SDPA's enable_gqa would instead copy the cache once per head each step.
        # Two products instead of one on [c ; k_r]: concatenating would copy the whole cache every step.
        scores = (torch.matmul(q_latent.reshape(b, 1, h * t, -1), latent.transpose(-1, -2))
                  + torch.matmul(q_rope.reshape(b, 1, h * t, -1), k_rope.transpose(-1, -2))) * self.scaling
        mask = _as_bool_mask(attention_mask)
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        # Written out rather than SDPA: with a value narrower than the key, SDPA takes its math path on CPU,
        # several times slower than these three ops for one decode token (profiled).
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(latent.dtype)
        out_latent = torch.matmul(probs, latent)  # (B, 1, H*T, C)
        return torch.einsum("bhtc,hdc->bthd", out_latent.view(b, h, t, -1), w_uv)  # (B, T, H, Dv)


# ---- decoder --------------------------------------------------------------------------------------


class DecoderLayer(nn.Module):
    def __init__(self, config: LatentReasoningConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = MLAttention(config, layer_idx)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = Qwen2MLP(config)

    def forward(self, x, position_embeddings, attention_mask, valid, past_key_values=None, lru_diagnostics=True,
                **kwargs):
        attn, lru_result = self.self_attn(self.input_layernorm(x), position_embeddings, attention_mask, valid,
                                          past_key_values, lru_diagnostics, **kwargs)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), lru_result


@dataclass
class LatentReasoningOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus the LRU's auxiliary loss, its terms and its statistics.

    aux_loss: weighted sum of the terms (already included in ``loss`` when labels are given).
    aux_terms: {"last_update", "sparsity", "ponder"}: means over valid positions and LRU layers.
    lru_stats: {"iterations_mean", "iterations_max", "ponder", "convergence", "halting_distribution" (K,)}.
    lru_iterations: (L_lru, B, T) iterations run at every position of every LRU layer (0 at pads).
    lru_results, valid: each LRU layer's per-position report and the (B, T) mask of real tokens, for a
    caller that weighs positions itself (the trainer's shared-prompt forward, ``lru_summary``).
    """

    aux_loss: torch.FloatTensor | None = None
    aux_terms: dict[str, torch.Tensor] | None = None
    lru_stats: dict[str, torch.Tensor] | None = None
    lru_iterations: torch.Tensor | None = None
    lru_results: list[LRUResult] | None = None
    valid: torch.Tensor | None = None


@dataclass
class LatentReasoningModelOutput(BaseModelOutputWithPast):
    """The decoder's output plus each LRU layer's report and the (B, T) mask of real (non-pad) tokens."""

    lru_results: list[LRUResult] | None = None
    valid: torch.Tensor | None = None


class LatentReasoningPreTrainedModel(PreTrainedModel):
    config_class = LatentReasoningConfig
    config: LatentReasoningConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, nn.Linear) and hasattr(module, "update_gate_bias"):
            # Start close to the identity: a mostly closed update gate, so training begins from plain MLA.
            # (Set on the Linear itself: transformers skips initialising modules without own parameters.)
            init.constant_(module.bias[: module.out_features // 2], module.update_gate_bias)


class LatentReasoningModel(LatentReasoningPreTrainedModel):
    def __init__(self, config: LatentReasoningConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, lru_diagnostics: bool = True, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        b, t, _ = x.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = LatentCache(config=self.config)
        if past_key_values is not None and self.config.use_lru and not isinstance(past_key_values, LatentCache):
            raise ValueError(f"an LRU model needs a LatentCache (it keeps the LRU state), got "
                             f"{type(past_key_values).__name__}; pass models.LatentCache(config=model.config)")
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=x.device)[None]
        valid = self._valid_positions(attention_mask, b, t, x.device)
        if self.config.mla_absorb and past_key_values is not None and t == 1 and attention_mask is not None:
            # One new token attends to every real cached token: the padding mask is the whole mask, and
            # only the absorbed path reads it. create_causal_mask's general machinery is skipped per token.
            mask = attention_mask[:, None, None, :].bool()  # (B, 1, 1, S)
        else:
            mask = create_causal_mask(config=self.config, inputs_embeds=x, attention_mask=attention_mask,
                                      past_key_values=past_key_values, position_ids=position_ids)
        position_embeddings = self.rotary_emb(x, position_ids)
        results = []
        for layer in self.layers:
            x, lru_result = layer(x, position_embeddings, mask, valid, past_key_values, lru_diagnostics, **kwargs)
            if lru_result is not None:
                results.append(lru_result)
        return LatentReasoningModelOutput(last_hidden_state=self.norm(x), past_key_values=past_key_values,
                                          lru_results=results, valid=valid)

    @staticmethod
    def _valid_positions(attention_mask, b: int, t: int, device) -> torch.Tensor:
        """(B, T) bool: which of the new tokens are real (not padding), from the 2-D padding mask."""
        if attention_mask is None:
            return torch.ones(b, t, dtype=torch.bool, device=device)
        if attention_mask.dim() != 2:
            raise ValueError("pass the 2-D padding mask (B, past + T); the LRU needs to know which tokens are padding")
        return attention_mask[:, -t:].bool()


class LatentReasoningForCausalLM(LatentReasoningPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LatentReasoningConfig):
        super().__init__(config)
        self.model = LatentReasoningModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep: int = 0, lru_diagnostics: bool = True,
                **kwargs) -> LatentReasoningOutput:
        """``lru_diagnostics=False`` (for decoding) skips the LRU's auxiliary loss and statistics: the output
        then has no aux_loss, aux_terms, lru_stats or lru_iterations."""
        if labels is not None and not lru_diagnostics and self.config.use_lru:
            raise ValueError("lru_diagnostics=False drops the LRU's auxiliary loss: keep it True when passing labels")
        base = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                          lru_diagnostics=lru_diagnostics, **kwargs)
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        logits = self.lm_head(base.last_hidden_state[:, keep])  # (B, T, V)
        out = LatentReasoningOutput(logits=logits, past_key_values=base.past_key_values)
        if base.lru_results and lru_diagnostics:
            out.aux_loss, out.aux_terms, out.lru_stats, out.lru_iterations = lru_summary(
                base.lru_results, base.valid, self.config)
            out.lru_results, out.valid = base.lru_results, base.valid
        if labels is not None:
            out.loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
            if out.aux_loss is not None:
                out.loss = out.loss + out.aux_loss
        return out

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # generate() would build a plain DynamicCache; the LRU state needs a LatentCache.
        if model_kwargs.get("past_key_values") is None and generation_config.use_cache is not False:
            model_kwargs["past_key_values"] = LatentCache(config=self.config)
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)


__all__ = ["LatentReasoningForCausalLM", "LatentReasoningModel", "LatentReasoningModelOutput", "LatentReasoningOutput",
           "LatentReasoningPreTrainedModel", "position_ids_from_mask"]
