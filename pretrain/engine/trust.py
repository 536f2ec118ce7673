"""What a checkpoint's pickle may call on load. DeepSpeed loads its files with torch.load(weights_only=False);
every torch file of a checkpoint is checked here first, from the pickle's opcodes, without running it."""
from __future__ import annotations

import os

import torch

from pretrain.errors import UserError, first_line

TRUSTED_GLOBALS = frozenset({
    # what our own checkpoints pickle besides tensors and containers: DeepSpeed's optimizer metadata and,
    # in checkpoints of earlier versions, every rank's numpy RNG state (numpy 1 and 2 spell it differently)
    "numpy.ndarray", "numpy.dtype", "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar",
    "deepspeed.utils.tensor_fragment.fragment_address", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler", "deepspeed.runtime.zero.config.ZeroStageEnum",
})
"""Names a checkpoint's pickle may call on load. DeepSpeed loads its files with torch.load(weights_only=False),
so any other name (os.system, a foreign class) is refused before DeepSpeed or we unpickle the file."""


def check_torch_file(path: str) -> None:
    """Refuse a torch file whose pickle calls anything but tensors, containers and TRUSTED_GLOBALS,
    read from the pickle's opcodes without running it; an unreadable file is named. UserError either way."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:  # noqa: BLE001  not a zip, truncated, empty: torch raises several types
        raise UserError(f"{path} is unreadable: {type(e).__name__}: {first_line(e)}") from None
    foreign = sorted(set(names) - TRUSTED_GLOBALS)
    if foreign:
        raise UserError(f"{path} is not a checkpoint vit-pretrain wrote: its pickle calls {', '.join(foreign[:3])} "
                        "on load, which could run any code; refusing to load it. Use checkpoints of your own "
                        "runs, or weights as .safetensors")


def check_torch_files(folder: str, context: str) -> None:
    """check_torch_file on each torch file of a local tag folder; a refusal says `context` first."""
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".pt"):
                try:
                    check_torch_file(os.path.join(folder, name))
                except UserError as e:
                    raise UserError(f"{context}: {e}") from None
