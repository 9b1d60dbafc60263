"""vLLM plugin: `vllm serve DIR` for selfpruner's pruned checkpoints whose blocks differ in size.

vLLM calls `register()` through the ``vllm.general_plugins`` entry point in each process it
starts. Importing this package imports nothing heavy, so it works where vLLM is not installed;
the model classes (`vllm_model`) are imported by vLLM when a checkpoint names one of them.
"""

from __future__ import annotations

ARCHITECTURES = ("SelfPrunerLlamaForCausalLM", "SelfPrunerMistralForCausalLM", "SelfPrunerQwen2ForCausalLM")


def register() -> None:
    """Tell vLLM's model registry about our classes (lazily, as "module:Class")."""
    from vllm import ModelRegistry

    for arch in ARCHITECTURES:
        ModelRegistry.register_model(arch, f"{__name__}.vllm_model:{arch}")
