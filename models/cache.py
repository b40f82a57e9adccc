"""KV caches: ``GrowingCache`` (any decoder: new tokens written in place) and ``LatentCache`` (MLA + LRU).

Shapes: B batch, S cached tokens, C latent (kv_lora_rank), R rotary head size.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from models.lru import LRUState, LRUTrail


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
    ``transformers`` calls on a cache (length, reorder, select, repeat, crop, offload) applies to them
    unchanged; read and write them through ``update_latent`` / ``latent`` / ``rope_key``, which say what is
    stored. The methods that change rows or length are overridden to change the LRU states with them.

    **Rollback** (``crop``, which assisted and prompt-lookup decoding call to drop rejected draft tokens). The
    LRU state after a position cannot be recomputed from the cache: the cache holds the *refined* latents, not
    the LRU's inputs. So while recording (``activate_past_recording``, which generate() calls for those
    modes) every forward also keeps its ``LRUTrail``: the state it started from plus each iteration's input and
    running sums at every new position (K, with global halting 2K, latents per token and LRU layer), from
    which the state after any recorded position is rebuilt exactly. ``crop`` restores one and drops the trails
    (as transformers' own linear-attention layers shrink back at every crop), so they cover only the tokens
    since the last crop; recording stays on, so a recording cache reused for plain decoding keeps trails
    until its next ``crop(0)``. A crop that needs a state that was not recorded raises (leaving the cache as
    it was), as transformers does for its conv states; so does a packed row fed while recording."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lru_states: dict[int, LRUState] = {}
        self.record_past = False
        self._trails: dict[int, list[LRUTrail]] = {}  # per LRU layer, while recording: one per forward since the crop

    def update_latent(self, latent: torch.Tensor, rope_key: torch.Tensor, layer_idx: int):
        """Append a layer's new latents (B, 1, T, C) and rotary keys (B, 1, T, R) -> all so far, (B, 1, S, .)."""
        return self.update(latent, rope_key, layer_idx)

    def latent(self, layer_idx: int) -> torch.Tensor:
        return self.layers[layer_idx].keys  # (B, 1, S, C)

    def rope_key(self, layer_idx: int) -> torch.Tensor:
        return self.layers[layer_idx].values  # (B, 1, S, R)

    def update_lru_state(self, layer_idx: int, state: LRUState, trail: LRUTrail | None) -> None:
        """Store a layer's LRU state after a forward, and its trail while recording."""
        self.lru_states[layer_idx] = state
        if self.record_past:
            assert trail is not None, "a recording cache needs the LRU's trail (call the LRU with trail=True)"
            self._trails.setdefault(layer_idx, []).append(trail)

    def activate_past_recording(self) -> None:
        super().activate_past_recording()
        self.record_past = True

    @property
    def is_croppable(self) -> bool:
        return super().is_croppable and (self.record_past or not self.lru_states)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (a positive value: keep that many, the legacy form) from
        the latents and put every LRU state back as it was after the last kept token."""
        length = self.get_seq_length()
        remove = -tokens_to_remove if tokens_to_remove <= 0 else max(length - tokens_to_remove, 0)
        if remove and self.lru_states:
            self.lru_states = {i: self._state_before_last(i, remove) for i in self.lru_states}
        self._trails = {}
        super().crop(-remove)

    def _state_before_last(self, layer_idx: int, n: int) -> LRUState:
        """The LRU state of layer ``layer_idx`` as it was n positions before the end, from the recorded trails."""
        for trail in reversed(self._trails.get(layer_idx, [])):
            if n <= trail.length:
                return trail.state_after(trail.length - 1 - n)
            n -= trail.length
        recorded = sum(trail.length for trail in self._trails.get(layer_idx, []))
        raise ValueError(
            f"crop: the LRU state before the last {recorded + n} tokens was not recorded ({recorded} tokens since "
            "the last crop are). Call cache.activate_past_recording() before the forward calls to undo (generate's "
            "assisted and prompt-lookup decoding do); the LRU state cannot be rebuilt from the cached latents.")

    # ---- row operations: the LRU states (and trails) follow their rows --------------------------------------

    def _select_lru_rows(self, index: torch.Tensor) -> None:
        self.lru_states = {i: s.index_select(index) for i, s in self.lru_states.items()}
        self._trails = {i: [t.index_select(index) for t in trails] for i, trails in self._trails.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._select_lru_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.lru_states:  # indices, or a mask over the rows, as the latents take either
            self._select_lru_rows(torch.arange(self._lru_batch_size(), device=indices.device)[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.lru_states:
            self._select_lru_rows(torch.arange(self._lru_batch_size()).repeat_interleave(repeats))

    def _lru_batch_size(self) -> int:
        return next(iter(self.lru_states.values())).conv.shape[0]

    def reset(self) -> None:
        super().reset()
        self.lru_states, self._trails = {}, {}
