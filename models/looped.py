"""The looped-layer control (``model_type = "looped_mla"``): an MLA decoder without the LRU in which a block of
layers is run K times, as a ``transformers`` causal LM. One file, in data-flow order: the config, the cache as
one loop iteration sees it, the loop, the backbone, the causal LM.

    import models
    model = AutoModelForCausalLM.from_config(models.tiny_config("looped"))

Shapes: B batch, T new tokens, S cached + new tokens, d hidden size, K loop iterations.

**Why it exists.** The study asks whether iterating in latent space (the LRU) beats iterating whole layers at the
same compute. This model spends its extra compute by re-running layers ``loop_start .. loop_end - 1`` K times
(looped / recurrent-depth transformers: Giannou et al. 2023, arXiv 2301.13196; Geiping et al. 2025, arXiv
2502.05171), with the attention and decoder layers of ``models/modeling_mla_lru.py`` (``use_lru=False``). Its
preset (``models.presets``, group ``looped``) chooses the block and K so that its FLOPs per token match
``mla_lru_fixed``'s; it has the parameters of ``mla_only``, so **fewer parameters than the LRU groups**: it buys
its compute with weight sharing, not with new weights.

**Virtual layers and the cache.** Every iteration of every looped layer is its own *virtual layer* with its own
cache layer index (``virtual_index``): iteration k of layer j attends to what iteration k of layer j wrote at
earlier tokens, exactly as in the full forward, so cached decoding equals the full forward. The cache holds
``num_virtual_layers`` MLA layers, (C + R) numbers each per token.

**Halting.** ``loop_halting="fixed"``: exactly K iterations. ``"converge"``: a token stops iterating once the
relative change of its block output, |x^k - x^(k-1)| / |x^(k-1)|, falls below ``loop_tolerance`` (at least one
iteration). The decision is per token, from that token's own hidden state: a per-sequence or per-batch stop
would let later tokens (or other rows) change an earlier token's computation, which is neither causal nor
reproducible by a cache. A stopped token is frozen: its input to every layer of the block stays what it was in
its last iteration, so what it stores at each later virtual layer of layer j is the same as what it stored at
its last one (the K/V of its frozen hidden state there). Later tokens still running read those entries. Its
block output stays its last one. Once every token of the batch has stopped, the loop ends and the stopped
tokens' entries are copied into the virtual layers that did not run; before that, every row is computed and
the stopped ones masked (a dense batch cannot skip rows that running tokens attend to), so the compute saved
is the iterations after the last token of the batch stops. Exact under caching up to rounding, except for a
token whose change lies within rounding of the tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from models.cache import GrowingCache
from models.configuration import LatentReasoningConfig
from models.modeling_mla_lru import LatentReasoningPreTrainedModel

LOOP_HALTING = ("fixed", "converge")


class LoopedConfig(LatentReasoningConfig):
    r"""MLA without the LRU (``LatentReasoningConfig``'s MLA fields), with layers ``loop_start .. loop_end - 1``
    run ``loop_iterations`` (K) times: ``loop_halting`` ``"fixed"`` (exactly K) or ``"converge"`` (a token stops
    once the relative change of its block output is below ``loop_tolerance``; at most K)."""

    model_type = "looped_mla"

    use_lru: bool = False
    loop_start: int = 1
    loop_end: int = 3
    loop_iterations: int = 2
    loop_halting: str = "fixed"
    loop_tolerance: float = 0.01

    def _check(self) -> None:
        super()._check()
        if self.use_lru:
            raise ValueError("use_lru=True: the looped control has no LRU (it iterates layers, not the latent); "
                             "use an mla_lru_* group for the LRU")
        if not 0 <= self.loop_start < self.loop_end <= self.num_hidden_layers:
            raise ValueError(f"loop_start={self.loop_start}, loop_end={self.loop_end}: the looped block must be "
                             f"0 <= loop_start < loop_end <= num_hidden_layers={self.num_hidden_layers}")
        if self.loop_iterations < 1:
            raise ValueError(f"loop_iterations={self.loop_iterations}: must be >= 1")
        if self.loop_halting not in LOOP_HALTING:
            raise ValueError(f"loop_halting={self.loop_halting!r}: valid modes are {list(LOOP_HALTING)}")
        if self.loop_tolerance < 0:
            raise ValueError(f"loop_tolerance={self.loop_tolerance}: a relative change, must be >= 0")

    @property
    def block_size(self) -> int:
        return self.loop_end - self.loop_start

    @property
    def num_virtual_layers(self) -> int:
        """Layers as run: the block counts K times. Each has its own cache layer."""
        return self.num_hidden_layers + (self.loop_iterations - 1) * self.block_size

    def virtual_index(self, layer: int, iteration: int) -> int:
        """The cache layer of iteration ``iteration`` (0-based) of physical layer ``layer``."""
        if layer < self.loop_start:
            return layer
        if layer < self.loop_end:
            return self.loop_start + iteration * self.block_size + layer - self.loop_start
        return layer + (self.loop_iterations - 1) * self.block_size


# ---- the cache as one iteration sees it --------------------------------------------------------------------


class VirtualLayerCache:
    """The cache as one physical layer sees it in one iteration: its write (``update``, the one cache call MLA
    attention without the LRU makes) goes to that iteration's own cache layer. Any other cache call fails loudly
    here rather than reading the wrong layer."""

    def __init__(self, cache: Cache, index: int):
        self.cache, self.index = cache, index

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        return self.cache.update(key_states, value_states, self.index, *args, **kwargs)


def with_virtual_layers(cache: Cache, config: LoopedConfig) -> Cache:
    """``cache`` with a layer for every virtual layer. A cache built from the config (``DynamicCache(config=...)``,
    as generate() and the rollout build them) has one per physical layer: the missing ones are appended."""
    if cache.is_compileable or not isinstance(cache, DynamicCache):
        raise ValueError(f"{type(cache).__name__}: the looped control takes a dynamic cache (DynamicCache, "
                         "models.GrowingCache) with one layer per virtual layer; static caches are not supported")
    missing = config.num_virtual_layers - len(cache.layers)
    if missing > 0 and cache.layer_class_to_replicate is None:
        cache.layers.extend(type(cache.layers[-1])() for _ in range(missing))
    return cache


# ---- outputs ----------------------------------------------------------------------------------------------


@dataclass
class LoopedModelOutput(BaseModelOutputWithPast):
    """The decoder's output plus the loop's report.

    loop_iterations: (B, T) iterations of the block each token ran (0 at pads).
    loop_changes: (B, T, K) relative change of the block output at each iteration it ran (0 after it stopped).
    valid: (B, T) mask of real (non-pad) tokens.
    """

    loop_iterations: torch.Tensor | None = None
    loop_changes: torch.Tensor | None = None
    valid: torch.Tensor | None = None


@dataclass
class LoopedOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus the loop's report (``LoopedModelOutput``'s fields)."""

    loop_iterations: torch.Tensor | None = None
    loop_changes: torch.Tensor | None = None
    valid: torch.Tensor | None = None


# ---- the backbone -----------------------------------------------------------------------------------------


class LoopedPreTrainedModel(LatentReasoningPreTrainedModel):
    config_class = LoopedConfig
    config: LoopedConfig

    def __init__(self, config: LoopedConfig, *inputs, **kwargs):
        super().__init__(config, *inputs, **kwargs)
        self._can_compile_fullgraph = False  # the converge stop is data-dependent; no static cache either


class LoopedModel(LoopedPreTrainedModel):
    def __init__(self, config: LoopedConfig):
        super().__init__(config)
        self._build_backbone(config)

    @capture_outputs
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                use_cache=None, **kwargs) -> LoopedModelOutput:
        """``output_hidden_states`` gives one state per virtual layer (+1), ``output_attentions`` one (B, H, T, S)
        per virtual layer, both collected by transformers' hooks (``capture_outputs``)."""
        output_attentions = self._output_attentions(kwargs)
        kwargs.pop("output_hidden_states", None)  # collected by the hooks, not an attention argument
        cache = self._cache(use_cache, past_key_values)
        x, position_ids, _ = self._inputs(input_ids, inputs_embeds, position_ids, cache)
        b, t, _ = x.shape
        valid = torch.ones(b, t, dtype=torch.bool, device=x.device)
        if attention_mask is not None and attention_mask.dim() == 2:
            valid = attention_mask[:, -t:].bool()  # (B, T)
        mask = self._attention_mask(x, attention_mask, cache, position_ids, output_attentions)
        position_embeddings = self.rotary_emb(x, position_ids)

        def run(layer: int, iteration: int, h: torch.Tensor) -> torch.Tensor:
            view = None if cache is None else VirtualLayerCache(cache, self.config.virtual_index(layer, iteration))
            return self.layers[layer](h, position_embeddings, mask, valid, past_key_values=view,
                                      output_attentions=output_attentions, **kwargs)[0]

        for layer in range(self.config.loop_start):
            x = run(layer, 0, x)
        x, iterations, changes = self._loop(x, valid, run, cache)
        for layer in range(self.config.loop_end, self.config.num_hidden_layers):
            x = run(layer, 0, x)
        return LoopedModelOutput(last_hidden_state=self.norm(x), past_key_values=cache, loop_iterations=iterations,
                                 loop_changes=changes, valid=valid)

    def _loop(self, x: torch.Tensor, valid: torch.Tensor, run, cache: Cache | None):
        """The block run K times (or until every token has converged). -> x (B, T, d), iterations (B, T),
        relative changes (B, T, K)."""
        cfg = self.config
        block = range(cfg.loop_start, cfg.loop_end)
        converge = cfg.loop_halting == "converge"
        stopped = torch.zeros_like(valid)  # (B, T): tokens whose block state is frozen
        inputs: dict[int, torch.Tensor] = {}  # block layer -> its input (B, T, d) at the last iteration run
        iterations = x.new_zeros(valid.shape)
        changes = x.new_zeros(*valid.shape, cfg.loop_iterations)
        for k in range(cfg.loop_iterations):
            frozen = converge and bool(stopped.any())
            before, h = x, x
            for layer in block:
                if frozen:  # a stopped token's input stays its last one, and so do the K/V it stores
                    h = torch.where(stopped[..., None], inputs[layer], h)
                inputs[layer] = h
                h = run(layer, k, h)
            x = torch.where(stopped[..., None], before, h) if frozen else h
            running = valid & ~stopped
            change = (x - before).float().norm(dim=-1) / before.float().norm(dim=-1).clamp(min=1e-12)  # (B, T)
            changes[..., k] = torch.where(running, change, 0.0).to(changes.dtype)
            iterations = iterations + running.to(iterations.dtype)
            if converge:
                stopped = stopped | (running & (change < cfg.loop_tolerance)) | ~valid
                if k + 1 < cfg.loop_iterations and bool(stopped.all()):
                    self._fill_skipped(cache, k, x.shape[1])
                    break
        return x, iterations, changes

    def _fill_skipped(self, cache: Cache | None, last: int, t: int) -> None:
        """Every token stopped after iteration ``last``: give the virtual layers that did not run the new tokens'
        entries from iteration ``last`` (a frozen token stores the same entries at every later iteration)."""
        if cache is None:
            return
        cfg = self.config
        for layer in range(cfg.loop_start, cfg.loop_end):
            source = cache.layers[cfg.virtual_index(layer, last)]
            keys, values = source.keys[..., -t:, :], source.values[..., -t:, :]  # (B, 1, T, C), (B, 1, T, R)
            for k in range(last + 1, cfg.loop_iterations):
                cache.update(keys, values, cfg.virtual_index(layer, k))

    def _cache(self, use_cache: bool | None, cache: Cache | None) -> Cache | None:
        """The cache this forward reads and writes (one layer per virtual layer), a new one, or None."""
        if self.gradient_checkpointing and self.training:
            if cache is not None or use_cache:
                raise ValueError("gradient checkpointing recomputes every layer in the backward pass, which would "
                                 "write the cache a second time: pass no past_key_values and use_cache=False")
            return None
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = GrowingCache()
        return None if cache is None else with_virtual_layers(cache, self.config)

    def _attention_mask(self, x, attention_mask, cache, position_ids, output_attentions: bool):
        """(B, 1, T, S) from transformers' ``create_causal_mask`` (None where SDPA's causal mode serves), or, for
        one decode token on MLA's absorbed path, the padding mask itself (B, 1, 1, S), as the MLA backbone does."""
        if (self.config.mla_absorb and x.shape[1] == 1 and cache is not None and attention_mask is not None
                and attention_mask.dim() == 2):
            return attention_mask[:, None, None, :].bool()
        return create_causal_mask(config=self.config, inputs_embeds=x, attention_mask=attention_mask,
                                  past_key_values=cache, position_ids=position_ids,
                                  allow_is_causal_skip=not output_attentions)


# ---- the causal LM ----------------------------------------------------------------------------------------


class LoopedForCausalLM(LoopedPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LoopedConfig):
        super().__init__(config)
        self.model = LoopedModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs) -> LoopedOutput:
        base = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                          return_dict=True, **kwargs)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(base.last_hidden_state[:, keep])  # (B, T, V)
        loss = None if labels is None else self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
        return LoopedOutput(loss=loss, logits=logits, past_key_values=base.past_key_values,
                            hidden_states=base.hidden_states, attentions=base.attentions,
                            loop_iterations=base.loop_iterations, loop_changes=base.loop_changes, valid=base.valid)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate() would build a cache with one layer per physical layer; this one grows a layer per virtual
        layer and writes new tokens in place (``GrowingCache``)."""
        if model_kwargs.get("past_key_values") is not None or generation_config.use_cache is False:
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(f"cache_implementation={generation_config.cache_implementation!r}: the looped control "
                             "keeps a dynamic cache with one layer per virtual layer; use cache_implementation=None")
        model_kwargs["past_key_values"] = GrowingCache()
        return None


__all__ = ["LoopedConfig", "LoopedForCausalLM", "LoopedModel", "LoopedModelOutput", "LoopedOutput",
           "VirtualLayerCache", "with_virtual_layers"]
