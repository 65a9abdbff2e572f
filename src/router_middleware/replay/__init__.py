"""Offline replay of recorded sessions: plan, simulate the provider's prompt cache, price."""

from .routed import RoutedAccount
from .runner import ReplayReport, SessionReport, model_for, replay, replay_session
from .session import Session, load_session, parse_session

__all__ = ["ReplayReport", "RoutedAccount", "Session", "SessionReport", "load_session", "model_for", "parse_session",
           "replay", "replay_session"]
