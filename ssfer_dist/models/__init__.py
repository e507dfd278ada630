"""Model code: timm ViT encoders, MAE, classifier, weights I/O. Pure torch (no ray/deepspeed/torch.distributed)."""
