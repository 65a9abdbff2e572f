"""Masking secrets before anything reaches a span or a log line."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

DEFAULT_RULES: tuple[tuple[str, str], ...] = (
    (r"\bsk-(?:ant-|proj-|or-)?[A-Za-z0-9_\-]{12,}", "[REDACTED_API_KEY]"),
    (r"\bAIza[0-9A-Za-z_\-]{20,}", "[REDACTED_API_KEY]"),  # Google
    (r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[0-9A-Z]{16}\b", "[REDACTED_AWS_KEY_ID]"),
    # an AWS secret key beside its name (alone, 40 base64 characters look like any hash)
    (r"(?i)\b(aws_?secret_?access_?key|secret_?access_?key|aws_?secret)(\\?[\"']?\s*[:=]\s*\\?[\"']?)[A-Za-z0-9/+=]{40}",
     r"\1\2[REDACTED]"),
    # Slack, GitHub (classic, fine-grained, app, OAuth, refresh), GitLab
    (r"\b(?:xox[abeoprs]|gh[pousr]|github_pat|glpat)[-_][A-Za-z0-9_\-]{10,}", "[REDACTED_TOKEN]"),
    (r"(?i)\bbearer\s+[A-Za-z0-9._~+/\-]+=*", "Bearer [REDACTED_TOKEN]"),
    # the value up to a quote, a comma or a brace, or a backslash escaping a quote (quoted inside JSON text)
    (r"(?i)\b(api[_-]?key|x-api-key|authorization)(\\?[\"']?\s*[:=]\s*\\?[\"']?)(?:[^\s\"'\\,}]|\\(?![\"']))+",
     r"\1\2[REDACTED]"),
    # a URL's password (redis://:secret@host, postgresql://user:secret@host: up to the last @, which a
    # password may hold), or given as a parameter (?password=secret), before the e-mail rule
    (r"(?i)\b([a-z][a-z0-9+.\-]*://[^\s:/@]*):\S*@", r"\1:[REDACTED]@"),
    (r"(?i)([?&](?:password|passwd|pass|pwd)=)[^&\s]+", r"\1[REDACTED]"),
    (r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}", "[REDACTED_EMAIL]"),
)


@dataclass(frozen=True)
class Redactor:
    """Applies the default rules (API keys and tokens of OpenAI, Anthropic, Google, AWS, GitHub,
    GitLab and Slack, bearer tokens, a URL's password, e-mail addresses) and the user's own."""

    extra: tuple[tuple[str, str], ...] = ()
    _compiled: tuple[tuple[re.Pattern[str], str], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        rules: Iterable[tuple[str, str]] = (*DEFAULT_RULES, *self.extra)
        object.__setattr__(self, "_compiled", tuple((re.compile(p), r) for p, r in rules))

    def __call__(self, text: str) -> str:
        for pattern, replacement in self._compiled:
            text = pattern.sub(replacement, text)
        return text


DEFAULT_REDACTOR = Redactor()
