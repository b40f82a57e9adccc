"""Closed-form parameter counts, FLOPs per token and cache sizes of every group's model, and the matched controls.

The table of the presets is ``python -m models.presets``. The parameter formulas are tested equal to
``sum(p.numel())`` of the instantiated models, the FLOP formulas against ``torch.utils.flop_counter`` on their
forward. Tied embeddings count once; Qwen2's q/k/v projections carry biases (o_proj does not). Qwen2.5-0.5B is
494,032,768.

**FLOPs per token** (``flops_per_token``, parts in ``flops_breakdown``) are 2 x the multiply-adds of every matrix
product one token costs in a full forward (training, prefill, the trainer's scoring): the attention projections
(MLA: q, the latent and rotary key, the up-projection of the token's latent to per-head keys and values, o), the
attention scores and the weighted sum of values against ``context`` keys, the MLP, the LRU's depthwise
convolution, gates, candidate and halting heads for each iteration, and the LM head. Not counted: additions
without a multiply (biases, residuals), norms, activations, softmax, the rotary embedding and the embedding
lookup. ``context`` is the number of keys a token's scores are computed against: a full forward of T
tokens computes T for every token (the causal mask is applied after), a decode step the cache length + 1. MLA
decoding with absorption (``mla_absorb``) costs differently: it never up-projects the cached latents, and scores
against them in the latent instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PretrainedConfig, Qwen2Config

from models.configuration import LatentReasoningConfig
from models.looped import LoopedConfig

DEFAULT_CONTEXT = 256  # keys per token where none is given: about a study prompt plus its 200-token answer


def _embeddings(cfg: PretrainedConfig) -> int:
    d, v = cfg.hidden_size, cfg.vocab_size
    return v * d * (1 if cfg.tie_word_embeddings else 2) + d  # + the final norm


def qwen2_params(cfg: Qwen2Config) -> int:
    d, h, kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or d // h
    attention = (d * h * hd + h * hd) + 2 * (d * kv * hd + kv * hd) + h * hd * d  # q, k, v with bias; o without
    layer = attention + 3 * d * cfg.intermediate_size + 2 * d  # SwiGLU MLP, two norms
    return _embeddings(cfg) + cfg.num_hidden_layers * layer


def lru_params(cfg: LatentReasoningConfig) -> int:
    """One layer's LRU: depthwise conv, GRU gates and candidate, halting heads."""
    c = cfg.kv_lora_rank
    n = c * cfg.lru_conv_kernel + c + (2 * c * 2 * c + 2 * c) + (2 * c * c + c)
    if cfg.lru_halting == "adaptive":
        n += c + 1
    if cfg.lru_global_halting > 0:
        n += c + 1
    return n + c * int(cfg.lru_residual_gate)


def mla_params(cfg: LatentReasoningConfig) -> int:
    """MLA with or without the LRU; the looped control too (its loop re-runs layers, it adds no weights)."""
    d, h, c = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    bias = int(cfg.attention_bias)
    if cfg.q_lora_rank is None:
        query = d * h * qk
    else:
        query = d * cfg.q_lora_rank + bias * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * h * qk
    query += h * qk * int(cfg.q_proj_bias)
    kv = d * (c + cfg.qk_rope_head_dim) + bias * (c + cfg.qk_rope_head_dim) + c * int(cfg.kv_latent_norm) + c * h * (
        cfg.qk_nope_head_dim + cfg.v_head_dim)
    out = h * cfg.v_head_dim * d + bias * d
    layer = query + kv + out + 3 * d * cfg.intermediate_size + 2 * d
    lru_layers = sum(cfg.has_lru(i) for i in range(cfg.num_hidden_layers))
    return _embeddings(cfg) + cfg.num_hidden_layers * layer + lru_layers * lru_params(cfg)


def count_params(cfg: PretrainedConfig) -> int:
    if isinstance(cfg, LatentReasoningConfig):  # LoopedConfig included
        return mla_params(cfg)
    if isinstance(cfg, Qwen2Config):
        return qwen2_params(cfg)
    raise ValueError(f"no formula for model_type={cfg.model_type!r}; known: mla_lru, looped_mla, qwen2")


# ---- FLOPs per token ----------------------------------------------------------------------------------------


def _qwen2_macs(cfg: Qwen2Config, context: int) -> dict[str, float]:
    d, h, kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or d // h
    layers = cfg.num_hidden_layers
    return {"attention_projections": layers * (d * h * hd + 2 * d * kv * hd + h * hd * d),
            "attention_scores_values": layers * h * context * 2 * hd,  # q.k and the weighted sum of v, per head
            "mlp": layers * 3 * d * cfg.intermediate_size, "lm_head": d * cfg.vocab_size}


def _lru_macs(cfg: LatentReasoningConfig, iterations: float | None) -> dict[str, float]:
    """Every LRU layer's multiply-adds per token at ``iterations`` (None: K, the most it runs)."""
    layers = sum(cfg.has_lru(i) for i in range(cfg.num_hidden_layers))
    k = cfg.lru_max_iterations
    if iterations is None:
        iterations = k
    elif layers == 0 or not 0 <= iterations <= k:
        raise ValueError(f"lru_iterations={iterations}: give the mean iterations of an LRU model, in [0, K={k}] "
                         f"(this model has {layers} LRU layers)")
    c, runs = cfg.kv_lora_rank, layers * iterations
    heads = int(cfg.lru_halting == "adaptive") + int(cfg.lru_global_halting > 0)
    return {"lru_conv": runs * c * cfg.lru_conv_kernel,  # depthwise: W taps per channel
            "lru_gates_candidate": runs * (2 * c * 2 * c + 2 * c * c),  # z, r from [h ; m]; h~ from [r*h ; m]
            "lru_halting": runs * heads * c}


def _layer_runs(cfg: LatentReasoningConfig, loop_iterations: float | None) -> float:
    """How many layers one token runs: every layer once, the looped block ``loop_iterations`` times."""
    if not isinstance(cfg, LoopedConfig):
        if loop_iterations is not None:
            raise ValueError(f"loop_iterations={loop_iterations}: only the looped control (looped_mla) loops layers")
        return cfg.num_hidden_layers
    k = cfg.loop_iterations if loop_iterations is None else loop_iterations
    if not 1 <= k <= cfg.loop_iterations:
        raise ValueError(f"loop_iterations={k}: the mean iterations of the block, in [1, K={cfg.loop_iterations}]")
    return cfg.num_hidden_layers + (k - 1) * cfg.block_size


def _mla_macs(cfg: LatentReasoningConfig, context: int, lru_iterations: float | None,
              loop_iterations: float | None) -> dict[str, float]:
    d, h, c, rope = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    nope, v = cfg.qk_nope_head_dim, cfg.v_head_dim
    query = d * h * (nope + rope) if cfg.q_lora_rank is None else cfg.q_lora_rank * (d + h * (nope + rope))
    projections = query + d * (c + rope) + c * h * (nope + v) + h * v * d  # q, [c ; k_r], W_UK and W_UV, o
    layers = _layer_runs(cfg, loop_iterations)
    return {"attention_projections": layers * projections,
            "attention_scores_values": layers * h * context * (nope + rope + v),
            "mlp": layers * 3 * d * cfg.intermediate_size, **_lru_macs(cfg, lru_iterations),
            "lm_head": d * cfg.vocab_size}


def flops_breakdown(cfg: PretrainedConfig, context: int = DEFAULT_CONTEXT, lru_iterations: float | None = None,
                    loop_iterations: float | None = None) -> dict[str, float]:
    """FLOPs (2 x multiply-adds) per token of each part (the module docstring says what is counted).
    ``lru_iterations``: the mean LRU iterations per token and layer (None: K, the fixed count or the adaptive
    maximum); ``loop_iterations``: the looped control's mean block iterations (None: its K)."""
    if context < 1:
        raise ValueError(f"context={context}: the number of keys a token attends to, >= 1")
    if isinstance(cfg, LatentReasoningConfig):
        macs = _mla_macs(cfg, context, lru_iterations, loop_iterations)
    elif isinstance(cfg, Qwen2Config):
        if lru_iterations is not None or loop_iterations is not None:
            raise ValueError("lru_iterations / loop_iterations: the Qwen2 baseline has neither an LRU nor a loop")
        macs = _qwen2_macs(cfg, context)
    else:
        raise ValueError(f"no formula for model_type={cfg.model_type!r}; known: mla_lru, looped_mla, qwen2")
    return {part: 2 * n for part, n in macs.items()}


def flops_per_token(cfg: PretrainedConfig, context: int = DEFAULT_CONTEXT, lru_iterations: float | None = None,
                    loop_iterations: float | None = None) -> float:
    """FLOPs one token costs in a full forward at ``context`` keys: the sum of ``flops_breakdown``."""
    return sum(flops_breakdown(cfg, context, lru_iterations, loop_iterations).values())


# ---- matched controls ---------------------------------------------------------------------------------------


def matched_width(target: PretrainedConfig, build: Callable[[int], PretrainedConfig]) -> PretrainedConfig:
    """``build(width)`` at the MLP width (intermediate_size) whose parameter count is closest to ``target``'s.
    The count is linear in the width (3 x d x layers per unit), so two counts solve it exactly."""
    one, two = count_params(build(1)), count_params(build(2))
    per_unit, wanted = two - one, count_params(target)
    width = round((wanted - one) / per_unit) + 1
    if width < 1:
        raise ValueError(f"{type(build(1)).__name__} without its MLP already has {one - per_unit} parameters, more "
                         f"than the target's {wanted}: shrink its hidden size or layers")
    return build(width)


def matched_baseline(target: PretrainedConfig, base: Qwen2Config, **overrides) -> Qwen2Config:
    """``base`` with the MLP width that brings its parameter count closest to ``target``'s."""
    values = {**base.to_dict(), **overrides}
    return matched_width(target, lambda width: Qwen2Config(**{**values, "intermediate_size": width}))


def matched_loop(target: PretrainedConfig, build: Callable[[int, int, int], LoopedConfig],
                 context: int = DEFAULT_CONTEXT, max_iterations: int = 16) -> LoopedConfig:
    """``build(loop_start, loop_end, K)`` with the block and K (2..max_iterations) whose FLOPs per token at
    ``context`` are closest to ``target``'s. Blocks are centred in the stack (looped transformers loop middle
    layers: the first and last read and write tokens); a tie goes to the smaller block, iterated more."""
    layers = build(0, 1, 1).num_hidden_layers
    wanted = flops_per_token(target, context)
    loops = [((layers - size) // 2, (layers - size) // 2 + size, k)
             for size in range(1, layers + 1) for k in range(2, max_iterations + 1)]
    return build(*min(loops, key=lambda loop: (abs(flops_per_token(build(*loop), context) - wanted),
                                               loop[1] - loop[0])))


# ---- cache and the table ------------------------------------------------------------------------------------


def cache_bytes_per_token(cfg: PretrainedConfig, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the KV cache holds per token, all layers: (C + R) numbers per layer for MLA (the latent and the
    rotary key; per virtual layer for the looped control), 2 x KV heads x head size for GQA."""
    if isinstance(cfg, LatentReasoningConfig):
        layers = cfg.num_virtual_layers if isinstance(cfg, LoopedConfig) else cfg.num_hidden_layers
        return layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype.itemsize
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * hd * dtype.itemsize


def table(rows: list[tuple[str, PretrainedConfig]], context: int = DEFAULT_CONTEXT) -> str:
    """Parameters, FLOPs per token at ``context`` keys (LRU groups at K, the adaptive maximum) and fp16 cache."""
    lines = [f"{'model':<34}{'parameters':>16}{f'MFLOPs/token (context {context})':>32}"
             f"{'cache bytes/token (fp16)':>28}"]
    for name, cfg in rows:
        lines.append(f"{name:<34}{count_params(cfg):>16,}{flops_per_token(cfg, context) / 1e6:>32,.3f}"
                     f"{cache_bytes_per_token(cfg, torch.float16):>28,}")
    return "\n".join(lines)
