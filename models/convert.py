"""Retrofit: a pretrained GQA ``Qwen2ForCausalLM`` checkpoint converted to this project's MLA model, for every
MLA group, so that all groups start from one pretrained model and differ only in what was added.

    python -m models.convert --from QWEN2_DIR --group mla_lru_adaptive --out DIR [--kv_lora_rank C]
                             [--qk_rope_head_dim R]

Shapes: d hidden, H query heads, G key/value heads (n = H/G queries share one), D source head size,
r rotary pairs kept per key/value head, R = 2rG rotary size, C latent (kv_lora_rank).

**The recipe.** TransMLA (Meng et al. 2025, arXiv 2502.07864): a GQA layer's keys and values are an MLA
whose latent holds every key/value head, c = [k_0 .. k_{G-1} ; v_0 .. v_{G-1}], and whose up-projections
W_UK, W_UV select query head h's own key/value head; that is exact when C is at least the GQA KV width.
MLA shares one rotary key between all heads; MHA2MLA (Ji et al. 2025, arXiv 2502.14837) supplies the rest:

- **partial RoPE**: per key/value head, the r frequency pairs that contribute most to the attention scores
  (MHA2MLA's 2-norm criterion, ||q_i|| ||k_i|| averaged over tokens and over the layers, from calibration
  tokens, or from the projection weights when none are given) stay rotary; they are laid side by side in
  the shared rotary key (R = 2rG), each with its own frequency (``rope_inv_freq``), and each query head's
  rotary query is zero outside its own head's pairs. The other D - 2r dimensions of each head lose their
  rotation and become the position-free part (``qk_nope_head_dim``), carried by the latent;
- **joint SVD**: when C is below the full width F = G(D - 2r) + GD, the stacked key and value projections
  (bias included) are replaced by their best rank-C factorisation, down-projection U_C^T [W | b] and
  up-projection U_C, as MHA2MLA's SVD_joint.

**What is exact** (up to fp32 rounding): everything outside attention (embeddings, norms, MLPs, LM head:
copied), the queries (Qwen2's query bias is kept, ``q_proj_bias``; the score scale D^-1/2 is folded into
the query, since MLA scales by (Dn + R)^-1/2), the values and position-free keys when C >= F (the latent has
no RMSNorm then, ``kv_latent_norm=False``: GQA's keys are linear in the hidden state), and the kept
frequencies. With R = GD (every pair kept, Dn = 0) and C >= GD the converted model is the source.
**What is approximate**: the dropped frequencies (their dimensions attend without rotation) and, below
C = F, the truncated SVD. ``logit_error`` measures both; the README has the table against C and R.

**The LRU groups** get ``lru_residual_gate``: the unit's output is latent + a * (LRU(latent) - latent) with a
zero at start, so a retrofitted ``mla_lru_*`` model computes exactly the converted ``mla_only`` model until
training moves a (tested bitwise). Halting keeps its from-scratch initialisation, so ACT can still learn to
iterate.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PretrainedConfig

from data.tokenizer import load_tokenizer
from models.configuration import LatentReasoningConfig
from models.modeling_mla_lru import LatentReasoningForCausalLM
from models.presets import GROUP_SETTINGS

GROUPS = ("mla_only", "mla_lru_fixed", "mla_lru_adaptive")
SOURCE_TYPES = ("qwen2",)  # Qwen2 and Qwen2.5 (model_type "qwen2")


@dataclass
class Plan:
    """Where every source dimension goes: the kept rotary pairs of each key/value head (G, r) and the sizes."""

    heads: int  # H
    kv_heads: int  # G
    head_dim: int  # D
    kept: torch.Tensor  # (G, r) kept pair indices in [0, D/2), sorted
    kv_lora_rank: int  # C

    @property
    def pairs(self) -> int:
        return self.kept.shape[1]

    @property
    def nope(self) -> int:
        return self.head_dim - 2 * self.pairs

    @property
    def rope(self) -> int:
        return 2 * self.pairs * self.kv_heads

    @property
    def full_width(self) -> int:
        """F: the latent width at which keys and values are exact, G(D - 2r) + GD."""
        return self.kv_heads * (self.nope + self.head_dim)

    def rotary_dims(self, g: int) -> torch.Tensor:
        """(2r,) source dimensions of head g that stay rotary: each kept pair's two halves (rotate_half's pairs)."""
        return torch.cat([self.kept[g], self.kept[g] + self.head_dim // 2])

    def slots(self, g: int) -> torch.Tensor:
        """(2r,) where head g's kept pairs sit in the shared rotary key: slot g*r + m for its m-th pair, and that
        slot's second half R/2 further on (our rotate_half pairs j with j + R/2)."""
        first = g * self.pairs + torch.arange(self.pairs)
        return torch.cat([first, first + self.rope // 2])

    def nope_dims(self, g: int) -> torch.Tensor:
        """(D - 2r,) the other dimensions of head g, in order."""
        keep = torch.ones(self.head_dim, dtype=torch.bool)
        keep[self.rotary_dims(g)] = False
        return keep.nonzero().squeeze(1)


def check_source(config: PretrainedConfig) -> None:
    """Refuse, naming the field, a checkpoint this conversion does not cover."""
    if config.model_type not in SOURCE_TYPES:
        raise ValueError(f"model_type={config.model_type!r}: models.convert converts Qwen2-family causal LMs "
                         f"(model_type {list(SOURCE_TYPES)}, Qwen2ForCausalLM) only")
    architectures = getattr(config, "architectures", None) or ["Qwen2ForCausalLM"]
    if "Qwen2ForCausalLM" not in architectures:
        raise ValueError(f"architectures={architectures}: a Qwen2ForCausalLM checkpoint is needed (a causal LM)")
    if getattr(config, "use_sliding_window", False):
        raise ValueError("use_sliding_window=True: the MLA model attends over the whole context; convert a "
                         "checkpoint without sliding-window attention")
    rope_type = (config.rope_parameters or {}).get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"rope_parameters rope_type={rope_type!r}: only the default RoPE is converted")
    if (config.rope_parameters or {}).get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("rope_parameters partial_rotary_factor != 1: only fully rotary Qwen2 heads are converted")


def _head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _attn(layer) -> dict[str, torch.Tensor]:
    a = layer.self_attn
    return {"q": a.q_proj.weight, "qb": a.q_proj.bias, "k": a.k_proj.weight, "kb": a.k_proj.bias,
            "v": a.v_proj.weight, "vb": a.v_proj.bias, "o": a.o_proj.weight}


@torch.no_grad()
def pair_scores(source, calibration_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(G, D/2) how much each frequency pair of each key/value head contributes to the scores, summed over
    layers (each layer's scores normalised to sum 1): MHA2MLA's 2-norm criterion, mean_t ||k_i,t|| times the
    mean over the head's queries of mean_t ||q_i,t|| (pre-rotation; rotation keeps norms). From the
    activations on ``calibration_ids`` (B, T), or, without them, from the rows of the projection weights."""
    cfg = source.config
    h, g, d = cfg.num_attention_heads, cfg.num_key_value_heads, _head_dim(cfg)
    captured: dict[int, dict[str, torch.Tensor]] = {}
    if calibration_ids is not None:
        hooks = []
        for i, layer in enumerate(source.model.layers):
            for name in ("q_proj", "k_proj"):
                def keep(module, args, out, i=i, name=name):
                    captured.setdefault(i, {})[name] = out.reshape(-1, out.shape[-1])  # (B*T, heads*D)
                hooks.append(getattr(layer.self_attn, name).register_forward_hook(keep))
        source(calibration_ids, use_cache=False)
        for hook in hooks:
            hook.remove()
    total = torch.zeros(g, d // 2, dtype=torch.float64)
    for i, layer in enumerate(source.model.layers):
        if calibration_ids is not None:
            q, k = captured[i]["q_proj"].double(), captured[i]["k_proj"].double()  # (N, H*D), (N, G*D)
        else:  # the weight rows with the bias as one more input column
            w = _attn(layer)
            q = torch.cat([w["q"], w["qb"][:, None]], dim=1).double().T  # (d+1, H*D)
            k = torch.cat([w["k"], w["kb"][:, None]], dim=1).double().T
        q_pairs = q.view(-1, h, 2, d // 2).norm(dim=2)  # (N, H, D/2): the norm of each rotating pair
        k_pairs = k.view(-1, g, 2, d // 2).norm(dim=2)  # (N, G, D/2)
        score = k_pairs.mean(0) * q_pairs.mean(0).view(g, h // g, d // 2).mean(1)  # (G, D/2)
        total += score / score.sum()
    return total


def plan(source, kv_lora_rank: int | None, qk_rope_head_dim: int | None,
         calibration_ids: torch.Tensor | None = None) -> Plan:
    """Choose the kept pairs (the top r = R / 2G of each head by ``pair_scores``) and the latent width."""
    cfg = source.config
    g, d = cfg.num_key_value_heads, _head_dim(cfg)
    rope = qk_rope_head_dim if qk_rope_head_dim is not None else max(2 * g, g * d // 2)
    if rope % (2 * g) or not 2 * g <= rope <= g * d:
        raise ValueError(f"qk_rope_head_dim={rope}: the shared rotary key holds r pairs of each of the {g} key/value "
                         f"heads, so it must be a multiple of 2G = {2 * g} between {2 * g} and G*D = {g * d}")
    r = rope // (2 * g)
    kept = pair_scores(source, calibration_ids).topk(r, dim=1).indices.sort(dim=1).values  # (G, r)
    p = Plan(cfg.num_attention_heads, g, d, kept, 0)
    p.kv_lora_rank = kv_lora_rank if kv_lora_rank is not None else p.full_width
    if p.kv_lora_rank < 1:
        raise ValueError(f"kv_lora_rank={p.kv_lora_rank}: must be >= 1 (exact from {p.full_width} up)")
    return p


def target_config(source_config: PretrainedConfig, p: Plan, group: str, inv_freq: torch.Tensor,
                  **overrides) -> LatentReasoningConfig:
    if group not in GROUPS:
        raise ValueError(f"group={group!r}: the MLA groups a Qwen2 checkpoint converts to are {list(GROUPS)} "
                         "(the baseline uses the checkpoint as it is)")
    unknown = sorted(set(overrides) - set(LatentReasoningConfig().to_dict()))
    if unknown:
        raise ValueError(f"overrides {unknown} are not fields of the MLA config (models/configuration.py)")
    s = source_config
    rope_inv_freq = [float(inv_freq[p.kept[g, m]]) for g in range(p.kv_heads) for m in range(p.pairs)]
    fields = dict(
        vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_hidden_layers, num_attention_heads=s.num_attention_heads, hidden_act=s.hidden_act,
        max_position_embeddings=s.max_position_embeddings, rms_norm_eps=s.rms_norm_eps,
        tie_word_embeddings=s.tie_word_embeddings, pad_token_id=s.pad_token_id, bos_token_id=s.bos_token_id,
        eos_token_id=s.eos_token_id, q_lora_rank=None, kv_lora_rank=p.kv_lora_rank, qk_nope_head_dim=p.nope,
        qk_rope_head_dim=p.rope, v_head_dim=p.head_dim, attention_bias=True, q_proj_bias=True,
        kv_latent_norm=False, rope_parameters={"rope_type": "default", "rope_theta": s.rope_parameters["rope_theta"]},
        rope_inv_freq=rope_inv_freq, lru_residual_gate=group != "mla_only", **GROUP_SETTINGS[group])
    return LatentReasoningConfig(**{**fields, **overrides})


def _latent_basis(w: torch.Tensor, b: torch.Tensor, width: int) -> torch.Tensor:
    """(F, C) orthonormal columns U: the latent is U^T (W x + b), its up-projection U. The identity (zero
    columns past F) when C >= F; else the top C left singular vectors of [W | b] (MHA2MLA's joint SVD)."""
    f = w.shape[0]
    if width >= f:
        return torch.eye(f, width, dtype=torch.float64)
    u, _, _ = torch.linalg.svd(torch.cat([w, b[:, None]], dim=1).double(), full_matrices=False)
    return u[:, :width]


@torch.no_grad()
def convert_attention(src: dict[str, torch.Tensor], dst, p: Plan, scale: float) -> None:
    """One layer: the source's q/k/v/o (and biases) onto MLA's q_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj."""
    h, g, d, n = p.heads, p.kv_heads, p.head_dim, p.heads // p.kv_heads
    wq, bq = src["q"].double().view(h, d, -1), src["qb"].double().view(h, d)  # (H, D, d), (H, D)
    wk, bk = src["k"].double().view(g, d, -1), src["kb"].double().view(g, d)
    wv, bv = src["v"].double().view(g, d, -1), src["vb"].double().view(g, d)
    # Queries (H, Dn + R): the head's own position-free dims, then its kept pairs in its own slots of the
    # shared rotary key (slot j of head g's m-th pair: j = g*r + m, its second half at j + R/2), zero elsewhere.
    q_w = wq.new_zeros(h, p.nope + p.rope, wq.shape[-1])
    q_b = bq.new_zeros(h, p.nope + p.rope)
    for head in range(h):
        kv = head // n  # repeat_kv: query head h reads key/value head h // n
        rows = torch.cat([p.nope_dims(kv), p.rotary_dims(kv)])
        cols = torch.cat([torch.arange(p.nope), p.nope + p.slots(kv)])
        q_w[head, cols], q_b[head, cols] = wq[head, rows] * scale, bq[head, rows] * scale
    # The shared rotary key (R,): every head's kept pairs; the latent's source rows [k_nope of each head ; v].
    kr_w = wk.new_zeros(p.rope, wk.shape[-1])
    kr_b = bk.new_zeros(p.rope)
    for kv in range(g):
        kr_w[p.slots(kv)], kr_b[p.slots(kv)] = wk[kv, p.rotary_dims(kv)], bk[kv, p.rotary_dims(kv)]
    lat_w = torch.cat([wk[kv, p.nope_dims(kv)] for kv in range(g)] + [wv[kv] for kv in range(g)])  # (F, d)
    lat_b = torch.cat([bk[kv, p.nope_dims(kv)] for kv in range(g)] + [bv[kv] for kv in range(g)])  # (F,)
    u = _latent_basis(lat_w, lat_b, p.kv_lora_rank)  # (F, C)
    attn = dst.self_attn
    attn.q_proj.weight.copy_(q_w.reshape(-1, q_w.shape[-1]))
    attn.q_proj.bias.copy_(q_b.reshape(-1))
    attn.kv_a_proj_with_mqa.weight.copy_(torch.cat([u.T @ lat_w, kr_w]))
    attn.kv_a_proj_with_mqa.bias.copy_(torch.cat([u.T @ lat_b, kr_b]))
    # Up-projection per query head: [W_UK ; W_UV] (Dn + D, C) = the rows of U for its own head's k_nope and v.
    up = []
    for head in range(h):
        kv = head // n
        k_rows = torch.arange(p.nope) + kv * p.nope
        v_rows = torch.arange(d) + g * p.nope + kv * d
        up.append(torch.cat([u[k_rows], u[v_rows]]))
    attn.kv_b_proj.weight.copy_(torch.cat(up))  # (H*(Dn+D), C)
    attn.o_proj.weight.copy_(src["o"])
    attn.o_proj.bias.zero_()  # Qwen2's o_proj has none


@torch.no_grad()
def convert_model(source, group: str, kv_lora_rank: int | None = None, qk_rope_head_dim: int | None = None,
                  calibration_ids: torch.Tensor | None = None, **overrides) -> LatentReasoningForCausalLM:
    """A loaded Qwen2ForCausalLM -> the MLA model of ``group`` (fp32), weights converted as the module docstring
    says. ``overrides``: further config fields of the target (LRU settings, say)."""
    check_source(source.config)
    source = source.float().eval()
    p = plan(source, kv_lora_rank, qk_rope_head_dim, calibration_ids)
    config = target_config(source.config, p, group, source.model.rotary_emb.inv_freq, **overrides)
    target = LatentReasoningForCausalLM(config).eval()
    scale = ((p.nope + p.rope) / p.head_dim) ** 0.5  # MLA scales scores by (Dn+R)^-1/2, Qwen2 by D^-1/2
    target.model.embed_tokens.weight.copy_(source.model.embed_tokens.weight)
    target.model.norm.weight.copy_(source.model.norm.weight)
    if not config.tie_word_embeddings:
        target.lm_head.weight.copy_(source.lm_head.weight)
    for src, dst in zip(source.model.layers, target.model.layers, strict=True):
        dst.input_layernorm.weight.copy_(src.input_layernorm.weight)
        dst.post_attention_layernorm.weight.copy_(src.post_attention_layernorm.weight)
        dst.mlp.load_state_dict(src.mlp.state_dict())
        convert_attention(_attn(src), dst, p, scale)
    return target


@torch.no_grad()
def logit_error(source, target, ids: torch.Tensor) -> dict[str, float]:
    """How far the converted model's logits are from the source's on ``ids`` (B, T): the largest absolute
    difference, it relative to the source logits' standard deviation, the mean KL(source || target) per token,
    the fraction of positions whose top token agrees, and both models' next-token loss on ``ids`` (the loss
    before and after conversion that MHA2MLA reports; the recovery fine-tune is the run's warm start)."""
    a = source(ids, use_cache=False).logits.double()  # (B, T, V)
    b = target(ids, use_cache=False).logits.double()
    diff = (a - b).abs().max().item()
    kl = (a.log_softmax(-1).exp() * (a.log_softmax(-1) - b.log_softmax(-1))).sum(-1).mean().item()

    def loss(logits: torch.Tensor) -> float:
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()

    return {"max_abs": diff, "max_abs_rel": diff / a.std().item(), "kl": kl,
            "top1_agree": (a.argmax(-1) == b.argmax(-1)).double().mean().item(),
            "loss_source": loss(a), "loss_converted": loss(b)}


def is_converted(path: str | Path) -> bool:
    return (Path(path) / "convert_info.json").is_file()


def convert(source_dir: str | Path, group: str, out_dir: str | Path, kv_lora_rank: int | None = None,
            qk_rope_head_dim: int | None = None, calibration_ids: torch.Tensor | None = None,
            request: dict | None = None, **overrides) -> dict:
    """Convert the checkpoint in ``source_dir`` and save it, its tokenizer and generation config to ``out_dir``,
    with ``convert_info.json`` (the plan, ``request`` as given: what a caller reusing the copy compares, and,
    on the calibration tokens, the logit error). -> that record."""
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    if not (source_dir / "config.json").is_file():
        raise ValueError(f"--from {source_dir}: no transformers checkpoint there (no config.json)")
    check_source(AutoConfig.from_pretrained(source_dir))
    source = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
    target = convert_model(source, group, kv_lora_rank, qk_rope_head_dim, calibration_ids, **overrides)
    c = target.config
    info = {"source": str(source_dir), "group": group, "kv_lora_rank": c.kv_lora_rank,
            "qk_rope_head_dim": c.qk_rope_head_dim, "qk_nope_head_dim": c.qk_nope_head_dim,
            "exact_latent_width": source.config.num_key_value_heads * (c.qk_nope_head_dim + c.v_head_dim),
            "rotary_pairs_kept_of": _head_dim(source.config) // 2,
            "logit_error": logit_error(source, target, calibration_ids) if calibration_ids is not None else None,
            "request": request}
    out_dir.mkdir(parents=True, exist_ok=True)
    target.save_pretrained(out_dir)
    if (source_dir / "tokenizer_config.json").is_file() or (source_dir / "tokenizer.json").is_file():
        load_tokenizer(source_dir).save_pretrained(out_dir)
    if (source_dir / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(source_dir).save_pretrained(out_dir)
    (out_dir / "convert_info.json").write_text(json.dumps(info, indent=2))
    return info


def calibration_batch(tokenizer, n: int = 16, seed: int = 0, max_tokens: int = 256) -> torch.Tensor | None:
    """(n, T) token ids of the causal-loop task's prompts and worked solutions (the text the retrofitted model
    will be trained on), for the frequency choice and the error report; None without a tokenizer."""
    if tokenizer is None:
        return None
    from data.causal_loop import TaskConfig, generate

    batch = generate(TaskConfig(), n=n, seed=seed)
    texts = [batch.problem(i).question() + "\n" + batch.problem(i).solution() for i in range(n)]
    rows = [tokenizer(t)["input_ids"][:max_tokens] for t in texts]
    t = min(len(r) for r in rows)
    return torch.tensor([r[:t] for r in rows])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", required=True, help="a local Qwen2ForCausalLM checkpoint")
    parser.add_argument("--group", required=True, choices=GROUPS)
    parser.add_argument("--out", required=True)
    parser.add_argument("--kv_lora_rank", type=int, default=None, help="latent width C (default: F, exact)")
    parser.add_argument("--qk_rope_head_dim", type=int, default=None,
                        help="shared rotary key size R, a multiple of 2G (default: half the pairs, G*D/2)")
    args = parser.parse_args(argv)
    tokenizer = None
    if (Path(args.source) / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(args.source)
    info = convert(args.source, args.group, args.out, args.kv_lora_rank, args.qk_rope_head_dim,
                   calibration_batch(tokenizer))
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
