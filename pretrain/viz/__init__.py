"""Pictures of what a ViT learned: attention maps (one implementation), TensorBoard grids, `vit-pretrain
visualize` and the quickstart's report."""
