"""The vLLM twin of ``models.LatentReasoningForCausalLM``: the same weights (state_dict keys), the same
logprobs, served by vLLM's engine. Registered by ``models.vllm.register`` (a ``vllm.general_plugins``
entry point), so ``vllm.LLM(model=<checkpoint directory>)`` serves any of our MLA checkpoints.

Shapes: N tokens of one engine step (vLLM packs the sequences of a batch one after another, decodes
first), H heads, C latent (kv_lora_rank), R rotary head size, Dn position-free head size, Dv value head
size, K LRU iterations, W conv kernel, P padded attention head size.

**MLA through vLLM's plain attention layer.** vLLM's own MLA layer switches on only for its listed model
types, and its CPU backend takes only head size 576. So attention runs in the absorbed form (the same
numbers as the trainer's naive form) through ``Attention`` with one KV head: per head the query is
[W_UK^T q_nope ; rope(q_r)], the key [c ; rope(k_r)], the value the same vector, scale (Dn + R)^-1/2; the
first C outputs go through W_UV. The paged cache therefore holds only the latent and the rotary key. Head
sizes the attention kernels lack are zero-padded to the next one they take (zeros change no dot product).

**The LRU as a vLLM stateful layer.** Its per-sequence state (the last W-1 inputs of every iteration and,
with global halting, the running sums of the states) has a fixed size, the contract of a short-convolution
layer (LFM2's ``ShortConv``): the layer is a ``MambaBase`` whose state vLLM keeps per sequence, resets for
new ones and snapshots at block boundaries for prefix caching. The maths is ``models.LatentReasoningUnit``
itself (this class subclasses it), run on the sequences of each step gathered into a padded batch.

**Halting** has data-dependent control flow (``running.any()``): the model runs eagerly, never under
vLLM's torch.compile or CUDA graphs (``models.vllm.register`` sets ``enforce_eager``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.layers.mamba.mamba_utils import MambaStateDtypeCalculator, get_temporal_copy_spec
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid
from vllm.model_executor.models.utils import AutoWeightsLoader, maybe_prefix
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from models import LatentReasoningConfig, LatentReasoningUnit, LRUState
from models.vllm.config import attention_head_size, lru_state_shape

# ---- LRU ---------------------------------------------------------------------------------------------


class LatentReasoningUnitLayer(LatentReasoningUnit, MambaBase):
    """``LatentReasoningUnit`` whose per-sequence state lives in vLLM's state cache (``self.kv_cache[0]``,
    (pages, K, rows, C)); its weights keep their names (``...self_attn.lru.conv.weight`` and so on)."""

    def __init__(self, config: LatentReasoningConfig, prefix: str):
        super().__init__(config)
        vllm_config = get_current_vllm_config()
        self.prefix, self.model_dtype = prefix, vllm_config.model_config.dtype
        self.cache_dtype = vllm_config.cache_config.mamba_cache_dtype
        self.state_shape = lru_state_shape(config)
        context = vllm_config.compilation_config.static_forward_context
        if prefix in context:
            raise ValueError(f"duplicate layer name {prefix}")
        context[prefix] = self  # how vLLM finds the layer, allocates its state and hands it its metadata
        self.kv_cache = (torch.tensor([]),)

    # MambaBase: what vLLM needs to allocate and schedule the state.
    def get_state_shape(self) -> tuple[tuple[int, ...]]:
        return (self.state_shape,)

    def get_state_dtype(self) -> tuple[torch.dtype]:
        return MambaStateDtypeCalculator.short_conv_state_dtype(self.model_dtype, self.cache_dtype)

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum.SHORT_CONV  # its metadata (state slots, prefill starts) is all we read

    # ---- one engine step ------------------------------------------------------------------------------

    def refine(self, latent: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """latent (N, C), positions (N,) of one engine step -> refined latent (N, C)."""
        metadata = get_forward_context().attn_metadata
        metadata = metadata.get(self.prefix) if isinstance(metadata, dict) else None
        if metadata is None:  # a profiling or warm-up run: no state, values unused
            valid = torch.ones(1, latent.shape[0], dtype=torch.bool, device=latent.device)
            return LatentReasoningUnit.forward(self, latent[None], valid, None, diagnostics=False)[0][0]
        out = latent.clone()  # tokens past the real ones (padding) pass through
        decodes, prefill_tokens = metadata.num_decode_tokens, metadata.num_prefill_tokens
        if decodes:
            out[:decodes] = self._decode(latent[:decodes], positions[:decodes],
                                         metadata.state_indices_tensor_d[:, 0])
        if prefill_tokens:
            span = slice(decodes, decodes + prefill_tokens)
            out[span] = self._prefill(latent[span], positions[span], metadata.state_indices_tensor_p,
                                      metadata.has_initial_states_p, metadata.query_start_loc_p)
        return out

    def _read(self, slots: torch.Tensor, count: torch.Tensor, has_state: torch.Tensor | None) -> LRUState:
        """The LRU states of the sequences in ``slots`` (B,), zero where ``has_state`` is False (a new
        sequence's page may hold an old one's state). ``count``: (B,) positions already processed."""
        page = self.kv_cache[0][slots]  # (B, K, rows, C)
        if has_state is not None:
            page = torch.where(has_state[:, None, None, None], page, 0.0)
        w = self.kernel - 1
        running_sum = page[:, :, w] if self.halt_global is not None else None  # (B, K, C)
        return LRUState(page[:, :, :w], running_sum, count.to(page.dtype) if running_sum is not None else None)

    def _write(self, slots: torch.Tensor, conv: torch.Tensor, running_sum: torch.Tensor | None) -> None:
        """Store conv (B, K, W-1, C) and the running sums (B, K, C) in the pages ``slots``."""
        w = self.kernel - 1
        pages = self.kv_cache[0]
        pages[slots, :, :w] = conv.to(pages.dtype)
        if running_sum is not None:
            pages[slots, :, w] = running_sum.to(pages.dtype)

    def _decode(self, latent: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """One new token per sequence: latent (B, C) -> (B, C)."""
        state = self._read(slots, positions, None)
        valid = torch.ones(latent.shape[0], 1, dtype=torch.bool, device=latent.device)
        out, _, new = LatentReasoningUnit.forward(self, latent[:, None], valid, state, diagnostics=False)
        self._write(slots, new.conv, new.running_sum)
        return out[:, 0]

    def _prefill(self, latent, positions, slots, has_state, starts) -> torch.Tensor:
        """Chunks of B sequences packed one after another: latent (N, C), ``starts`` (B+1,) their offsets.
        The chunks are right-padded into one (B, T, C) batch: padding after a sequence's last token cannot
        reach its real tokens (the unit is causal and pads are masked), but it does sit at the end of the
        window, so the new conv state is taken from the states at each sequence's own last W-1 tokens."""
        lengths = starts.diff()  # (B,)
        b, t = lengths.shape[0], int(lengths.max())
        offsets = torch.arange(t, device=latent.device)
        valid = offsets[None] < lengths[:, None]  # (B, T)
        index = (starts[:-1, None] + offsets[None]).clamp(max=latent.shape[0] - 1)  # (B, T) token of each slot
        state = self._read(slots, positions[starts[:-1]], has_state)
        out, report, new = LatentReasoningUnit.forward(self, latent[index], valid, state, return_states=True)
        w = self.kernel - 1
        last = (lengths[:, None] + torch.arange(w, device=latent.device)[None])[..., None].expand(b, w, latent.shape[1])
        conv = torch.stack([torch.cat([state.conv[:, k], report.states[k]], dim=1).gather(1, last)  # (B, W-1, C)
                            for k in range(self.iterations)], dim=1)  # (B, K, W-1, C)
        self._write(slots, conv, new.running_sum)
        return out[valid]  # (N, C), back in token order


# ---- attention -----------------------------------------------------------------------------------------


class MLAttention(nn.Module):
    def __init__(self, config: LatentReasoningConfig, layer_idx: int, prefix: str):
        super().__init__()
        vllm_config = get_current_vllm_config()
        self.num_heads = config.num_attention_heads
        self.nope, self.rope, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.latent_dim, self.q_lora_rank = config.kv_lora_rank, config.q_lora_rank
        h, d, bias = self.num_heads, config.hidden_size, config.attention_bias
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * (self.nope + self.rope), bias=config.q_proj_bias)
        else:
            self.q_a_proj = nn.Linear(d, config.q_lora_rank, bias=bias)
            self.q_a_layernorm = Qwen2RMSNorm(config.q_lora_rank, eps=config.rms_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, h * (self.nope + self.rope), bias=config.q_proj_bias)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.latent_dim + self.rope, bias=bias)  # [c ; k_r]
        self.kv_a_layernorm = (Qwen2RMSNorm(self.latent_dim, eps=config.rms_norm_eps) if config.kv_latent_norm
                               else nn.Identity())
        self.kv_b_proj = nn.Linear(self.latent_dim, h * (self.nope + self.v_dim), bias=False)  # [W_UK ; W_UV]
        self.o_proj = nn.Linear(h * self.v_dim, d, bias=bias)
        self.lru = LatentReasoningUnitLayer(config, f"{prefix}.lru") if config.has_lru(layer_idx) else None
        if config.rope_inv_freq is not None:
            raise ValueError("rope_inv_freq (a model retrofitted from Qwen2 by models.convert): the vLLM twin builds "
                             "its rotary embedding from rope_theta only; use rollout.backend=torch for this model")
        self.rotary_emb = get_rope(self.rope, max_position=config.max_position_embeddings, is_neox_style=True,
                                   rope_parameters=config.rope_parameters)
        self.head_size = attention_head_size(config)
        self.attn = Attention(h, self.head_size, (self.nope + self.rope) ** -0.5, num_kv_heads=1,
                              cache_config=vllm_config.cache_config, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(n, self.num_heads, self.nope + self.rope).split([self.nope, self.rope], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.latent_dim, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)  # (N, C)
        if self.lru is not None:
            latent = self.lru.refine(latent, positions)
        q_rope, k_rope = self.rotary_emb(positions, q_rope.reshape(n, -1).contiguous(), k_rope.contiguous())
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_dim, self.latent_dim)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope:]  # (H, Dn, C), (H, Dv, C)
        q_latent = torch.einsum("nhd,hdc->nhc", q_nope, w_uk)  # (N, H, C)
        pad = self.head_size - self.latent_dim - self.rope
        query = F.pad(torch.cat([q_latent, q_rope.view(n, self.num_heads, self.rope)], dim=-1), (0, pad))  # (N,H,P)
        key = F.pad(torch.cat([latent, k_rope], dim=-1), (0, pad))  # (N, P): one KV head, its value the same
        out = self.attn(query.reshape(n, -1), key, key).view(n, self.num_heads, self.head_size)  # (N, H, P)
        out = torch.einsum("nhc,hdc->nhd", out[..., : self.latent_dim], w_uv)  # (N, H, Dv)
        return self.o_proj(out.reshape(n, self.num_heads * self.v_dim))


# ---- decoder ----------------------------------------------------------------------------------------------


class DecoderLayer(nn.Module):
    def __init__(self, config: LatentReasoningConfig, layer_idx: int, prefix: str):
        super().__init__()
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = MLAttention(config, layer_idx, f"{prefix}.self_attn")
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = Qwen2MLP(config)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(positions, self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class LatentReasoningModel(nn.Module):
    def __init__(self, config: LatentReasoningConfig, prefix: str):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, f"{prefix}.layers.{i}")
                                    for i in range(config.num_hidden_layers))
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(positions, x)
        return self.norm(x)


class LatentReasoningForCausalLM(nn.Module, HasInnerState, IsHybrid):
    """What vLLM instantiates for the architecture ``LatentReasoningForCausalLM`` (config.json)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: LatentReasoningConfig = vllm_config.model_config.hf_config
        if vllm_config.parallel_config.world_size > 1:
            raise ValueError("the vLLM twin of the MLA + LRU model runs on one device (tensor_parallel_size=1, "
                             "pipeline_parallel_size=1); run one engine per rollout worker instead")
        self.config = config
        self.model = LatentReasoningModel(config, maybe_prefix(prefix, "model"))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # IsHybrid: the LRU state vLLM allocates per sequence and layer, and how it copies it (prefix caching).
    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig) -> tuple[tuple[int, ...]]:
        return (lru_state_shape(vllm_config.model_config.hf_config),)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig) -> tuple[torch.dtype]:
        return MambaStateDtypeCalculator.short_conv_state_dtype(vllm_config.model_config.dtype,
                                                               vllm_config.cache_config.mamba_cache_dtype)

    @classmethod
    def get_mamba_state_copy_func(cls):
        return (get_temporal_copy_spec,)  # the whole page: the state is a snapshot, not a ring buffer

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        x = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds  # (N, d)
        return self.model(positions, x)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Checkpoint or trainer state_dict names, unchanged (a tied lm_head is loaded once, as the embedding)."""
        return AutoWeightsLoader(self).load_weights(weights)
