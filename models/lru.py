"""The Latent Reasoning Unit (LRU): K gated refinements of the MLA latent before attention, with halting.

Shapes: B batch, T new tokens, C latent (kv_lora_rank), K iterations, W conv kernel.

**The update** (``LatentReasoningUnit._refine``). A latent that sees only its own token cannot combine
variables stated at other positions, so each iteration first mixes positions with a *causal depthwise
convolution* over the previous iteration's states of the last W tokens, then applies a GRU-style update
(Cho et al. 2014, arXiv 1406.1078):

    m_t = sum_j w_j * h^{k-1}_{t-W+1+j}                        (causal, per channel)
    z, r = sigmoid(W_zr [h^{k-1}_t ; m_t]);  h~ = tanh(W_h [r * h^{k-1}_t ; m_t])
    h^k_t = (1 - z) * h^{k-1}_t + z * h~

With ``lru_residual_gate`` the unit's output o becomes h^0 + a * (o - h^0), a (C,) learned and zero at start:
the unit is then exactly the identity, whatever its halting, until training moves a (retrofitted models).

It stays causal (position t reads only positions <= t), and exact under caching with a state per
sequence of fixed size, like a short-convolution layer in vLLM: the last W-1 inputs of every iteration,
(K, W-1, C). The receptive field grows by W-1 positions per iteration. The refined latent is what
attention reads and what the cache stores, so the MLA cache itself is unchanged.

**The halting rule** (``act_step``). ``fixed`` runs exactly K iterations and returns h^K. ``adaptive`` is
ACT (Graves 2016, arXiv 1603.08983) per position: halting probabilities p^n, N = first n with
sum p >= 1 - eps (or K), remainder R = 1 - sum_{n<N} p^n, output sum_{n<N} p^n h^n + R h^N (weights sum
to 1), ponder cost N + R. A halted position is frozen: later iterations of its neighbours read its frozen
state. An optional per-sequence signal (sigmoid of a projection of the causal running mean of the states
over positions <= t) is mixed into p; its running sums are part of the per-sequence state.

**Packed rows** (``starts``): several sequences one after another in one row, each restarting at position 0
(padding-free packing). The unit forgets everything before a start: the carried state, the convolution's
taps that reach back across it, the running sums. Without starts nothing of this runs.

**Rollback** (``trail=True``): the state after every position of the call (``LRUTrail``), so a cache can go
back to any of them exactly when generate() rejects draft tokens (``LatentCache.crop``).

``lru_summary`` turns the per-position reports of all LRU layers into the auxiliary loss and statistics.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from models.configuration import LatentReasoningConfig


@dataclass
class LRUState:
    """Per-sequence state of one layer's LRU between forward calls (nothing grows with length)."""

    conv: torch.Tensor  # (B, K, W-1, C): the last W-1 inputs of every iteration
    running_sum: torch.Tensor | None = None  # (B, K, C): sum of each iteration's states over positions so far
    count: torch.Tensor | None = None  # (B,): valid positions so far

    def index_select(self, index: torch.Tensor) -> LRUState:
        """The states of the rows ``index`` (B',): reordered, repeated or selected, as a cache's rows are."""
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.index_select(0, index.to(t.device))

        return LRUState(*(pick(getattr(self, f.name)) for f in fields(self)))


@dataclass
class LRUTrail:
    """The LRU state after each of the T positions of one call, compactly: the state it started from and what
    each position added. A cache that may roll back keeps it (``LatentCache.crop``); nothing else does."""

    before: LRUState  # the state the call started from
    inputs: torch.Tensor  # (B, K, T, C): every iteration's input at every new position (what later windows read)
    running_sums: torch.Tensor | None = None  # (B, K, T, C): the running sums after every position (global halting)
    counts: torch.Tensor | None = None  # (B, T): valid positions so far, after every position

    @property
    def length(self) -> int:
        return self.inputs.shape[2]

    def state_after(self, t: int) -> LRUState:
        """The exact state after position t of the call (t = -1: before it)."""
        if t < 0:
            return self.before
        window = torch.cat([self.before.conv, self.inputs[:, :, : t + 1]], dim=2)  # (B, K, W-1+t+1, C)
        conv = window[:, :, t + 1:]  # the last W-1 inputs of every iteration
        sums = None if self.running_sums is None else self.running_sums[:, :, t]
        return LRUState(conv, sums, None if self.counts is None else self.counts[:, t])

    def index_select(self, index: torch.Tensor) -> LRUTrail:
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.index_select(0, index.to(t.device))

        return LRUTrail(self.before.index_select(index), pick(self.inputs), pick(self.running_sums), pick(self.counts))


@dataclass
class LRUResult:
    """What one LRU call reports, per position (pads hold 0)."""

    iterations: torch.Tensor  # (B, T) iterations run, N
    remainder: torch.Tensor  # (B, T) ACT remainder R (1 in fixed mode)
    # The diagnostics below are None when the call was made with diagnostics=False (fast decoding).
    weights: torch.Tensor | None = None  # (B, T, K) weight of each iteration's state in the output; sums to 1
    # (B, T) growth of the update across iterations, sum_k relu(|d_k|^2 - |d_{k-1}|^2) / |latent|^2 with
    # d_k = h^k - h^{k-1}: 0 while each update is no larger than the one before (the residual shrinks), so
    # a position that halts after one iteration is not pushed to do nothing (the design's stability term).
    stability: torch.Tensor | None = None
    last_update: torch.Tensor | None = None  # (B, T) squared size of the last update relative to the input latent
    sparsity: torch.Tensor | None = None  # (B, T) Hoyer-square of the output divided by C, in [1/C, 1]
    convergence: torch.Tensor | None = None  # (B, T) |last update| / |first update|
    halting_probs: torch.Tensor | None = None  # (B, T, K) p^n of every iteration (adaptive mode; 0 once halted)
    states: torch.Tensor | None = None  # (K+1, B, T, C) h^0..h^K, only with return_states
    trail: LRUTrail | None = None  # the state after every position, only with trail=True


def act_step(p: torch.Tensor | None, running: torch.Tensor, cumulative: torch.Tensor, last: bool, epsilon: float):
    """One iteration of the halting rule, for every position (B, T) at once.

    p: this iteration's halting probabilities (None in fixed mode); running: positions still iterating;
    cumulative: sum of their earlier p. -> (weight of this iteration's state in the output, positions that
    halt now, their remainder R = 1 - cumulative (ACT eq. 7), new cumulative). A halting position's weight
    is its remainder; fixed mode halts everyone at the last iteration with weight and remainder 1.
    """
    if p is None:
        halts = running & last
        return halts.to(cumulative.dtype), halts, torch.ones_like(cumulative), cumulative
    halts = running & ((cumulative + p >= 1 - epsilon) | last)
    zero = torch.zeros_like(p)
    weight = torch.where(halts, 1 - cumulative, torch.where(running, p, zero))
    # The remainder is its own node (not read off ``weight``), so its gradient reaches ``cumulative``
    # separately: the same sums, in the same order, as the loop written out (bitwise-equal gradients).
    return weight, halts, 1 - cumulative, torch.where(running & ~halts, cumulative + p, cumulative)


@dataclass
class Segments:
    """Where the sequences of packed rows begin, in the terms the unit reads (built once per call). A row's
    sequence 0 is the one the carried state belongs to; every start opens the next one."""

    same_taps: torch.Tensor  # (B, T, 1, W): tap j of position t lies in t's own sequence
    carried: torch.Tensor  # (B, T): position t is still in sequence 0 (the carried state applies)
    last_start: torch.Tensor  # (B, T): the latest start at or before t (0 if none)
    keep_last: torch.Tensor  # (B, W-1, 1): which of the last W-1 positions lie in the row's last sequence

    @classmethod
    def of(cls, starts: torch.Tensor, kernel: int) -> Segments:
        b, t = starts.shape
        sequence = starts.long().cumsum(1)  # (B, T)
        window = F.pad(sequence, (kernel - 1, 0))  # (B, W-1+T): the carried inputs are sequence 0's
        same = window.unfold(1, kernel, 1) == sequence[..., None]  # (B, T, W)
        positions = torch.arange(t, device=starts.device).expand(b, t)
        last_start = torch.where(starts, positions, 0).cummax(1).values
        keep_last = window[:, window.shape[1] - (kernel - 1):] == sequence[:, -1:]  # (B, W-1)
        return cls(same[:, :, None], sequence == 0, last_start, keep_last[..., None])


def running_total(x: torch.Tensor, carry: torch.Tensor, segments: Segments | None) -> torch.Tensor:
    """Causal sum over positions of x (B, T, ...) plus ``carry`` (B, ...), the sum of earlier calls. With packed
    rows it restarts at every start (sums since the start, minus sums before it) and drops the carry there."""
    total = torch.cumsum(x, dim=1)
    if segments is None:
        return carry[:, None] + total
    b, t = x.shape[:2]
    extra = (1,) * (x.dim() - 2)
    before = total - x  # the sum over earlier positions of the call
    since_start = total - before.gather(1, segments.last_start.view(b, t, *extra).expand_as(x))
    return carry[:, None] * segments.carried.view(b, t, *extra) + since_start


# Why torch.compile leaves the unit out of its graphs (what a fullgraph=True compile reports).
EAGER_ONLY = ("the LRU runs eagerly: its halting is data-dependent control flow (which positions still iterate), so "
              "torch.compile(fullgraph=True) and static caches are for the mla_only group; compile an LRU model "
              "without fullgraph (the unit runs between the compiled graphs)")


def eager_under_compile(fn):
    """``fn``, run eagerly when torch.compile traces it: a graph break, or under fullgraph=True an error that
    gives EAGER_ONLY as the reason. Outside compilation it costs one check: torch.compiler.disable itself
    slows every frame under it (~40 us per LRU call, measured), so it is entered only when compiling."""
    disabled = torch.compiler.disable(fn, reason=EAGER_ONLY)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        return disabled(*args, **kwargs) if torch.compiler.is_compiling() else fn(*args, **kwargs)

    return run


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
        # output = latent + a * (LRU(latent) - latent), a (C,) zero at start: an exact no-op that still learns
        # (a's gradient is the unit's change; the unit's own gradients flow once a moves), as ReZero's residual.
        self.residual_gate = nn.Parameter(torch.zeros(c)) if config.lru_residual_gate else None

    def empty_state(self, latent: torch.Tensor) -> LRUState:
        b, _, c = latent.shape
        conv = latent.new_zeros(b, self.iterations, self.kernel - 1, c)
        if self.halt_global is None:
            return LRUState(conv)
        return LRUState(conv, latent.new_zeros(b, self.iterations, c), latent.new_zeros(b))

    # ---- the update ------------------------------------------------------------------------------------

    def _refine(self, h: torch.Tensor, window: torch.Tensor, running: torch.Tensor,
                segments: Segments | None) -> torch.Tensor:
        """One refinement of the running positions of h (B, T, C), given its causal window (B, W-1+T, C).
        Halted positions and pads come back unchanged and cost nothing: only running rows go through the
        gates, so adaptive halting saves the work of the iterations it skips."""
        # The depthwise convolution written out as a weighted sum over the W taps of each position: the
        # same numbers as self.conv, without a oneDNN call that costs ~150 us even for one decode token.
        taps = window.unfold(1, self.kernel, 1)  # (B, T, C, W)
        if segments is not None:  # packed rows: a tap reaching back into the previous sequence reads zero
            taps = torch.where(segments.same_taps, taps, 0.0)
        mixed = (taps * self.conv.weight.squeeze(1)).sum(-1) + self.conv.bias  # (B, T, C)
        if bool(running.all()):
            return self._gru(h, mixed)
        rows = running.nonzero(as_tuple=True)
        return h.index_put(rows, self._gru(h[rows], mixed[rows]))

    def _gru(self, h: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
        z, r = torch.sigmoid(self.gates(torch.cat([h, mixed], dim=-1))).chunk(2, dim=-1)
        candidate = torch.tanh(self.candidate(torch.cat([r * h, mixed], dim=-1)))
        return (1 - z) * h + z * candidate

    # ---- halting ---------------------------------------------------------------------------------------

    def _running_means(self, h: torch.Tensor, k: int, valid: torch.Tensor, state: LRUState, counts: torch.Tensor,
                       segments: Segments | None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (B, T, C) causal mean of iteration k's states over each sequence's valid positions so far (earlier
        calls included, through ``state``; ``counts`` (B, T) of them), and the running sums (B, T, C)."""
        sums = running_total(h * valid[..., None], state.running_sum[:, k], segments)  # (B, T, C)
        return sums / counts.clamp(min=1)[..., None], sums

    def _halting_probability(self, h: torch.Tensor, means: torch.Tensor | None) -> torch.Tensor:
        """p (B, T) of one iteration: local, mixed with the per-sequence signal when there is one."""
        p = torch.sigmoid(self.halt(h)).squeeze(-1)
        if means is None:
            return p
        return (1 - self.global_mix) * p + self.global_mix * torch.sigmoid(self.halt_global(means)).squeeze(-1)

    # ---- the loop --------------------------------------------------------------------------------------

    @eager_under_compile
    def forward(self, latent: torch.Tensor, valid: torch.Tensor, state: LRUState | None, return_states: bool = False,
                diagnostics: bool = True, starts: torch.Tensor | None = None,
                trail: bool = False) -> tuple[torch.Tensor, LRUResult, LRUState]:
        """latent (B, T, C), valid (B, T) bool -> refined latent (B, T, C), LRUResult, new LRUState.
        ``diagnostics=False`` skips what only the auxiliary loss and the statistics read (a rollout's decode
        steps): the result then holds iterations and remainders only. ``starts`` (B, T) bool: positions where
        a packed row begins a new sequence (None: no row does). ``trail``: also report the state after every
        position (``LRUResult.trail``), for a cache that may roll back."""
        if trail and starts is not None:
            raise ValueError("a cache that records for rollback (assisted decoding) cannot take packed rows: "
                             "its rollback could not rebuild states across a sequence start; run them unpacked")
        state, segments, counts, new_state = self._start(latent, valid, state, starts)
        b, t, _ = latent.shape
        h = torch.where(valid[..., None], latent, 0.0)  # torch.where, not a product: pad rows may hold inf/NaN
        running, cumulative = valid.clone(), latent.new_zeros(b, t)
        output, iterations, remainder = torch.zeros_like(latent), latent.new_zeros(b, t), latent.new_zeros(b, t)
        trace = {name: latent.new_zeros(b, t, self.iterations) for name in ("weights", "probs", "update_norms")}
        states, all_sums = [h], []
        for k in range(self.iterations):
            window = torch.cat([state.conv[:, k], h], dim=1)  # (B, W-1+T, C)
            new_state.conv[:, k] = self._last_inputs(window, segments)
            h_new = self._refine(h, window, running, segments) if bool(running.any()) else h  # halted stay frozen
            means = None
            if counts is not None:
                means, sums = self._running_means(h_new, k, valid, state, counts, segments)
                new_state.running_sum[:, k] = sums[:, -1]
                all_sums.append(sums)
            if bool(running.any()):
                if diagnostics:  # first: the order of h_new's uses fixes how autograd sums its gradient
                    trace["update_norms"][..., k] = (h_new - h).norm(dim=-1)
                p = self._halting_probability(h_new, means) if self.adaptive else None
                weight, halts, rest, cumulative = act_step(p, running, cumulative, k == self.iterations - 1,
                                                           self.epsilon)
                output = output + weight[..., None] * h_new
                iterations = iterations + running.to(latent.dtype)
                remainder = torch.where(halts, rest, remainder)
                if diagnostics:
                    trace["weights"][..., k] = weight
                    if p is not None:
                        trace["probs"][..., k] = torch.where(running, p, torch.zeros_like(p))
                running = running & ~halts
            h = h_new
            states.append(h)
        if self.residual_gate is not None:  # states[0]: the input latent, pads zeroed
            output = states[0] + self.residual_gate * (output - states[0])
        if not diagnostics:
            report = LRUResult(iterations=iterations, remainder=remainder * valid)
        else:
            report = self._report(latent, valid, output, iterations, remainder, trace)
            report.states = torch.stack(states) if return_states else None
        if trail:  # the input of iteration k at every position is h^k
            report.trail = LRUTrail(state, torch.stack(states[:-1], dim=1), torch.stack(all_sums, dim=1)
                                    if all_sums else None, counts)
        return output, report, new_state

    def _start(self, latent: torch.Tensor, valid: torch.Tensor, state: LRUState | None, starts: torch.Tensor | None):
        """What a call starts from: the carried state (empty if none), the packed rows' segments (or None),
        the (B, T) count of valid positions so far (global halting), and the new state the loop fills in."""
        state = state or self.empty_state(latent)
        segments = None if starts is None else Segments.of(starts, self.kernel)
        counts = None if self.halt_global is None else running_total(valid.to(latent.dtype), state.count, segments)
        new_count = None if counts is None else state.count + valid.sum(dim=1) if segments is None else counts[:, -1]
        new_state = LRUState(torch.empty_like(state.conv),  # every slot is written by the loop
                             None if state.running_sum is None else torch.empty_like(state.running_sum), new_count)
        return state, segments, counts, new_state

    def _last_inputs(self, window: torch.Tensor, segments: Segments | None) -> torch.Tensor:
        """The carried state of one iteration: the last W-1 entries of its window (B, W-1, C), less those of a
        packed row's earlier sequence."""
        last = window[:, window.shape[1] - (self.kernel - 1):]
        return last if segments is None else torch.where(segments.keep_last, last, 0.0)

    def _report(self, latent, valid, output, iterations, remainder, trace) -> LRUResult:
        """The per-position diagnostics of one call, from what the loop traced."""
        norms = trace["update_norms"]  # (B, T, K) size of each iteration's update; 0 once halted
        last = norms.gather(-1, (iterations.long() - 1).clamp(min=0)[..., None]).squeeze(-1)  # at the halting one
        return LRUResult(
            iterations=iterations,
            remainder=remainder * valid,
            weights=trace["weights"],
            stability=(norms[..., 1:].square() - norms[..., :-1].square()).clamp(min=0).sum(-1)
            / (latent.square().sum(-1) + 1e-6) * valid,  # an iteration not run has norm 0: no growth counted
            last_update=last.square() / (latent.square().sum(-1) + 1e-6) * valid,
            sparsity=output.abs().sum(-1).square() / (output.square().sum(-1) * latent.shape[-1] + 1e-12) * valid,
            convergence=last / (norms[..., 0] + 1e-6) * valid,
            halting_probs=trace["probs"] if self.adaptive else None,
        )


def lru_summary(results: list[LRUResult], valid: torch.Tensor, config: LatentReasoningConfig):
    """Aux loss, its terms and statistics over LRU layers and valid positions.

    ``valid`` is the (B, T) mask of real tokens, or float weights per position: a trainer that runs a shared
    prompt once for n samples weighs its positions by n, so the means equal those of the n full forwards.
    -> (aux loss, {"stability", "sparsity", "ponder"}, {"iterations_mean", "iterations_max", "ponder",
    "convergence", "halting_distribution" (K,)}, iterations (L, B, T))."""
    weight = valid.to(results[0].iterations.dtype)
    n = weight.sum().clamp(min=1e-12)

    def mean(per_layer: list[torch.Tensor]) -> torch.Tensor:
        """The weighted mean over positions of a per-position quantity of each layer, averaged over layers."""
        return torch.stack([(x * weight).sum() / n for x in per_layer]).mean()

    def field_mean(name: str) -> torch.Tensor:
        return mean([getattr(r, name) for r in results])

    ponder = mean([r.iterations + r.remainder for r in results])
    terms = {"stability": field_mean("stability"), "sparsity": field_mean("sparsity"), "ponder": ponder}
    # The design's weights (configuration.py): stability 0.1, sparsity 0.01, ponder 0.001 (adaptive only:
    # in fixed mode the ponder cost is the constant K + 1).
    aux = (config.lru_stability_weight * terms["stability"] + config.lru_sparsity_weight * terms["sparsity"]
           + (config.lru_ponder_weight * ponder if config.lru_halting == "adaptive" else 0.0))
    iterations = torch.stack([r.iterations for r in results])  # (L, B, T)
    counts = F.one_hot(iterations.long().clamp(min=1) - 1, config.lru_max_iterations).to(weight.dtype)  # (L,B,T,K)
    distribution = (counts * weight[None, ..., None]).sum(dim=(0, 1, 2)) / (n * len(results))
    stats = {"iterations_mean": field_mean("iterations").detach(), "iterations_max": iterations.max().detach(),
             "ponder": ponder.detach(), "convergence": field_mean("convergence").detach(),
             "halting_distribution": distribution.detach()}
    return aux, {k: v.detach() for k, v in terms.items()}, stats, iterations
