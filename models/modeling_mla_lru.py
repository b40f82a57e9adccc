"""MLA + Latent Reasoning Unit decoder, as a ``transformers`` model. One file, in data-flow order.

Shapes: B batch, T new tokens, S cached + new tokens, H heads, C latent (kv_lora_rank), R rotary head
size, Dn position-free head size, Dv value head size, K LRU iterations, W conv kernel.

**MLA** (DeepSeek-V2, arXiv 2405.04434): keys and values come from a per-token latent c (C wide);
each head's key is [W_UK c ; rope(k_r)] with one rotary key k_r shared by all heads. The cache holds
only c and k_r: (C + R) numbers per token per layer. Decoding folds W_UK into the query and applies
W_UV after attention ("absorption"), so no per-head key or value is ever built from the cache.

**LRU** (this project): K gated refinements of the latent before attention. Why this mechanism:
a latent that sees only its own token cannot combine variables stated at other positions, so each
iteration first mixes positions with a *causal depthwise convolution* over the previous iteration's
states of the last W tokens, then applies a GRU-style update (Cho et al. 2014, arXiv 1406.1078):

    m_t = sum_j w_j * h^{k-1}_{t-W+1+j}                        (causal, per channel)
    z, r = sigmoid(W_zr [h^{k-1}_t ; m_t]);  h~ = tanh(W_h [r * h^{k-1}_t ; m_t])
    h^k_t = (1 - z) * h^{k-1}_t + z * h~

It stays causal (position t reads only positions <= t), and exact under caching with a state per
sequence of fixed size, like a short-convolution layer in vLLM: the last W-1 inputs of every iteration,
(K, W-1, C). The receptive field grows by W-1 positions per iteration. The refined latent is what
attention reads and what the cache stores, so the MLA cache itself is unchanged.

**Halting**: ``fixed`` runs exactly K iterations and returns h^K. ``adaptive`` is ACT (Graves 2016,
arXiv 1603.08983) per position: halting probabilities p^n, N = first n with sum p >= 1 - eps (or K),
remainder R = 1 - sum_{n<N} p^n, output sum_{n<N} p^n h^n + R h^N (weights sum to 1), ponder cost
N + R. A halted position is frozen: later iterations of its neighbours read its frozen state. An
optional per-sequence signal (sigmoid of a projection of the causal running mean of the states over
positions <= t) is mixed into p; its running sums are part of the per-sequence state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
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

from models.configuration import LatentReasoningConfig

# ---- LRU -----------------------------------------------------------------------------------------


@dataclass
class LRUState:
    """Per-sequence state of one layer's LRU between forward calls (nothing grows with length)."""

    conv: torch.Tensor  # (B, K, W-1, C): the last W-1 inputs of every iteration
    running_sum: torch.Tensor | None = None  # (B, K, C): sum of each iteration's states over positions so far
    count: torch.Tensor | None = None  # (B,): valid positions so far

    def index_select(self, index: torch.Tensor) -> LRUState:
        pick = lambda t: None if t is None else t.index_select(0, index.to(t.device))  # noqa: E731
        return LRUState(pick(self.conv), pick(self.running_sum), pick(self.count))


@dataclass
class LRUResult:
    """What one LRU call reports, per position (pads hold 0)."""

    iterations: torch.Tensor  # (B, T) iterations run, N
    remainder: torch.Tensor  # (B, T) ACT remainder R (1 in fixed mode)
    # The diagnostics below are None when the call was made with diagnostics=False (fast decoding).
    weights: torch.Tensor | None = None  # (B, T, K) weight of each iteration's state in the output; sums to 1
    stability: torch.Tensor | None = None  # (B, T) squared size of the last update relative to the input latent
    sparsity: torch.Tensor | None = None  # (B, T) Hoyer-square of the output divided by C, in [1/C, 1]
    convergence: torch.Tensor | None = None  # (B, T) |last update| / |first update|
    halting_probs: torch.Tensor | None = None  # (B, T, K) p^n of every iteration (adaptive mode; 0 once halted)
    states: torch.Tensor | None = None  # (K+1, B, T, C) h^0..h^K, only with return_states


class LatentReasoningUnit(nn.Module):
    def __init__(self, config: LatentReasoningConfig):
        super().__init__()
        c = config.kv_lora_rank
        self.iterations = config.lru_max_iterations
        self.kernel = config.lru_conv_kernel
        self.adaptive = config.lru_halting == "adaptive"
        self.epsilon = config.lru_act_epsilon
        self.global_mix = config.lru_global_halting
        self.conv = nn.Conv1d(c, c, self.kernel, groups=c)  # depthwise: (C, 1, W) weights
        self.gates = nn.Linear(2 * c, 2 * c)  # update z and reset r from [h ; m]
        self.gates.update_gate_bias = config.lru_update_gate_bias  # read by _init_weights
        self.candidate = nn.Linear(2 * c, c)  # h~ from [r * h ; m]
        self.halt = nn.Linear(c, 1) if self.adaptive else None
        self.halt_global = nn.Linear(c, 1) if self.global_mix > 0 else None

    def empty_state(self, latent: torch.Tensor) -> LRUState:
        b, _, c = latent.shape
        zeros = lambda *shape: latent.new_zeros(shape)  # noqa: E731
        if self.halt_global is None:
            return LRUState(zeros(b, self.iterations, self.kernel - 1, c))
        return LRUState(zeros(b, self.iterations, self.kernel - 1, c), zeros(b, self.iterations, c), zeros(b))

    def _step(self, h: torch.Tensor, window: torch.Tensor, running: torch.Tensor) -> torch.Tensor:
        """One refinement of the running positions of h (B, T, C), given its causal window (B, W-1+T, C).
        Halted positions and pads come back unchanged and cost nothing: only running rows go through the
        gates, so adaptive halting saves the work of the iterations it skips."""
        # The depthwise convolution written out as a weighted sum over the W taps of each position: the
        # same numbers as self.conv, without a oneDNN call that costs ~150 us even for one decode token.
        taps = window.unfold(1, self.kernel, 1)  # (B, T, C, W)
        mixed = (taps * self.conv.weight.squeeze(1)).sum(-1) + self.conv.bias  # (B, T, C)
        if bool(running.all()):
            return self._gru(h, mixed)
        rows = running.nonzero(as_tuple=True)
        return h.index_put(rows, self._gru(h[rows], mixed[rows]))

    def _gru(self, h: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
        z, r = torch.sigmoid(self.gates(torch.cat([h, mixed], dim=-1))).chunk(2, dim=-1)
        candidate = torch.tanh(self.candidate(torch.cat([r * h, mixed], dim=-1)))
        return (1 - z) * h + z * candidate

    def _halting_probability(self, h: torch.Tensor, k: int, valid: torch.Tensor, state: LRUState,
                             new_state: LRUState) -> torch.Tensor:
        """p (B, T) of iteration k: local, optionally mixed with the causal per-sequence signal."""
        p = torch.sigmoid(self.halt(h)).squeeze(-1)
        if self.halt_global is None:
            return p
        sums = state.running_sum[:, k, None] + torch.cumsum(h * valid[..., None], dim=1)  # (B, T, C)
        counts = state.count[:, None] + torch.cumsum(valid.to(h.dtype), dim=1)  # (B, T)
        new_state.running_sum[:, k] = sums[:, -1]
        p_global = torch.sigmoid(self.halt_global(sums / counts.clamp(min=1)[..., None])).squeeze(-1)
        return (1 - self.global_mix) * p + self.global_mix * p_global

    def forward(self, latent: torch.Tensor, valid: torch.Tensor, state: LRUState | None, return_states: bool = False,
                diagnostics: bool = True):
        """latent (B, T, C), valid (B, T) bool -> refined latent (B, T, C), LRUResult, new LRUState.
        ``diagnostics=False`` skips what only the auxiliary loss and the statistics read (a rollout's decode
        steps): the result then holds iterations and remainders only."""
        state = state or self.empty_state(latent)
        b, t, c = latent.shape
        keep = valid[..., None]  # masking by torch.where, not multiplication: pad rows may hold inf/NaN
        new_state = LRUState(torch.empty_like(state.conv),  # every slot is written below
                             None if state.running_sum is None else torch.empty_like(state.running_sum),
                             None if state.count is None else state.count + valid.sum(dim=1))
        h = torch.where(keep, latent, 0.0)  # pads hold zero states, as positions before a sequence's start do
        running = valid.clone()  # positions still iterating
        cumulative = latent.new_zeros(b, t)
        output = latent.new_zeros(b, t, c)
        weights = latent.new_zeros(b, t, self.iterations)
        iterations, remainder = latent.new_zeros(b, t), latent.new_zeros(b, t)
        probs = latent.new_zeros(b, t, self.iterations)
        states = [h] if return_states else None
        first_step, last_step = latent.new_zeros(b, t), latent.new_zeros(b, t)
        for k in range(self.iterations):
            window = torch.cat([state.conv[:, k], h], dim=1)  # (B, W-1+T, C)
            new_state.conv[:, k] = window[:, window.shape[1] - (self.kernel - 1):]
            if not bool(running.any()):  # everything halted: the remaining iterations change nothing
                if new_state.running_sum is not None:  # but the frozen states still enter the running means
                    new_state.running_sum[:, k] = state.running_sum[:, k] + (h * valid[..., None]).sum(1)
                if return_states:
                    states.append(h)
                continue
            h_new = self._step(h, window, running)  # halted positions stay frozen
            if diagnostics:
                step = (h_new - h).norm(dim=-1)  # (B, T)
                first_step = step if k == 0 else first_step
            if self.adaptive:
                p = self._halting_probability(h_new, k, valid, state, new_state)
                if diagnostics:
                    probs[..., k] = torch.where(running, p, torch.zeros_like(p))
                halts = running & ((cumulative + p >= 1 - self.epsilon) | (k == self.iterations - 1))
                weight = torch.where(halts, 1 - cumulative, torch.where(running, p, torch.zeros_like(p)))
                remainder = torch.where(halts, 1 - cumulative, remainder)
                cumulative = torch.where(running & ~halts, cumulative + p, cumulative)
            else:
                halts = running & (k == self.iterations - 1)
                weight = halts.to(latent.dtype)
                remainder = torch.where(halts, torch.ones_like(remainder), remainder)
            output = output + weight[..., None] * h_new
            iterations = iterations + running.to(latent.dtype)
            if diagnostics:
                weights[..., k] = weight
                last_step = torch.where(halts, step, last_step)
            running = running & ~halts
            h = h_new
            if return_states:
                states.append(h)
        if not diagnostics:
            return output, LRUResult(iterations=iterations, remainder=remainder * valid), new_state
        result = LRUResult(
            iterations=iterations,
            remainder=remainder * valid,
            weights=weights,
            stability=last_step.square() / (latent.square().sum(-1) + 1e-6) * valid,
            sparsity=output.abs().sum(-1).square() / (output.square().sum(-1) * c + 1e-12) * valid,
            convergence=last_step / (first_step + 1e-6) * valid,
            halting_probs=probs if self.adaptive else None,
            states=torch.stack(states) if return_states else None,
        )
        return output, result, new_state


# ---- cache ----------------------------------------------------------------------------------------


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` that writes new tokens into spare capacity instead of concatenating, so a decode
    step copies one token rather than the whole cache; the buffer doubles when full. ``keys``/``values``
    are views of the filled prefix. Anything that replaces them (reorder, select, repeat) is noticed by
    the buffer check in ``update`` and re-seeds the buffer, so the inherited methods stay correct."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        buffers = getattr(self, "_buffers", None)
        if buffers is None or end > buffers[0].shape[-2] or buffers[0].data_ptr() != self.keys.data_ptr():
            buffers = tuple(self._grown(old, new, length, max(2 * end, 64))
                            for old, new in ((self.keys, key_states), (self.values, value_states)))
            self._buffers = buffers
        buffers[0][..., length:end, :] = key_states
        buffers[1][..., length:end, :] = value_states
        self.keys, self.values = buffers[0][..., :end, :], buffers[1][..., :end, :]
        return self.keys, self.values

    @staticmethod
    def _grown(old: torch.Tensor, new: torch.Tensor, length: int, capacity: int) -> torch.Tensor:
        buffer = new.new_empty(*new.shape[:-2], capacity, new.shape[-1])
        if length:
            buffer[..., :length, :] = old
        return buffer


class GrowingCache(DynamicCache):
    """A ``DynamicCache`` whose full-attention layers are ``GrowingLayer``s (sliding-window layers stay)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in self.layers]
        if self.layer_class_to_replicate is DynamicLayer:
            self.layer_class_to_replicate = GrowingLayer


class LatentCache(GrowingCache):
    """A ``GrowingCache`` whose layers hold the MLA latent (as keys, (B, 1, S, C)) and the rotary key (as
    values, (B, 1, S, R)), plus each LRU layer's per-sequence state."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lru_states: dict[int, LRUState] = {}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.lru_states = {i: s.index_select(beam_idx) for i, s in self.lru_states.items()}

    def reset(self) -> None:
        super().reset()
        self.lru_states = {}


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
            latent, k_rope = past_key_values.update(latent, k_rope, self.layer_idx)  # (B,1,S,C), (B,1,S,R)
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


def lru_summary(results: list[LRUResult], valid: torch.Tensor, config: LatentReasoningConfig):
    """Aux terms, aux loss and statistics over LRU layers and valid positions.

    ``valid`` is the (B, T) mask of real tokens, or float weights per position: a trainer that runs a shared
    prompt once for n samples weighs its positions by n, so the means equal those of the n full forwards."""
    weight = valid.to(results[0].iterations.dtype)
    n = weight.sum().clamp(min=1e-12)
    mean = lambda per_position: torch.stack([(r * weight).sum() / n for r in per_position]).mean()  # noqa: E731
    ponder = mean([r.iterations + r.remainder for r in results])
    terms = {"stability": mean([r.stability for r in results]), "sparsity": mean([r.sparsity for r in results]),
             "ponder": ponder}
    aux = (config.lru_stability_weight * terms["stability"] + config.lru_sparsity_weight * terms["sparsity"]
           + (config.lru_ponder_weight * ponder if config.lru_halting == "adaptive" else 0.0))
    iterations = torch.stack([r.iterations for r in results])  # (L, B, T)
    counts = F.one_hot(iterations.long().clamp(min=1) - 1, config.lru_max_iterations).to(weight.dtype)  # (L,B,T,K)
    distribution = (counts * weight[None, ..., None]).sum(dim=(0, 1, 2)) / (n * len(results))
    stats = {"iterations_mean": mean([r.iterations for r in results]).detach(),
             "iterations_max": iterations.max().detach(), "ponder": ponder.detach(),
             "convergence": mean([r.convergence for r in results]).detach(),
             "halting_distribution": distribution.detach()}
    return aux, {k: v.detach() for k, v in terms.items()}, stats, iterations


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


def cache_bytes_per_token(config: LatentReasoningConfig, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the KV cache holds per token, all layers: (C + R) numbers per layer."""
    return config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * dtype.itemsize


__all__ = ["GrowingCache", "GrowingLayer", "LatentCache", "LatentReasoningForCausalLM", "LatentReasoningModel",
           "LatentReasoningModelOutput", "LatentReasoningOutput", "lru_summary", "LatentReasoningUnit", "LRUResult",
           "LRUState", "cache_bytes_per_token"]
