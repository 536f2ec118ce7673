"""vit-pretrain: distributed ViT pretraining on WebDataset shards with DeepSpeed ZeRO."""
from pretrain import _compat  # noqa: F401  (must run before anything imports timm)

__version__ = "0.1.0"
