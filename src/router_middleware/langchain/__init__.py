"""LangChain integration (extra ``langchain``): a routed chat model, an observing callback handler,
and an agent middleware for ``langchain.agents.create_agent``.

    from router_middleware.langchain import RoutedChatModel, RouterCallbackHandler, RouterAgentMiddleware
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .callbacks import RouterCallbackHandler
    from .chat_model import RoutedChatModel
    from .middleware import RouterAgentMiddleware

_EXPORTS = {"RoutedChatModel": "chat_model", "RouterCallbackHandler": "callbacks",
            "RouterAgentMiddleware": "middleware"}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'router_middleware.langchain' has no attribute {name!r}")
    from importlib import import_module

    try:
        loaded = import_module(f".{module}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in ("langchain", "langchain_core"):
            from ..errors import MissingExtra

            raise MissingExtra(f"router_middleware.langchain.{name}", "langchain", exc.name) from exc
        raise
    return getattr(loaded, name)


__all__ = ["RoutedChatModel", "RouterAgentMiddleware", "RouterCallbackHandler"]
