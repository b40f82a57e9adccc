"""Configuration of the MLA + Latent Reasoning Unit decoder (``model_type = "mla_lru"``).

A ``transformers`` config: saved as config.json beside the weights, loaded by ``AutoConfig``.
Defaults are a small model; ``models.presets`` holds the tiny presets of the four experiment groups.
"""

from __future__ import annotations

from transformers import PretrainedConfig

HALTING_MODES = ("fixed", "adaptive")


class LatentReasoningConfig(PretrainedConfig):
    r"""MLA (DeepSeek-V2, arXiv 2405.04434) with an optional Latent Reasoning Unit per layer.

    MLA: ``q_lora_rank`` (None: queries straight from the hidden state), ``kv_lora_rank`` (C, the cached
    latent), ``qk_nope_head_dim`` / ``qk_rope_head_dim`` (the position-free and rotary parts of a query or
    key head), ``v_head_dim``. ``mla_absorb``: decode with W_UK folded into the query and W_UV applied after
    attention (equal to the naive computation, cheaper at long context).

    LRU: ``use_lru``; ``lru_layers`` (indices, None = every layer); ``lru_halting`` ``"fixed"`` (exactly
    ``lru_max_iterations`` iterations) or ``"adaptive"`` (ACT, Graves 2016, arXiv 1603.08983, at most
    ``lru_max_iterations``); ``lru_conv_kernel`` (positions each iteration reads, the current one included);
    ``lru_act_epsilon`` (halt once the cumulative halting probability reaches 1 - epsilon);
    ``lru_global_halting`` (weight of a per-sequence halting signal pooled causally over the positions so
    far, mixed into each position's halting probability; 0 disables it); auxiliary loss weights, the
    design's by default (models/lru.py, ``lru_summary``): ``lru_stability_weight`` 0.1 (updates must not grow
    across iterations), ``lru_sparsity_weight`` 0.01 (Hoyer-square of the output), ``lru_ponder_weight``
    0.001 (ACT's ponder cost N + R, adaptive halting only); ``lru_update_gate_bias``
    (initial bias of the GRU update gate: negative starts the unit close to the identity);
    ``lru_residual_gate`` (a learned per-channel gate a, initialised to 0, on the unit's change of the latent:
    output = latent + a * (LRU(latent) - latent), so the unit starts as an exact no-op; retrofitted models).

    Retrofit fields (``models/convert.py`` sets them when converting a Qwen2 checkpoint; the defaults are the
    from-scratch model's): ``q_proj_bias`` (a bias on the query projection, as Qwen2's), ``kv_latent_norm``
    (False: no RMSNorm on the latent, so keys and values stay linear in the hidden state, as GQA's are),
    ``rope_inv_freq`` (the R/2 inverse frequencies of the rotary pairs, instead of rope_theta's geometric
    series: the frequencies kept from the source's heads). ``qk_nope_head_dim`` may be 0 (every query and key
    dimension rotary, as in the source).
    """

    model_type = "mla_lru"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 256
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    q_lora_rank: int | None = None
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = True
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mla_absorb: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    use_lru: bool = True
    lru_layers: list[int] | None = None
    lru_halting: str = "adaptive"
    lru_max_iterations: int = 4
    lru_conv_kernel: int = 3
    lru_act_epsilon: float = 0.01
    lru_global_halting: float = 0.0
    lru_stability_weight: float = 0.1
    lru_sparsity_weight: float = 0.01
    lru_ponder_weight: float = 0.001
    lru_update_gate_bias: float = -2.0
    lru_residual_gate: bool = False
    q_proj_bias: bool = False
    kv_latent_norm: bool = True
    rope_inv_freq: list[float] | None = None

    def __post_init__(self, **kwargs):
        # The rotary embedding sizes itself from head_dim: in MLA only the rotary part rotates.
        self.head_dim = self.qk_rope_head_dim
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        if self.lru_layers is not None:
            self.lru_layers = [int(i) for i in self.lru_layers]
        super().__post_init__(**kwargs)
        self._check()

    def _check(self) -> None:
        if self.qk_nope_head_dim < 0:
            raise ValueError(f"qk_nope_head_dim={self.qk_nope_head_dim}: must be >= 0 (0: every dimension rotary)")
        positive = ("hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                    "v_head_dim", "lru_max_iterations", "lru_conv_kernel", "intermediate_size", "vocab_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.qk_rope_head_dim < 2 or self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim}: RoPE needs an even size >= 2")
        if self.q_lora_rank is not None and self.q_lora_rank < 1:
            raise ValueError(f"q_lora_rank={self.q_lora_rank}: must be >= 1, or None for full-rank queries")
        if self.lru_halting not in HALTING_MODES:
            raise ValueError(f"lru_halting={self.lru_halting!r}: valid modes are {list(HALTING_MODES)}")
        if not 0.0 <= self.lru_global_halting <= 1.0:
            raise ValueError(f"lru_global_halting={self.lru_global_halting}: a mixing weight in [0, 1]")
        if self.lru_global_halting and self.lru_halting != "adaptive":
            raise ValueError("lru_global_halting needs lru_halting='adaptive' (fixed mode never halts)")
        if not 0.0 < self.lru_act_epsilon < 1.0:
            raise ValueError(f"lru_act_epsilon={self.lru_act_epsilon}: must be in (0, 1)")
        self._check_rope_inv_freq()
        bad = [i for i in self.lru_layers or [] if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"lru_layers has {bad}, outside 0..{self.num_hidden_layers - 1}")

    def _check_rope_inv_freq(self) -> None:
        if self.rope_inv_freq is None:
            return
        if len(self.rope_inv_freq) != self.qk_rope_head_dim // 2:
            raise ValueError(f"rope_inv_freq has {len(self.rope_inv_freq)} frequencies: give one per rotary pair, "
                             f"qk_rope_head_dim / 2 = {self.qk_rope_head_dim // 2}")
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"rope_inv_freq with rope_parameters rope_type={rope_type!r}: explicit frequencies "
                             "replace the default RoPE only; drop one of them")
        if not all(f > 0 for f in self.rope_inv_freq):
            raise ValueError("rope_inv_freq: every inverse frequency must be > 0")

    def has_lru(self, layer_idx: int) -> bool:
        return self.use_lru and (self.lru_layers is None or layer_idx in self.lru_layers)

    def to_dict(self) -> dict:
        """The config as saved (``config.json``) and logged (``run_info.json``): without ``use_lru`` the
        ``lru_*`` fields configure nothing, so they are left out rather than read as settings of the model."""
        out = super().to_dict()
        if not self.use_lru:
            for name in [k for k in out if k.startswith("lru_")]:
                del out[name]
        return out
