"""A scalar value per token on top of any causal LM of this project: the PPO critic.

Works for ``LatentReasoningForCausalLM`` and ``transformers``' ``Qwen2ForCausalLM`` alike: it runs the
LM's backbone (``lm.model``), skips the vocabulary projection, and maps the last hidden state to one
number per token. Its forward takes a cache like the LM's, so the trainer runs it with shared prompts.
Saved as the LM's own checkpoint plus ``value_head.safetensors``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import ModelOutput

from models.lru import lru_summary

VALUE_HEAD_FILE = "value_head.safetensors"


@dataclass
class ValueHeadOutput(ModelOutput):
    """values (B, T); the backbone's cache (with ``use_cache``), LRU reports, (B, T) mask of real tokens and
    the LRU auxiliary loss over them (None without an LRU)."""

    values: torch.Tensor | None = None
    past_key_values: Cache | None = None
    lru_results: list | None = None
    valid: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


class ValueHeadModel(nn.Module):
    def __init__(self, lm: PreTrainedModel):
        super().__init__()
        self.lm = lm
        self.v_head = nn.Linear(lm.config.hidden_size, 1)
        nn.init.normal_(self.v_head.weight, std=1.0 / (lm.config.hidden_size + 1))
        nn.init.zeros_(self.v_head.bias)

    @property
    def backbone(self) -> nn.Module:
        return getattr(self.lm, self.lm.base_model_prefix)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: Cache | None = None,
                use_cache: bool = False) -> ValueHeadOutput:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=past_key_values, use_cache=use_cache, return_dict=True)
        results, valid = getattr(out, "lru_results", None), getattr(out, "valid", None)
        aux = lru_summary(results, valid, self.lm.config)[0] if results else None
        return ValueHeadOutput(values=self.v_head(out.last_hidden_state).squeeze(-1),
                               past_key_values=out.past_key_values, lru_results=results, valid=valid, aux_loss=aux)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.lm.save_pretrained(path)
        save_file({k: v.contiguous() for k, v in self.v_head.state_dict().items()}, path / VALUE_HEAD_FILE)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> ValueHeadModel:
        """Load the LM from ``path`` and the value head beside it (a fresh head if there is none yet)."""
        model = cls(AutoModelForCausalLM.from_pretrained(path, **kwargs))
        head = Path(path) / VALUE_HEAD_FILE
        if head.is_file():
            model.v_head.load_state_dict(load_file(head))
        return model
