"""Where monitored tensors come from. So far: attention queries and keys, intercepted at the attention call."""

from geomon.capture.attention import capture_attention, find_attention_modules
from geomon.capture.sdpa import AttentionCall, capture_sdpa

__all__ = ["AttentionCall", "capture_attention", "capture_sdpa", "find_attention_modules"]
