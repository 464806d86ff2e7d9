"""mm.adapters: the joints between encoders and the frozen LM (plain nn.Modules).

`CrossAttentionBlock`: gated cross-attention (image, video). `TemporalAggregator`: the perceiver resampler that
merges consecutive video frames. The speech adapter lives beside them.
"""

from .cross_attention import CrossAttention, CrossAttentionBlock
from .temporal_aggregator import TemporalAggregator

__all__ = ["CrossAttention", "CrossAttentionBlock", "TemporalAggregator"]
