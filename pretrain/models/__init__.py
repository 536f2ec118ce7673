"""ViT family built on timm (`vit.py`), the MAE wrapper (`mae.py`), and the torch-free table of registered
architectures with their rules (`archs.py`).

The table's names import here without torch (so `vit-pretrain config` can check a model section); the
builders load `vit.py`, and with it torch and timm, on first use.
"""
from pretrain.models.archs import ARCHS, TIMM_NAMES, check_model_config, list_models, model_kwargs, resolve_arch

_BUILDERS = ("block_flops", "create_model", "flops_per_image", "init_sincos_pos_embed", "load_weights", "num_params")


def __getattr__(name: str):
    if name in _BUILDERS:
        from pretrain.models import vit

        return getattr(vit, name)
    raise AttributeError(f"module 'pretrain.models' has no attribute {name!r}")


__all__ = ["ARCHS", "TIMM_NAMES", "check_model_config", "list_models", "model_kwargs", "resolve_arch", *_BUILDERS]
