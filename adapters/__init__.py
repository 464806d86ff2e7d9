"""mm.adapters: the joints between encoders and the frozen LM (plain nn.Modules).

`CrossAttentionBlock`: gated cross-attention (image, video). Further adapters (temporal aggregator, speech
adapter) live beside it.
"""

from .cross_attention import CrossAttention, CrossAttentionBlock

__all__ = ["CrossAttention", "CrossAttentionBlock"]
