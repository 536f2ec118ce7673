"""ViT family built on timm (`vit.py`) and the MAE wrapper (`mae.py`)."""
from pretrain.models.vit import (  # noqa: F401
    ARCHS, TIMM_NAMES, block_flops, create_model, flops_per_image, init_sincos_pos_embed, list_models, load_weights,
    model_kwargs, num_params, resolve_arch,
)
