"""Where monitored tensors come from. So far: attention queries and keys, intercepted at the attention call."""

from geomon.capture.sdpa import AttentionCall, capture_sdpa

__all__ = ["AttentionCall", "capture_sdpa"]
