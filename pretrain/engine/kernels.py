"""Which kernels the step runs: `model.compile` resolved for the device and ZeRO stage (with a compile cache in
the run directory), eager passes outside training, and the SDPA backend of `model.attention_backend`."""
from __future__ import annotations

import contextlib
import os
import time
import warnings

import torch

from pretrain.errors import UserError

# the option's values in torch's own priority order (torch._C._get_sdp_priority_order(): flash, efficient,
# math, cuDNN), so probing them in this order finds what `auto` runs
SDPA_BACKENDS = ("flash", "efficient", "math", "cudnn")


def resolve_compile(setting, device: torch.device, zero_stage: int, info=None) -> bool:
    """`model.compile` -> whether the blocks are compiled. `auto`: on for CUDA at ZeRO 0-2, off on the CPU
    (inductor's CPU code is slower to build than it saves on a short run) and at ZeRO 3: per-block compile
    breaks on ZeRO-3's parameter hooks inside each block, and DeepSpeed's whole-module `engine.compile()`
    would take in MAE's host-side masking and the EMA update, unmeasured; `info` is told so."""
    if setting != "auto":
        return bool(setting)
    if device.type != "cuda":
        return False
    if zero_stage == 3:
        if info is not None:
            info("model.compile=auto: off at deepspeed.zero_stage=3 (compiled blocks need ZeRO stage 2 or lower)")
        return False
    return True


def compile_cache_env(run_dir: str, environ=os.environ) -> dict[str, str]:
    """Point inductor's and Triton's caches into the run directory, so that a requeued job of the same run
    reuses the compiled kernels instead of paying the warm-up again -> the variables set. Only for a run
    directory on a file system (local or shared; an object store has no paths for them), and never over
    a value the user set."""
    import fsspec

    from pretrain.fs import is_local

    fs, root = fsspec.core.url_to_fs(run_dir)
    if not is_local(fs):
        return {}
    wanted = {"TORCHINDUCTOR_CACHE_DIR": os.path.join(root, "compile_cache", "inductor"),
              "TRITON_CACHE_DIR": os.path.join(root, "compile_cache", "triton")}
    chosen = {k: v for k, v in wanted.items() if not environ.get(k)}
    environ.update(chosen)
    return chosen


@contextlib.contextmanager
def eager():
    """Run compiled modules eagerly: eval, k-NN and pictures (no_grad, eval mode, other batch sizes) would
    otherwise add graphs next to the training ones, or turn the batch dimension dynamic for training too."""
    with torch.compiler.set_stance("force_eager"):
        yield


class WarmupClock:
    """The first optimizer steps' wall time, said once after `steps` steps: what compiling costs a run."""

    def __init__(self, accum: int, start_step: int, say, steps: int = 2):
        self.accum, self.first, self.say, self.steps = accum, start_step * accum, say, steps
        self.marks: list[float] = []

    def micro(self, index: int) -> None:
        """Called at the start of micro-batch `index` (global); `say` None: nothing to time."""
        if self.say is None or len(self.marks) > self.steps or (index - self.first) % self.accum:
            return
        self.marks.append(time.perf_counter())
        if len(self.marks) == self.steps + 1:
            times = [b - a for a, b in zip(self.marks, self.marks[1:])]
            self.say("model.compile: compile warm-up: first steps took " + ", ".join(f"{t:.2f} s" for t in times)
                     + " (the first compiles the blocks)")


def _backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]


def sdpa_runs(name: str, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device) -> bool:
    """Whether SDPA backend `name` runs forward and backward on q, k, v of `shape` (B, heads, N, head_dim)."""
    from torch.nn.attention import sdpa_kernel

    q = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    try:
        with warnings.catch_warnings(), sdpa_kernel([_backend(name)], set_priority=True):
            warnings.simplefilter("ignore")  # torch explains each refusal in a warning
            torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
    except RuntimeError:
        return False
    return True


def attention_shapes(module: torch.nn.Module) -> dict[str, tuple[int, int, int]]:
    """{blocks' name: (heads, tokens, head_dim)} of the module's attention: the encoder's, and MAE's decoder's
    (both see every token of the image in the shapes probed here)."""
    encoder = module.encoder
    tokens = encoder.patch_embed.num_patches + getattr(encoder, "num_prefix_tokens", 1)
    shapes = {}
    for name, sub in module.named_modules():
        heads, head_dim = getattr(sub, "num_heads", None), getattr(sub, "head_dim", None)
        where = name.split(".blocks.")[0] if ".blocks." in name else name.split(".")[0]
        if isinstance(heads, int) and isinstance(head_dim, int) and where not in shapes and not name.startswith("ema."):
            shapes[where] = (heads, tokens, head_dim)
    return shapes


def check_attention(setting: str, module: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> dict:
    """-> {blocks' name: the SDPA backend that serves them} (one tiny call per backend and shape). A pinned
    backend that cannot run on this device and these shapes is refused here, before training starts."""
    served = {}
    for where, (heads, tokens, head_dim) in attention_shapes(module).items():
        shape = (2, heads, tokens, head_dim)
        if setting != "auto":
            if not sdpa_runs(setting, shape, dtype, device):
                raise UserError(f"config key model.attention_backend: got {setting!r}, which cannot run the "
                                f"attention of {where} ({heads} heads x {tokens} tokens x head dim {head_dim}, "
                                f"{str(dtype).removeprefix('torch.')}) on {device.type}; use 'auto' or 'math'")
            served[where] = setting
        else:
            served[where] = next((b for b in SDPA_BACKENDS if sdpa_runs(b, shape, dtype, device)), "none")
    return served


def pin_attention(module: torch.nn.Module, setting: str) -> None:
    """Run `module`'s forward under sdpa_kernel([setting]) (its backward runs the kernel the forward chose);
    `auto` leaves torch's choice. Hooks rather than a wrapper: state-dict names and copies are unaffected."""
    if setting == "auto":
        return
    from torch.nn.attention import sdpa_kernel

    contexts = []

    def enter(mod, args):
        ctx = sdpa_kernel([_backend(setting)], set_priority=True)
        ctx.__enter__()
        contexts.append(ctx)

    def leave(mod, args, out):
        contexts.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)
