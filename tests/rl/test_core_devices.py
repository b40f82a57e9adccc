"""Every public function of rl.core keeps its inputs' device and dtype.

The meta device stands in for a GPU on a CPU-only box: a function that allocates a buffer on the CPU (or
reads a value back with ``bool(tensor)``) fails there or returns a CPU tensor. CUDA runs the same cases
when there is a GPU and is skipped cleanly otherwise.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from rl import core

B, T, V = 4, 5, 7

DEVICES = ["cpu", "meta", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                          reason="needs CUDA"))]
DTYPES = [torch.float32, torch.float64]


def inputs(device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random (B, T) tensors, a right-padded mask, groups and (B, T, V) logits, made on the CPU and moved."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5, 1, 3, 4])
    cpu = {"x": torch.randn(B, T, generator=g), "y": torch.randn(B, T, generator=g),
           "z": torch.randn(B, T, generator=g), "mask": (torch.arange(T)[None] < lengths[:, None]).float(),
           "scores": torch.rand(B, generator=g), "logits": torch.randn(B, T, V, generator=g)}
    out = {k: v.to(device=device, dtype=dtype) for k, v in cpu.items()}
    out["group"] = torch.tensor([3, 3, 8, 8]).to(device)
    out["tokens"] = torch.randint(0, V, (B, T), generator=g).to(device)
    return out


# One call per public function: a new function without a case fails test_every_public_function_has_a_case.
CASES = {
    "masked_sum": lambda a: core.masked_sum(a["x"], a["mask"], dim=1),
    "masked_mean": lambda a: (core.masked_mean(a["x"], a["mask"]), core.masked_mean(a["x"], a["mask"], dim=1)),
    "masked_var": lambda a: (core.masked_var(a["x"], a["mask"]), core.masked_var(a["x"], a["mask"], unbiased=False)),
    "masked_whiten": lambda a: core.masked_whiten(a["x"], a["mask"]),
    "compute_gae": lambda a: core.compute_gae(a["x"], a["y"], a["mask"], gamma=0.99, lam=0.95),
    "grpo_advantages": lambda a: (core.grpo_advantages(a["scores"], a["group"], a["mask"]),
                                  core.grpo_advantages(a["scores"], a["group"], a["mask"], normalize_std=False)),
    "dense_group_ids": lambda a: core.dense_group_ids(a["group"]),
    "kl_penalty": lambda a: tuple(core.kl_penalty(a["x"], a["y"], e) for e in core.KL_ESTIMATORS),
    "agg_loss": lambda a: tuple(core.agg_loss(a["x"], a["mask"], mode) for mode in core.AGG_MODES),
    "ppo_policy_loss": lambda a: core.ppo_policy_loss(a["x"] * 0.1, a["y"] * 0.1, a["z"], a["mask"], clip=0.2),
    "value_loss": lambda a: (core.value_loss(a["x"], a["y"], a["z"], a["mask"], clip=0.2),
                             core.value_loss(a["x"], a["y"], a["z"], a["mask"], clip=None)),
    "logprobs_from_logits": lambda a: core.logprobs_from_logits(a["logits"], a["tokens"]),
    "entropy_from_logits": lambda a: core.entropy_from_logits(a["logits"]),
    "explained_variance": lambda a: core.explained_variance(a["x"], a["y"], a["mask"]),
}
INTEGER_OUTPUTS = {"dense_group_ids"}  # ids, in the ids' integer dtype


def public_functions() -> set[str]:
    return {name for name, fn in inspect.getmembers(core, inspect.isfunction)
            if not name.startswith("_") and fn.__module__ == core.__name__}


def tensors(out) -> list[torch.Tensor]:
    """Every tensor in a (nested) tuple / dict output."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in tensors(v)]
    return [t for v in out for t in tensors(v)]


def test_every_public_function_has_a_case():
    assert public_functions() == set(CASES)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_outputs_keep_the_inputs_device_and_dtype(name, dtype, device):
    a = inputs(device, dtype)
    outputs = tensors(CASES[name](a))
    expected = a["group"].dtype if name in INTEGER_OUTPUTS else dtype
    assert outputs
    for out in outputs:
        assert out.device.type == device and out.dtype == expected, (name, out.device, out.dtype)


@pytest.mark.parametrize("device", DEVICES[:1] + DEVICES[2:])  # values: not on meta
def test_values_do_not_depend_on_the_device(device):
    a, ref = inputs(device, torch.float64), inputs("cpu", torch.float64)
    for name, case in CASES.items():
        for out, expected in zip(tensors(case(a)), tensors(case(ref)), strict=True):
            assert torch.allclose(out.cpu(), expected, atol=1e-10), name


def test_half_precision_logits_give_fp32_logprobs():
    a = inputs("cpu", torch.bfloat16)
    assert core.logprobs_from_logits(a["logits"], a["tokens"]).dtype == torch.float32
    assert core.entropy_from_logits(a["logits"]).dtype == torch.float32


def test_dense_group_ids_equal_torch_unique():
    for seed in range(5):
        group = torch.randint(-3, 50, (40,), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(core.dense_group_ids(group), torch.unique(group, return_inverse=True)[1])
    assert core.dense_group_ids(torch.tensor([7])).tolist() == [0]
