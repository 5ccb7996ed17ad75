"""Networks: ViT backbones, the multi-view transformer and the single-view baseline, heatmap heads,
patch masking."""
