"""``RouterLogger``: the pipeline inside litellm's own callbacks (``litellm.callbacks = [RouterLogger()]``).

Behind the LiteLLM proxy (``async_pre_call_hook``) each request drives the pipeline's call
lifecycle (:mod:`.lifecycle`), like ``Pipeline.acompletion`` does, except that the proxy's router
makes the attempts: the hook plans the call (routing to any ``model_name`` of the proxy, context,
reasoning, budgets, quotas) and tells the router the alias's remaining targets as the request's
``fallbacks``; each failure event is thrown into the lifecycle (failure counts, cooldowns, the next
attempt's admission); the success event settles the call (one whose client left mid-stream, as a
stream closed early). A call that fell over is one ledger row and one route span with an attempt
span per target. Anthropic ``/v1/messages`` and OpenAI ``/v1/responses`` requests (Claude Code,
Codex) are sent as they came, through the same lifecycle with the plan the hook makes of them (no
policy rewrites them): quotas and budgets admitted before they are sent, their failures counted
toward their target's cooldown, their events settling them (:meth:`._ProxyHooks._admit_as_sent`).

In the SDK, litellm lets one hook rewrite a request, ``async_pre_call_deployment_hook``, and calls
it on the async path only (``litellm.acompletion``), after it has chosen the provider. There the
hook drives the same lifecycle with a single attempt (litellm retries on its own): context and
reasoning policies, routing among the targets served by the provider litellm chose (the others are
skipped, the decision saying so, and so are deployments with an endpoint or key of their own), quotas,
and budgets, so a call over a budget is refused with
``BudgetExceeded`` before it is sent (unless litellm would retry it without its hooks, or it is a
``litellm.Router``'s, whose router would cool its deployments down: then it is counted, not
refused); the success or failure event settles it. With ``fallbacks=`` (models, not names of the
config's aliases or deployments) litellm makes one nested attempt per model, each through the hook: the
lifecycle follows them in litellm's order, plans each model's request on its own, counts each
failure its event or litellm's deployment failure hook names toward its model's cooldown, and
records the call as one ledger row (a call whose last fallback failed too ends as litellm raises,
with that fallback's error; where no hook named an attempt's error, it is a :class:`FellBack`, and a
call litellm lets go of unended is :class:`FallbacksEnded`).
``litellm.aresponses``, whose call litellm hooks the same way, is admitted as the proxy admits a
``/v1/responses`` request: sent as it came, its quotas and budgets first
(:meth:`RouterLogger._start_sdk_as_sent`). If planning fails otherwise, the request goes as sent and
a warning is logged. The events record usage, cost, spans, metrics and ledger rows for every call,
sync or async (a sync call, which skips the hook, is counted toward its budgets after it is made; a
sync stream its caller stops reading, which gets no event, once litellm frees it:
:meth:`._SyncStreams._watch_sync`; one its provider broke after its chunks began, then too, or
:data:`.sync_streams._BROKEN_WAIT_S` after its failure event, or at the interpreter's exit).
The logger counts what it did (``hook_calls``, ``recorded``) for tests and health checks. Use
``register()`` / ``unregister()`` rather than editing ``litellm.callbacks`` by hand.

The modules: :mod:`.logger` (``RouterLogger``: registering it, every hook and event litellm calls, the
SDK's deployment hook), :mod:`.proxy` (the steps behind the proxy's hooks), :mod:`.sync_streams` (the
watch of sync streams; its ``_BROKEN_WAIT_S`` is read there, so a test sets it there),
:mod:`.handoff` (the finalizers' thread), :mod:`.core` (what those share: the calls in flight and their
lifecycles), :mod:`.calls` (a call in flight, an event's answer) and :mod:`.request` (what a request
says).
"""

from ..errors import StreamLeft
from .calls import ClientDisconnected, FallbacksEnded, FellBack, MovedOn
from .logger import RouterLogger
from .request import as_sent_view as as_sent_view
from .request import run_labels
from .sync_streams import _WATCH_KEY as _WATCH_KEY

__all__ = ["ClientDisconnected", "FallbacksEnded", "FellBack", "MovedOn", "RouterLogger", "StreamLeft", "run_labels"]
