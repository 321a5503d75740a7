"""Where monitored tensors come from. So far: attention queries and keys, intercepted at the attention call, and
the rows of attention written by hand, read at its own softmax."""

from geomon.capture._session import ScoresCall
from geomon.capture.attention import capture_attention, find_attention_modules
from geomon.capture.sdpa import AttentionCall, capture_sdpa

__all__ = ["AttentionCall", "ScoresCall", "capture_attention", "capture_sdpa", "find_attention_modules"]
