"""Semi-supervised pieces: EMA teacher and pseudo-label threshold policies. Pure torch, no torch.distributed."""
from ssfer_dist.ssl.ema import EMATeacher, ema_decay
from ssfer_dist.ssl.thresholds import (DTMThreshold, FixedThreshold, FlexMatchThreshold, FreeMatchThreshold,
                                       ThresholdPolicy, build_threshold)

__all__ = ["EMATeacher", "ema_decay", "ThresholdPolicy", "FixedThreshold", "DTMThreshold", "FreeMatchThreshold",
           "FlexMatchThreshold", "build_threshold"]
