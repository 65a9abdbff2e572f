"""Context management: strategies over a growing chat history, each a pure policy."""

from .breakpoints import CacheBreakpoints
from .clearing import ClearToolOutputs, chunk_tokens
from .digest import cleared_placeholder, span_digest
from .policy import ContextPolicy
from .window import MiddleOut, Window, context_limit

__all__ = ["CacheBreakpoints", "ClearToolOutputs", "ContextPolicy", "MiddleOut", "Window", "chunk_tokens",
           "cleared_placeholder", "context_limit", "span_digest"]
