"""The experiment groups and their preset models, small enough to train on 2 CPU cores.

    python -m models.presets      # parameters, FLOPs and cache bytes per token of every tiny and 0.5B-shaped group

| group              | model                                                  | matched to                          |
|--------------------|--------------------------------------------------------|-------------------------------------|
| `baseline`         | transformers' Qwen2 (GQA), MLP width solved            | `mla_lru_adaptive`'s parameters     |
| `mla_only`         | MLA, no LRU (the ablation)                             |                                     |
| `mla_lru_fixed`    | MLA + LRU, exactly K iterations                        |                                     |
| `mla_lru_adaptive` | MLA + LRU, ACT halting, at most K (the main experiment)|                                     |
| `mla_only_matched` | MLA, no LRU, MLP width solved                          | `mla_lru_adaptive`'s parameters     |
| `looped`           | MLA, no LRU, a middle block of layers run K times      | `mla_lru_fixed`'s FLOPs per token   |

The study asks whether latent iterations beat spending the same parameters on width (``baseline``,
``mla_only_matched``) or the same compute on re-running layers (``looped``, ``models/looped.py``; it has
``mla_only``'s parameters, fewer than the LRU groups). The parameter matches are to the adaptive model at the
preset's defaults; the FLOP match is at ``param_count.DEFAULT_CONTEXT`` keys per token.
"""

from __future__ import annotations

import argparse

from transformers import PretrainedConfig, Qwen2Config

from models.configuration import LatentReasoningConfig
from models.looped import LoopedConfig
from models.param_count import matched_baseline, matched_loop, matched_width, table

GROUPS = ("baseline", "mla_only", "mla_lru_fixed", "mla_lru_adaptive", "mla_only_matched", "looped")
# What each MLA group sets in its config: the one home of "group -> architecture" (with CONFIG_CLASSES and MATCHED).
GROUP_SETTINGS = {"mla_only": dict(use_lru=False), "mla_lru_fixed": dict(lru_halting="fixed"),
                  "mla_lru_adaptive": dict(lru_halting="adaptive"), "mla_only_matched": dict(use_lru=False),
                  "looped": dict(use_lru=False, loop_halting="fixed")}
CONFIG_CLASSES = {"looped": LoopedConfig}  # the others: LatentReasoningConfig
# The MLA controls and the group each is matched to (the baseline is matched to mla_lru_adaptive in tiny_config).
MATCHED = {"mla_only_matched": "mla_lru_adaptive", "looped": "mla_lru_fixed"}
LOOP_GEOMETRY = ("loop_start", "loop_end", "loop_iterations")  # what matched_loop solves for the looped group

TINY = dict(vocab_size=128, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=1024, tie_word_embeddings=True)
TINY_MLA = dict(kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, lru_max_iterations=4,
                lru_conv_kernel=3)
TINY_BASELINE = dict(num_key_value_heads=2)  # head size 128 / 4 = 32, as in the MLA presets
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
QWEN25_05B_MLA = dict(kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64)


def mla_config(group: str, shape: dict, **overrides) -> LatentReasoningConfig:
    """An MLA group's config at a given shape (a dict of config fields), with overrides on top (no matching)."""
    if group not in GROUP_SETTINGS:
        raise ValueError(f"group={group!r}: MLA groups are {list(GROUP_SETTINGS)}")
    return CONFIG_CLASSES.get(group, LatentReasoningConfig)(**{**shape, **GROUP_SETTINGS[group], **overrides})


def matched_control(group: str, shape: dict, **overrides) -> LatentReasoningConfig:
    """A control of ``MATCHED`` at a shape, matched to its target group at the same shape and overrides.

    LRU fields (``lru_*``) describe the target only (the control has no LRU). ``mla_only_matched`` solves its
    MLP width, so it refuses an ``intermediate_size``; for ``looped``, a loop field given (``loop_start``,
    ``loop_end``, ``loop_iterations``) replaces the solved one, and the FLOPs then no longer match."""
    own = {k: v for k, v in overrides.items() if not k.startswith("lru_")}
    shared = {k: v for k, v in own.items() if not k.startswith("loop_") and k != "use_lru"}
    target = mla_config(MATCHED[group], shape, **shared, **{k: v for k, v in overrides.items() if k.startswith("lru_")})
    if group == "mla_only_matched":
        if "intermediate_size" in overrides:
            raise ValueError("intermediate_size: mla_only_matched solves its MLP width to match mla_lru_adaptive's "
                             "parameters; change the shape both share (hidden_size, num_hidden_layers, ...) instead")
        return matched_width(target, lambda width: mla_config(group, shape, **own, intermediate_size=width))
    given = {k: own.pop(k) for k in LOOP_GEOMETRY if k in own}
    solved = matched_loop(target, lambda start, end, k: mla_config(group, shape, **own, loop_start=start,
                                                                    loop_end=end, loop_iterations=k))
    return mla_config(group, shape, **own, **{**{k: getattr(solved, k) for k in LOOP_GEOMETRY}, **given})


def _group_config(group: str, shape: dict, **overrides) -> LatentReasoningConfig:
    if group in MATCHED:
        return matched_control(group, shape, **overrides)
    return mla_config(group, shape, **overrides)


def tiny_config(group: str, match_params: bool = True, **overrides) -> PretrainedConfig:
    """The tiny preset config of a group, ready for ``AutoModelForCausalLM.from_config``. ``match_params=False``
    keeps the baseline's preset MLP width instead of solving it to ``mla_lru_adaptive``'s parameter count.
    An override that is not a field of the group's config is refused (configs keep unknown keys silently)."""
    if group not in GROUPS:
        raise ValueError(f"group={group!r}: valid groups are {list(GROUPS)}")
    _check_fields(group, overrides)
    if group != "baseline":
        return _group_config(group, {**TINY, **TINY_MLA}, **overrides)
    if not match_params:
        return Qwen2Config(**{**TINY, **TINY_BASELINE, **overrides})
    # Match against the adaptive model with the same shared overrides (a tokenizer's vocabulary, say).
    shared = {k: v for k, v in overrides.items() if k in TINY or k.endswith("token_id")}
    target = mla_config("mla_lru_adaptive", {**TINY, **TINY_MLA}, **shared)
    return matched_baseline(target, Qwen2Config(**{**TINY, **TINY_BASELINE}), **overrides)


def _check_fields(group: str, overrides: dict) -> None:
    known = set(_group_config(group, {**TINY, **TINY_MLA}).to_dict()) if group != "baseline" else set(
        Qwen2Config(**{**TINY, **TINY_BASELINE}).to_dict())
    if group in MATCHED:  # a control's lru_* fields describe the target it is matched to (matched_control)
        known |= set(_group_config(MATCHED[group], {**TINY, **TINY_MLA}).to_dict())
    unknown = sorted(set(overrides) - known)
    if unknown:
        own = sorted(known - set(PretrainedConfig().to_dict()))
        raise ValueError(f"model overrides {unknown} are not fields of the {group} config; its own fields are {own}")


def qwen25_05b_shaped(group: str) -> PretrainedConfig:
    """A Qwen2.5-0.5B-sized model of a group (MLA groups: its widths with a 256-wide latent). The baseline is
    Qwen2.5-0.5B itself (not matched); the MLA controls are matched to their targets at this shape."""
    if group not in GROUPS:
        raise ValueError(f"group={group!r}: valid groups are {list(GROUPS)}")
    if group == "baseline":
        return Qwen2Config(**QWEN25_05B)
    return _group_config(group, {**QWEN25_05B, **QWEN25_05B_MLA})


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    rows = [(f"tiny {g}", tiny_config(g)) for g in GROUPS]
    rows += [(f"0.5B-shaped {g}", qwen25_05b_shaped(g)) for g in GROUPS]
    print(table(rows))
    for name, cfg in rows:
        if isinstance(cfg, LoopedConfig):
            print(f"{name}: layers {cfg.loop_start}..{cfg.loop_end - 1} of {cfg.num_hidden_layers} run "
                  f"{cfg.loop_iterations} times ({cfg.num_virtual_layers} virtual layers)")


if __name__ == "__main__":
    main()
