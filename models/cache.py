"""KV caches: ``GrowingCache`` (any decoder: new tokens written in place) and ``LatentCache`` (MLA + LRU).

Shapes: B batch, S cached tokens, C latent (kv_lora_rank), R rotary head size.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from models.lru import LRUState


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
    """The MLA cache: per layer the latent c (B, 1, S, C) and the rotary key k_r (B, 1, S, R), plus each LRU
    layer's per-sequence state (``lru_states``).

    c and k_r sit in the two slots that ``DynamicLayer`` names keys and values, so every method
    ``transformers`` calls on a cache (length, reorder, select, offload) applies to them unchanged; read
    and write them through ``update_latent`` / ``latent`` / ``rope_key``, which say what is stored."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lru_states: dict[int, LRUState] = {}

    def update_latent(self, latent: torch.Tensor, rope_key: torch.Tensor, layer_idx: int):
        """Append a layer's new latents (B, 1, T, C) and rotary keys (B, 1, T, R) -> all so far, (B, 1, S, .)."""
        return self.update(latent, rope_key, layer_idx)

    def latent(self, layer_idx: int) -> torch.Tensor:
        return self.layers[layer_idx].keys  # (B, 1, S, C)

    def rope_key(self, layer_idx: int) -> torch.Tensor:
        return self.layers[layer_idx].values  # (B, 1, S, R)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.lru_states = {i: s.index_select(beam_idx) for i, s in self.lru_states.items()}

    def reset(self) -> None:
        super().reset()
        self.lru_states = {}
