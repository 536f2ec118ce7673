"""Make timm importable on a CPU-only torch with the registry's CUDA torchvision wheel.

That wheel's `_C.so` needs `libtorch_cuda.so`, so `import torchvision` raises
"operator torchvision::nms does not exist" and timm (which imports torchvision.ops) fails with it.
When, and only when, that exact error is raised, we define the two missing operator schemas and
import again. timm's models, transforms, RandAugment and Mixup then work; torchvision.ops.nms and
torchvision.io stay unusable (we decode with PIL). On a machine whose torchvision loads, nothing
is patched. torchvision itself has no switch for this, hence the hand-written shim.
"""
import sys

PATCHED = False


def _fix_torchvision() -> None:
    global PATCHED
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
    except ImportError:
        return  # no torchvision at all: timm will say so itself
    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")  # noqa: F841  kept alive below
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    globals()["_LIB"] = lib
    import torchvision  # noqa: F401,F811

    PATCHED = True


_fix_torchvision()
