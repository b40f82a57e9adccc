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

**As a transformers model**: ``output_hidden_states`` / ``output_attentions`` are collected by transformers'
own hooks (``capture_outputs``, ``_can_record_outputs``); attention weights come from an explicit softmax
(the absorbed path's own, or transformers' eager attention), whatever the attention implementation.
``return_dict=False`` gives tuples. Decoder layers are ``GradientCheckpointingLayer``s. Packed rows
(``position_ids`` restarting at 0, no padding mask) reset the LRU at every start. Static caches and
``torch.compile(fullgraph=True)``: MLA alone only; the LRU's halting is data-dependent, so the LRU groups
refuse a static cache and run the unit eagerly under torch.compile.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2MLP,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.utils import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from models.cache import LatentCache
from models.configuration import LatentReasoningConfig
from models.lru import LatentReasoningUnit, LRUResult, eager_under_compile, lru_summary

# generate(cache_implementation=...) values that give a LatentCache, where the LRU groups keep their state.
DYNAMIC_CACHES = (None, "dynamic", "offloaded")


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) position of every token of a left-padded batch from its padding mask: 0 at each row's first
    real token (and on the pads before it), as ``generate()`` numbers them."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


@eager_under_compile  # data-dependent too, and only the LRU reads it
def sequence_starts(position_ids: torch.Tensor, attention_mask: torch.Tensor | None, past: int, b: int,
                    t: int) -> torch.Tensor | None:
    """(B, T) bool: the new tokens where a packed row begins another sequence (position_id 0 after a real
    token, as padding-free packing lays rows out), or None when no row does. Left padding is no start: its
    pads come before any real token. Costs one check when no position_id is 0 (every decode step)."""
    zero = (position_ids == 0).expand(b, t)
    if not bool(zero.any()):
        return None
    if attention_mask is None:  # every earlier token is real
        earlier = (torch.arange(t, device=zero.device) + past > 0).expand(b, t)
    else:
        mask = attention_mask.long()
        earlier = (mask.cumsum(-1) - mask)[:, -t:] > 0  # real tokens before each new one, cached ones included
    starts = zero & earlier
    return starts if bool(starts.any()) else None


class RotaryEmbedding(Qwen2RotaryEmbedding):
    """transformers' rotary embedding of the R rotary dimensions; with ``config.rope_inv_freq`` (a retrofitted
    model: the frequencies kept from the source's heads) those inverse frequencies instead of rope_theta's
    series. transformers recomputes the buffer through this method when it initialises a loaded model."""

    @staticmethod
    def compute_default_rope_parameters(config: LatentReasoningConfig, **kwargs) -> tuple[torch.Tensor, float]:
        if getattr(config, "rope_inv_freq", None) is None:
            return Qwen2RotaryEmbedding.compute_default_rope_parameters(config, **kwargs)
        return torch.tensor(config.rope_inv_freq, dtype=torch.float), 1.0


# ---- attention --------------------------------------------------------------------------------------


def _as_bool_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A mask from ``create_causal_mask`` (bool for sdpa, additive float for eager) as True = attend."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask == 0


def _as_additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A mask from ``create_causal_mask`` as the additive float mask eager attention adds to its scores."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


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
            self.q_proj = nn.Linear(d, h * (self.nope + self.rope), bias=config.q_proj_bias)
        else:
            self.q_a_proj = nn.Linear(d, config.q_lora_rank, bias=bias)
            self.q_a_layernorm = Qwen2RMSNorm(config.q_lora_rank, eps=config.rms_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, h * (self.nope + self.rope), bias=config.q_proj_bias)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.latent_dim + self.rope, bias=bias)  # [c ; k_r]
        # Without the norm (a retrofitted model) keys and values are linear in x, as GQA's are.
        self.kv_a_layernorm = (Qwen2RMSNorm(self.latent_dim, eps=config.rms_norm_eps) if config.kv_latent_norm
                               else nn.Identity())
        self.kv_b_proj = nn.Linear(self.latent_dim, h * (self.nope + self.v_dim), bias=False)  # [W_UK ; W_UV]
        self.o_proj = nn.Linear(h * self.v_dim, d, bias=bias)
        self.lru = LatentReasoningUnit(config) if config.has_lru(layer_idx) else None

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q_proj(x) if self.config.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        b, t, _ = x.shape
        return q.view(b, t, self.num_heads, self.nope + self.rope).transpose(1, 2)  # (B, H, T, Dn+R)

    def forward(self, x: torch.Tensor, position_embeddings, attention_mask, valid: torch.Tensor | None,
                past_key_values: Cache | None = None, starts: torch.Tensor | None = None, lru_diagnostics: bool = True,
                output_attentions: bool = False, **kwargs):
        """-> output (B, T, d), attention weights (B, H, T, S) when ``output_attentions`` (else None), LRU report.
        The weights sit second, where transformers' output hooks read every attention's."""
        b, t, _ = x.shape
        q_nope, q_rope = self._queries(x).split([self.nope, self.rope], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.latent_dim, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)  # (B, T, C)
        lru_result = None
        if self.lru is not None:
            latent, lru_result = self._refine_latent(latent, valid, starts, past_key_values, lru_diagnostics)
        cos, sin = position_embeddings
        q_rope, k_rope = apply_rotary_pos_emb(q_rope, k_rope.view(b, 1, t, self.rope), cos, sin)
        latent = latent.view(b, 1, t, self.latent_dim)  # single-head 4-D: what every cache layer stores
        if past_key_values is not None:
            # Any transformers cache (MLA alone takes a static one): c in the keys slot, k_r in the values slot.
            latent, k_rope = past_key_values.update(latent, k_rope, self.layer_idx)  # (B,1,S,C), (B,1,S,R)
        if self.config.mla_absorb and past_key_values is not None and t == 1:
            out, weights = self._absorbed(q_nope, q_rope, latent, k_rope, attention_mask)
        else:
            out, weights = self._naive(q_nope, q_rope, latent, k_rope, attention_mask, output_attentions, **kwargs)
        out = self.o_proj(out.reshape(b, t, self.num_heads * self.v_dim))
        return out, weights if output_attentions else None, lru_result

    def _refine_latent(self, latent: torch.Tensor, valid: torch.Tensor, starts: torch.Tensor | None,
                       cache: Cache | None, diagnostics: bool) -> tuple[torch.Tensor, LRUResult]:
        """Run the LRU on this call's latents (B, T, C) from the cache's LRU state, and store its new state
        (and, while the cache records for rollback, the state after every position)."""
        state = cache.lru_states.get(self.layer_idx) if cache is not None else None
        record = cache is not None and cache.record_past
        latent, result, new_state = self.lru(latent, valid, state, diagnostics=diagnostics, starts=starts, trail=record)
        if cache is not None:
            cache.update_lru_state(self.layer_idx, new_state, result.trail)
        return latent, result

    def _up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_dim, self.latent_dim)
        return w[:, : self.nope], w[:, self.nope:]  # W_UK (H, Dn, C), W_UV (H, Dv, C)

    def _naive(self, q_nope, q_rope, latent, k_rope, attention_mask, output_attentions: bool = False, **kwargs):
        """Up-project every cached latent to per-head keys and values, then attend. -> (B, T, H, Dv), weights.
        ``output_attentions`` goes through transformers' eager attention, the one that returns its weights."""
        b, _, s, _ = latent.shape
        kv = self.kv_b_proj(latent.squeeze(1)).view(b, s, self.num_heads, self.nope + self.v_dim).transpose(1, 2)
        k_nope, value = kv.split([self.nope, self.v_dim], dim=-1)  # (B, H, S, Dn), (B, H, S, Dv)
        key = torch.cat([k_nope, k_rope.expand(-1, self.num_heads, -1, -1)], dim=-1)  # (B, H, S, Dn+R)
        query = torch.cat([q_nope, q_rope], dim=-1)
        impl = "eager" if output_attentions else self.config._attn_implementation
        if output_attentions:
            attention_mask = _as_additive_mask(attention_mask, query.dtype)
        # Flash kernels, and SDPA's fast path on CPU, need one head size for query, key and value: pad the value.
        pad = impl.startswith(("flash", "sdpa")) and self.v_dim != self.nope + self.rope
        if pad:
            value = F.pad(value, (0, self.nope + self.rope - self.v_dim))
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)
        out, weights = attention(self, query, key, value, attention_mask, scaling=self.scaling,
                                 dropout=self.attention_dropout if self.training else 0.0, **kwargs)
        return (out[..., : self.v_dim] if pad else out), weights

    def _absorbed(self, q_nope, q_rope, latent, k_rope, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend in latent space: score_s = (W_UK^T q_nope) . c_s + q_rope . k_r,s; out = W_UV (sum_s a_s c_s).
        The same numbers as ``_naive`` without building per-head keys or values. For one new token per
        sequence (T = 1, as ``forward`` calls it), so a (B, 1, 1, S) mask serves every head.
        -> (B, T, H, Dv), attention weights (B, H, T, S)"""
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
        out = torch.einsum("bhtc,hdc->bthd", out_latent.view(b, h, t, -1), w_uv)  # (B, T, H, Dv)
        return out, probs.view(b, h, t, -1)


# ---- decoder --------------------------------------------------------------------------------------


class DecoderLayer(GradientCheckpointingLayer):
    """Pre-norm attention and MLP. A ``GradientCheckpointingLayer``: with gradient checkpointing on, its
    forward is recomputed in the backward pass (the backbone then refuses a cache, which it would write twice)."""

    def __init__(self, config: LatentReasoningConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = MLAttention(config, layer_idx)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = Qwen2MLP(config)

    def forward(self, x, position_embeddings, attention_mask, valid, past_key_values=None, **kwargs):
        """-> x (B, T, d) (first: what transformers' hidden-state hooks read), the LRU report."""
        attn, _, lru_result = self.self_attn(self.input_layernorm(x), position_embeddings, attention_mask, valid,
                                             past_key_values=past_key_values, **kwargs)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), lru_result


@dataclass
class LatentReasoningOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus the LRU's auxiliary loss, its terms and its statistics.

    aux_loss: weighted sum of the terms (already included in ``loss`` when labels are given).
    aux_terms: {"stability", "sparsity", "ponder"}: means over valid positions and LRU layers.
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
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    # What transformers' output hooks collect: each layer's output, each attention's weights (its 2nd output).
    _can_record_outputs = {"hidden_states": DecoderLayer, "attentions": MLAttention}

    def __init__(self, config: LatentReasoningConfig, *inputs, **kwargs):
        super().__init__(config, *inputs, **kwargs)
        # Per model, not per class: MLA alone compiles as one graph (with a StaticCache); the LRU does not.
        self._can_compile_fullgraph = not config.use_lru

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, nn.Linear) and hasattr(module, "update_gate_bias"):
            # Start close to the identity: a mostly closed update gate, so training begins from plain MLA.
            # (Set on the Linear itself: transformers skips initialising modules without own parameters.)
            init.constant_(module.bias[: module.out_features // 2], module.update_gate_bias)
        if isinstance(module, LatentReasoningUnit) and module.residual_gate is not None:
            init.zeros_(module.residual_gate)  # the unit starts as an exact no-op (retrofitted models)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        if self.config.use_lru and (gradient_checkpointing_kwargs or {}).get("use_reentrant", False):
            raise ValueError("use_reentrant=True: reentrant checkpointing does not differentiate through the LRU "
                             "report a layer returns (the auxiliary loss would get no gradient); use the default "
                             "use_reentrant=False")
        super().gradient_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def _build_backbone(self, config: LatentReasoningConfig) -> None:
        """The modules of a backbone, under the names its checkpoints use; shared by the backbones (this file's
        and the looped control, which runs the same layers in another order)."""
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def _inputs(self, input_ids, inputs_embeds, position_ids, cache: Cache | None):
        """A backbone forward's new tokens: (embeddings (B, T, d), position ids (1, T) unless given, the number of
        tokens already in ``cache``)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(x.shape[1], device=x.device) + past)[None]
        return x, position_ids, past

    def _output_attentions(self, kwargs: dict) -> bool:
        """Whether to return attention weights (taken out of ``kwargs``: not an attention-function argument).
        Shared by the backbones (this one and the looped control)."""
        wanted = kwargs.pop("output_attentions", None)
        wanted = bool(self.config.output_attentions if wanted is None else wanted)
        if wanted and self.config._attn_implementation not in ("eager", "sdpa"):
            raise ValueError(f"output_attentions=True with attn_implementation={self.config._attn_implementation!r}: "
                             "its kernels return no weights; load the model with attn_implementation='sdpa' or 'eager'")
        return wanted


class LatentReasoningModel(LatentReasoningPreTrainedModel):
    def __init__(self, config: LatentReasoningConfig):
        super().__init__(config)
        self._build_backbone(config)

    @capture_outputs
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                use_cache=None, lru_diagnostics: bool = True, **kwargs) -> LatentReasoningModelOutput:
        """As every transformers decoder, ``output_hidden_states`` (L+1 of (B, T, d), the last one normed),
        ``output_attentions`` (L of (B, H, T, S)) and ``return_dict`` are read by ``capture_outputs``."""
        output_attentions = self._output_attentions(kwargs)
        kwargs.pop("output_hidden_states", None)  # collected by the hooks, not an attention argument
        past_key_values = self._cache(use_cache, past_key_values)
        x, position_ids, past = self._inputs(input_ids, inputs_embeds, position_ids, past_key_values)
        b, t, _ = x.shape
        valid = self._valid_positions(attention_mask, b, t, x.device)
        starts = sequence_starts(position_ids, attention_mask, past, b, t) if self.config.use_lru else None
        mask = self._attention_mask(x, attention_mask, past_key_values, position_ids, output_attentions)
        position_embeddings = self.rotary_emb(x, position_ids)
        results = []
        for layer in self.layers:  # x positional: reentrant checkpointing passes gradients through positionals only
            x, lru_result = layer(x, position_embeddings, mask, valid, past_key_values=past_key_values, starts=starts,
                                  lru_diagnostics=lru_diagnostics, output_attentions=output_attentions, **kwargs)
            if lru_result is not None:
                results.append(lru_result)
        return LatentReasoningModelOutput(last_hidden_state=self.norm(x), past_key_values=past_key_values,
                                          lru_results=results, valid=valid)

    def _cache(self, use_cache: bool | None, past_key_values: Cache | None) -> Cache | None:
        """The cache this forward reads and writes: the one passed, a new ``LatentCache`` (use_cache), or None."""
        if self.gradient_checkpointing and self.training:
            if past_key_values is not None or use_cache:
                raise ValueError("gradient checkpointing recomputes every layer in the backward pass, which would "
                                 "write the cache (and the LRU state) a second time: pass no past_key_values and "
                                 "use_cache=False while training with it, or call model.eval() to decode")
            return None
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = LatentCache(config=self.config)
        if past_key_values is not None and self.config.use_lru and not isinstance(past_key_values, LatentCache):
            raise ValueError(f"an LRU model needs a LatentCache (it keeps the LRU state), got "
                             f"{type(past_key_values).__name__}; pass models.LatentCache(config=model.config). "
                             "Static caches are for the mla_only group: the LRU's halting is data-dependent")
        return past_key_values

    def _valid_positions(self, attention_mask, b: int, t: int, device) -> torch.Tensor | None:
        """(B, T) bool: which of the new tokens are real (not padding), from the 2-D padding mask. A prepared
        4-D mask (generate() with a static cache) has no such rows: MLA alone needs none (None), the LRU does."""
        if attention_mask is None:
            return torch.ones(b, t, dtype=torch.bool, device=device)
        if attention_mask.dim() == 2:
            return attention_mask[:, -t:].bool()
        if self.config.use_lru:
            raise ValueError("pass the 2-D padding mask (B, past + T); the LRU needs to know which tokens are padding")
        return None

    def _attention_mask(self, x, attention_mask, cache, position_ids, output_attentions: bool):
        """The mask every layer reads: (B, 1, T, S) from transformers' ``create_causal_mask`` (None where SDPA's
        own causal mode serves), or the padding mask itself for one decode token on the absorbed path."""
        if (self.config.mla_absorb and x.shape[1] == 1 and isinstance(cache, DynamicCache)
                and attention_mask is not None and attention_mask.dim() == 2):
            # One new token attends to every real cached token: the padding mask is the whole mask, and
            # only the absorbed path reads it. create_causal_mask's general machinery is skipped per token.
            return attention_mask[:, None, None, :].bool()  # (B, 1, 1, S)
        # Attention weights, and the absorbed path over a static cache's unused tail, need a mask to apply:
        # never the None that stands for SDPA's causal mode.
        skip = not output_attentions and not (cache is not None and cache.is_compileable)
        return create_causal_mask(config=self.config, inputs_embeds=x, attention_mask=attention_mask,
                                  past_key_values=cache, position_ids=position_ids, allow_is_causal_skip=skip)


class LatentReasoningForCausalLM(LatentReasoningPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LatentReasoningConfig):
        super().__init__(config)
        self.model = LatentReasoningModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep: int | torch.Tensor = 0,
                lru_diagnostics: bool = True, **kwargs) -> LatentReasoningOutput:
        """``lru_diagnostics=False`` (for decoding) skips the LRU's auxiliary loss and statistics: the output
        then has no aux_loss, aux_terms, lru_stats or lru_iterations."""
        if labels is not None and not lru_diagnostics and self.config.use_lru:
            raise ValueError("lru_diagnostics=False drops the LRU's auxiliary loss: keep it True when passing labels")
        base = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                          lru_diagnostics=lru_diagnostics, return_dict=True, **kwargs)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(base.last_hidden_state[:, keep])  # (B, T, V)
        lru = bool(base.lru_results) and lru_diagnostics
        aux, terms, stats, iterations = lru_summary(base.lru_results, base.valid, self.config) if lru else (None,) * 4
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
            loss = loss if aux is None else loss + aux
        # Built whole, in field order: return_dict=False gives the fields set, in that order (loss first).
        return LatentReasoningOutput(loss=loss, logits=logits, past_key_values=base.past_key_values,
                                     hidden_states=base.hidden_states, attentions=base.attentions, aux_loss=aux,
                                     aux_terms=terms, lru_stats=stats, lru_iterations=iterations,
                                     lru_results=base.lru_results if lru else None, valid=base.valid if lru else None)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate() would build a plain DynamicCache; the LRU state needs a LatentCache (MLA alone gains its
        in-place writes too). An assistant's cache records for rollback: its rejected drafts are cropped."""
        implementation = generation_config.cache_implementation
        if model_kwargs.get("past_key_values") is not None or generation_config.use_cache is False:
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if implementation in DYNAMIC_CACHES:
            cache = LatentCache(config=self.config, offloading=implementation == "offloaded")
            if generation_config.is_assistant:
                cache.activate_past_recording()
            model_kwargs["past_key_values"] = cache
            return None
        if self.config.use_lru:
            raise ValueError(
                f"cache_implementation={implementation!r}: the LRU groups keep a per-sequence LRU state that only a "
                f"LatentCache holds, and their data-dependent halting rules out the static shapes that static caches "
                f"and torch.compile(fullgraph=True) need; use cache_implementation=None (a LatentCache), or the "
                f"mla_only group")
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)


__all__ = ["LatentReasoningForCausalLM", "LatentReasoningModel", "LatentReasoningModelOutput", "LatentReasoningOutput",
           "LatentReasoningPreTrainedModel", "RotaryEmbedding", "position_ids_from_mask", "sequence_starts"]
