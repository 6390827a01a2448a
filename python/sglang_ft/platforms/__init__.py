"""Out-of-tree SGLang platform plugins shipped by sglang-ft (entry-point group `sglang.srt.platforms`).

The entry point lives here, apart from the platform class, because SGLang resolves platforms while its own
platform modules are still importing: the entry point must not import sglang.
"""

from __future__ import annotations


def activate_torch_cpu() -> str | None:
    """Entry point of `torch_cpu`: its class path where there is no CUDA device, else None (never shadows CUDA)."""
    import torch

    if torch.cuda.is_available():
        return None
    return "sglang_ft.platforms.torch_cpu.TorchCpuPlatform"
