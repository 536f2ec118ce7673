"""vit-pretrain: distributed ViT pretraining on WebDataset shards with DeepSpeed ZeRO."""

__version__ = "0.1.0"
