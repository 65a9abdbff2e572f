"""Context strategies: edge cases, stability between cuts, protocol integrity, summaries, cache hints."""

from __future__ import annotations

import json
import random

import pytest

from router_middleware import AgentContext, Call, Pipeline, Plan, PolicyState, outcome
from router_middleware.config import ContextConfig
from router_middleware.context import (
    CacheBreakpoints,
    ClearToolOutputs,
    ContextPolicy,
    MiddleOut,
    Window,
    chunk_tokens,
)
from router_middleware.context.structure import blocks, head_length, last_instruction
from router_middleware.messages import integrity_violations
from router_middleware.replay import load_session

from .conftest import cline_request

STATE = PolicyState()
SYSTEM = {"role": "system", "content": "You are a coding agent."}
TASK = {"role": "user", "content": "Fix the bug in src/app/models.py"}


def tool_turn(i: int, size: int = 400, parallel: int = 1) -> list[dict]:
    calls = [{"id": f"c{i}_{j}", "type": "function",
              "function": {"name": "bash", "arguments": json.dumps({"command": f"cat src/mod{i}_{j}.py"})}}
             for j in range(parallel)]
    results = [{"role": "tool", "tool_call_id": c["id"], "content": f"src/mod{i}.py line\n" * size} for c in calls]
    return [{"role": "assistant", "content": f"step {i}", "tool_calls": calls}, *results]


def agent_history(turns: int, size: int = 400, parallel: int = 1) -> list[dict]:
    history = [SYSTEM, TASK]
    for i in range(turns):
        history += tool_turn(i, size, parallel)
    return history


def plan_for(messages, model="deepseek/deepseek-chat", step=None, **params) -> Plan:
    return Plan.from_call(Call.create(model, messages, params, AgentContext(session_id="t", step=step)))


@pytest.mark.parametrize("policy", [
    ClearToolOutputs(keep_last=1, chunk=1), Window(budget_tokens=500, max_payback_calls=None),
    MiddleOut(budget_tokens=500), MiddleOut(max_messages=3), CacheBreakpoints(), ContextPolicy(),
])
@pytest.mark.parametrize("messages", [[], [SYSTEM], [SYSTEM, TASK]], ids=["empty", "system", "task"])
def test_trivial_histories_pass_unchanged(policy, messages) -> None:
    plan = plan_for(messages)
    assert policy(plan, STATE).messages == plan.messages


def with_reminders(history: list[dict], role: str) -> list[dict]:
    """``history`` with a ``role`` message (system or developer: neither answers nor closes a tool
    turn) right after each assistant tool turn, before its results, as some agents send reminders."""
    out: list[dict] = []
    for message in history:
        out.append(message)
        if message.get("tool_calls"):
            out.append({"role": role, "content": "Reminder: run the tests before you finish."})
    return out


@pytest.mark.parametrize("reminders", [None, "developer", "system"])
@pytest.mark.parametrize("parallel", [1, 3])
@pytest.mark.parametrize("policy", [
    ClearToolOutputs(keep_last=2, chunk=1), ClearToolOutputs(keep_last=0, chunk=5000, clear_inputs=True),
    Window(budget_tokens=3000, max_payback_calls=None), Window(watermark_tokens=2500, max_payback_calls=None),
    MiddleOut(budget_tokens=3000), MiddleOut(max_messages=9),
], ids=lambda p: type(p).__name__)
def test_strategies_never_break_tool_pairs(policy, parallel, reminders) -> None:
    """Also with a system or developer message between a tool turn and its results (the validator
    takes it): the window and middle-out dropped such a turn's results apart from it."""
    history = agent_history(12, size=60, parallel=parallel)
    if reminders:
        history = with_reminders(history, reminders)
    for end in range(3, len(history) + 1):
        if history[end - 1]["role"] == "assistant" or history[end - 2].get("tool_calls"):
            continue  # a request ends after the tool results, never between a call and them
        planned = policy(plan_for(history[:end]), STATE).messages
        assert integrity_violations(planned) == [], (type(policy).__name__, end)
        assert planned[:2] == tuple(history[:2])  # system and task always kept


def test_single_huge_tool_output_is_cleared_but_recent_one_kept() -> None:
    history = [SYSTEM, TASK, *tool_turn(0, size=20000), *tool_turn(1, size=10)]
    planned = ClearToolOutputs(keep_last=1, chunk=1000)(plan_for(history), STATE)
    assert planned.messages[3]["content"].startswith("[output cleared to save context")
    assert "src/mod0.py" in planned.messages[3]["content"]  # the placeholder keeps the paths it named
    assert planned.messages[-1] == history[-1]
    decision = planned.decisions[-1]
    assert decision.action == "clear" and decision.attributes["cleared_messages"] == 1


@pytest.mark.parametrize("keep_last", [0, 2])
def test_the_current_step_s_results_are_never_cleared(keep_last: int) -> None:
    """The results after the last assistant turn are what the model is about to read: ``keep_last=0``
    (or a step of more parallel calls than ``keep_last``) cleared them before."""
    history = [SYSTEM, TASK, *tool_turn(0, size=2000), *tool_turn(1, size=2000, parallel=4)]
    planned = ClearToolOutputs(keep_last=keep_last, chunk=1)(plan_for(history), STATE).messages
    assert planned[3]["content"].startswith("[output cleared")  # the earlier step's result
    assert planned[5:] == tuple(history[5:])  # the current step's four results, as they were


def test_clearing_moves_in_whole_chunks_so_the_prefix_is_stable() -> None:
    policy = ClearToolOutputs(keep_last=2, chunk=3000)
    history = agent_history(30, size=50)
    previous_cleared = 0
    changes = 0
    for end in range(4, len(history) + 1, 2):
        planned = policy(plan_for(history[:end]), STATE).messages
        cleared = sum(1 for m in planned if str(m.get("content", "")).startswith("[output cleared"))
        assert cleared >= previous_cleared
        changes += cleared != previous_cleared
        previous_cleared = cleared
    assert 0 < changes < 8  # a handful of chunked clearings, not one per step


def test_exclude_tools_and_clear_inputs() -> None:
    history = agent_history(6, size=100)
    history[2]["tool_calls"][0]["function"]["name"] = "read_memory"
    planned = ClearToolOutputs(keep_last=1, chunk=1, exclude_tools=frozenset({"read_memory"}),
                               clear_inputs=True)(plan_for(history), STATE).messages
    assert planned[3] == history[3]  # excluded tool keeps its output
    assert planned[5]["content"].startswith("[output cleared")
    assert planned[4]["tool_calls"][0]["function"]["arguments"] == "{}"


def test_list_content_is_counted_and_cleared() -> None:
    history = [SYSTEM, TASK, *tool_turn(0), *tool_turn(1)]
    history[3] = {**history[3], "content": [{"type": "text", "text": "src/a/b.py\n" * 800}]}
    planned = ClearToolOutputs(keep_last=1, chunk=1)(plan_for(history), STATE).messages
    assert "src/a/b.py" in planned[3]["content"] and planned[3]["content"].startswith("[output cleared")


def test_window_keeps_prefix_stable_between_cuts_and_respects_the_budget() -> None:
    policy = Window(budget_tokens=4000, max_payback_calls=None)
    history = [SYSTEM, TASK]
    for i in range(200):
        history += [{"role": "assistant", "content": f"Turn {i}: Vax and Keyleth walk to Whitestone. " * 8},
                    {"role": "user", "content": f"GROG: I follow Percy, turn {i}. " * 4}]
    counter = STATE.counter("deepseek/deepseek-chat")
    previous = None
    cuts = 0
    for end in range(4, len(history) + 1, 2):
        planned = policy(plan_for(history[:end]), STATE)
        assert counter.messages(planned.messages) <= 4000
        if planned.messages[2] is not (previous.messages[2] if previous and len(previous.messages) > 2 else None):
            digest_now = planned.messages[2].get("content") if len(planned.messages) > 2 else None
            digest_before = previous.messages[2].get("content") if previous and len(previous.messages) > 2 else None
            cuts += digest_now != digest_before
        previous = planned
    assert 3 <= cuts <= 40
    last = previous.messages
    assert last[2]["content"].startswith("[") and "Whitestone" in last[2]["content"]  # the digest keeps names
    assert last[3]["role"] == "user"  # chats resume on a user turn


def test_window_skips_a_cut_that_would_not_pay_back() -> None:
    history = agent_history(30, size=40)
    planned = Window(watermark_tokens=2000, keep=0.9, max_payback_calls=0.5)(plan_for(history), STATE)
    assert planned.messages == tuple(history)
    assert planned.decisions[-1].action == "keep" and "pay back" in planned.decisions[-1].reason
    no_cache = PolicyState(provider_cache=False)
    assert Window(watermark_tokens=2000, keep=0.9, max_payback_calls=0.5)(plan_for(history), no_cache).messages \
        != tuple(history)


def test_middle_out_keeps_both_ends() -> None:
    history = agent_history(20, size=10)
    planned = MiddleOut(max_messages=10)(plan_for(history), STATE).messages
    assert len(planned) <= 10 and planned[:2] == tuple(history[:2]) and planned[-1] == history[-1]
    assert integrity_violations(planned) == []


@pytest.mark.parametrize("ratio", [0.7, 1.0, 1.5])
def test_middle_out_fits_the_calibrated_budget(ratio: float) -> None:
    """With a session's calibration (the provider counts ``ratio`` x what we count, plus an offset),
    what middle-out keeps fits the budget in the same calibrated tokens it was asked to fit, and keeps
    the most it can: the head and every block are weighed in one unit."""
    from router_middleware.tokens import Calibration

    calibration = Calibration()
    for counted in (1000, 2000, 4000):
        calibration.observe(counted, int(counted * ratio) + 50)
    state = PolicyState(calibration={"t": calibration})
    history = agent_history(30, size=60)
    plan = plan_for(history)
    budget = 6000
    assert state.tokens(plan.model, plan.messages, None, "t") > budget
    planned = MiddleOut(budget_tokens=budget)(plan, state)
    assert state.tokens(plan.model, planned.messages, None, "t") <= budget
    profile = state.profile(plan.model, plan.messages)
    largest = max(profile.totals[e] - profile.totals[b] for b, e in blocks(plan.messages, 2, profile))
    roomier = MiddleOut(budget_tokens=budget + int(largest * ratio) + 1)(plan, state)  # room for one more block
    assert len(roomier.messages) > len(planned.messages)


@pytest.mark.parametrize("strategy", ["window", "middle-out"])
def test_budget_tokens_is_a_hard_cap_in_the_providers_tokens(strategy: str) -> None:
    """README: ``budget_tokens`` caps every request. It holds in the provider's count (the session's
    calibration), whatever clearing and the window did first."""
    from router_middleware.config import ContextConfig
    from router_middleware.tokens import Calibration

    calibration = Calibration()
    for counted in (1000, 3000, 9000):
        calibration.observe(counted, int(counted * 1.4) + 80)
    state = PolicyState(calibration={"t": calibration})
    plan = plan_for(agent_history(40, size=80))
    for budget in (5000, 9000, 14000):
        planned = ContextPolicy(ContextConfig(strategy=strategy, budget_tokens=budget))(plan, state)
        assert state.tokens(plan.model, planned.messages, None, "t") <= budget, budget
        assert integrity_violations(planned.messages) == []


def test_a_budget_the_head_and_last_turn_alone_exceed_is_said_not_claimed_met() -> None:
    """They are never dropped: the decision gives the size that stays, and only the limits set."""
    history = agent_history(6, size=40)
    history[-1] = {**history[-1], "content": "x " * 20000}  # the last tool result alone is far over
    planned = MiddleOut(budget_tokens=3000)(plan_for(history), STATE)
    (decision,) = planned.decisions
    assert decision.action == "trim" and "to fit 3000 tokens; still over: the head and the last turn alone are ~" \
        in decision.reason and "None" not in decision.reason
    alone = MiddleOut(budget_tokens=3000)(plan_for([*history[:2], *history[-2:]]), STATE)
    assert [d.action for d in alone.decisions] == ["over-budget"] and "nothing to drop" in alone.decisions[0].reason


def test_hard_guard_fits_the_model_window() -> None:
    history = agent_history(40, size=3000)  # ~ 400k tokens, far over deepseek's 131k window
    planned = ContextPolicy()(plan_for(history), STATE)
    assert STATE.counter("deepseek/deepseek-chat").messages(planned.messages) <= 131072 - 8192
    assert integrity_violations(planned.messages) == []


def test_a_watermark_over_the_model_s_window_cuts_to_the_window() -> None:
    """The default 16,000-token watermark on a model of a 7,000-token window: the window cuts below the
    model's window, and says nothing about a request it did not leave over it (it recorded a false
    ``over-window`` "the provider will likely refuse", then fit-window trimmed again)."""
    pipeline = Pipeline.from_config({"models": {"gpt-4o-mini": {"max_input_tokens": 8000, "max_output_tokens": 1000}}})
    history = agent_history(150, size=60)
    planned = pipeline.plan(pipeline.make_call("gpt-4o-mini", history, {}, {}))
    assert [f"{d.policy}:{d.action}" for d in planned.decisions] == ["window:trim"]
    assert "the 7000-token watermark (the model input window" in planned.decisions[0].reason
    assert pipeline.state.tokens("gpt-4o-mini", planned.messages, None, None) <= 7000
    assert integrity_violations(planned.messages) == []
    # the cut is the model's, not each request's: another max_tokens keeps the same prefix (the cache hits)
    for max_tokens in (600, 1000):
        again = pipeline.plan(pipeline.make_call("gpt-4o-mini", history, {}, {"max_tokens": max_tokens}))
        assert again.messages == planned.messages


def test_thinking_blocks_of_the_last_turn_are_kept() -> None:
    thinking = {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "Let me look at src/x.py", "signature": "sig=="},
        {"type": "text", "text": "Reading it."}],
        "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "bash", "arguments": "{}"}}]}
    history = [*agent_history(20, size=100), thinking, {"role": "tool", "tool_call_id": "t1", "content": "ok"}]
    for policy in (Window(budget_tokens=2500, max_payback_calls=None), MiddleOut(budget_tokens=2500),
                   CacheBreakpoints()):
        planned = policy(plan_for(history, model="anthropic/claude-sonnet-4-5"), STATE).messages
        assert thinking in planned  # untouched, signature included


def test_chunk_sizing_follows_cache_prices() -> None:
    catalog = STATE.catalog
    deepseek = chunk_tokens(catalog.resolve("deepseek/deepseek-chat"), tail_tokens=4000, payback_calls=3)
    assert deepseek == round(4000 * (2.8e-7 - 2.8e-8) / (2.8e-8 * 3))
    assert chunk_tokens(catalog.resolve("gpt-3.5-turbo"), tail_tokens=4000, payback_calls=3) == 1  # no discount
    assert chunk_tokens(catalog.resolve("deepseek/deepseek-chat"), tail_tokens=4000, payback_calls=3,
                        provider_cache=False) == 1


def test_per_model_overrides() -> None:
    pipeline = Pipeline.from_config({"context": {"watermark_tokens": 50000,
                                                 "models": {"anthropic/*": {"watermark_tokens": 1000}}}})
    (policy,) = [p for p in pipeline.policies if p.name == "context"]
    assert policy.settings_for("anthropic/claude-sonnet-4-5").watermark_tokens == 1000
    assert policy.settings_for("anthropic/claude-sonnet-4-5").keep_tool_outputs == 4  # inherited
    assert policy.settings_for("deepseek/deepseek-chat").watermark_tokens == 50000


def test_real_session_random_budgets_keep_integrity(agent_session_paths) -> None:
    rng = random.Random(7)
    session = load_session(agent_session_paths[0])
    for call in session.calls[::3]:
        request = session.messages[: call.prefix_len]
        for policy in (Window(budget_tokens=rng.randint(2000, 9000), max_payback_calls=None),
                       MiddleOut(budget_tokens=rng.randint(2000, 9000)),
                       ClearToolOutputs(keep_last=rng.randint(0, 5), chunk=rng.randint(1, 5000))):
            assert integrity_violations(policy(plan_for(request), STATE).messages) == []


INSTRUCTION = {"role": "user", "content": "NEW INSTRUCTION: also update the docs in docs/index.md"}


def _cline_turn(i: int) -> list[dict]:
    """A turn of Cline's XML tools: its tool result comes back as a user message."""
    return [{"role": "assistant", "content": f"<read_file>\n<path>src/mod{i}.py</path>\n</read_file>"},
            {"role": "user", "content": [{"type": "text", "text": f"[read_file for 'src/mod{i}.py'] Result:"},
                                         {"type": "text", "text": f"src/mod{i}.py line\n" * 60}]}]


def _mini_turn(i: int) -> list[dict]:
    """A turn of mini-swe-agent: its observation comes back as a user message."""
    return [{"role": "assistant", "content": f"THOUGHT: look\n```bash\ncat src/mod{i}.py\n```"},
            {"role": "user", "content": "<returncode>0</returncode>\n<output>\n" + f"src/mod{i}.py line\n" * 60
             + "</output>"}]


NAG = {"role": "user", "content": "[ERROR] You did not use a tool in your previous response! Please retry."}
CLINE_ANSWER = {"role": "user", "content": [
    {"type": "text", "text": "[ask_followup_question for 'Anything else?'] Result:"},
    {"type": "text", "text": "<answer>\nNEW INSTRUCTION: also update the docs in docs/index.md\n</answer>"}]}
SHAPES = {  # an agent's turns, and the message that holds the user's changed task
    "tool calls": (lambda i: tool_turn(i, size=60), INSTRUCTION),
    "tool calls, then a nag": (lambda i: [*tool_turn(i, size=60), *([NAG] if i == 40 else [])], INSTRUCTION),
    "cline, xml tools": (_cline_turn, CLINE_ANSWER),
    "mini-swe-agent": (_mini_turn, INSTRUCTION),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_the_user_s_latest_words_outlive_a_cut_of_the_turns_after_them(shape: str) -> None:
    """The task changed midway ("also update the docs") and the agent worked on for many turns: a
    window that drops the span holding those words keeps them whole after its digest (which leaves
    them out) where they fit, else in its digest; middle-out never drops them, as it never drops the
    last turn (a limit they alone put the request over is said, not met by dropping the task: before,
    a message-count limit took them and the model was sent no task). What an agent sends as the user
    itself (a tool result, an observation, a nag) is not the user's words, unless it holds them
    (Cline's answer to a follow-up question)."""
    turn, said = SHAPES[shape]
    history = [SYSTEM, TASK]
    for i in range(60):
        history += [*turn(i), *([said] if i == 29 else [])]
    window = Window(watermark_tokens=2500, max_payback_calls=None)(plan_for(history), STATE)
    assert window.messages[3] == said and integrity_violations(window.messages) == []
    assert "the user's latest words in them" not in window.messages[2]["content"]
    assert "kept the user's latest words from them, whole" in window.decisions[0].reason
    tiny = Window(watermark_tokens=2500, budget_tokens=2500, max_payback_calls=None)(
        plan_for([*history[:-1], {**history[-1], "content": "x " * 2300}]), STATE)  # no room for them
    assert said not in tiny.messages
    assert "NEW INSTRUCTION: also update the docs in docs/index.md" in tiny.messages[2]["content"]
    middle = MiddleOut(budget_tokens=3000)(plan_for(history), STATE)
    assert said in middle.messages and integrity_violations(middle.messages) == []
    assert len(middle.messages) < len(history) / 2  # the middle dropped around them
    last = 2 if shape.startswith("tool calls") else 1  # the last block: a call and its result, or one message
    tight = MiddleOut(max_messages=2 + last)(plan_for(history), STATE)  # room for the head and the last block only
    assert list(tight.messages) == [*history[:2], said, *history[-last:]]
    assert "still over: the head, the user's latest words and the last turn alone are" in tight.decisions[0].reason


def test_a_chat_s_current_turn_of_several_user_messages_is_never_cut() -> None:
    """A chat's latest turn is a pasted file, then the question about it: the window cut whole blocks
    up to a level, and dropped the paste (the last block held the question alone), sending ~200
    characters against a 16k watermark; middle-out dropped it too. The user messages the history ends
    with are kept whole by both."""
    code = "def compute_totals(rows):\n" + "\n".join(f"    total_{i} = sum(r['col_{i}'] for r in rows)  # column {i}"
                                                   for i in range(400))
    history = [{"role": "system", "content": "You are a helpful assistant."}]
    for i in range(52):
        history += [{"role": "user", "content": f"Tell me fact number {i} about the Roman empire, please, in detail."},
                    {"role": "assistant", "content": f"Fact {i}: " + "The Romans built roads and aqueducts across "
                                                                     "Europe. " * 25}]
    turn = [{"role": "user", "content": f"Here is my code:\n```python\n{code}\n```"},
            {"role": "user", "content": "Why is it so slow?"}]
    history += turn
    plan = plan_for(history, model="gpt-4o-mini")
    window = Window(watermark_tokens=16000, max_payback_calls=None)(plan, STATE)
    assert [d.action for d in window.decisions] == ["trim"] and list(window.messages[-2:]) == turn
    middle = MiddleOut(budget_tokens=12000)(plan, STATE)  # room for the turn: the earlier turns go first
    assert list(middle.messages[-2:]) == turn and integrity_violations(middle.messages) == []
    tight = MiddleOut(budget_tokens=4000)(plan, STATE)  # a hard cap the paste alone is over: it goes last
    assert list(tight.messages) == [*history[:2], turn[-1]]


@pytest.mark.parametrize("said", [
    "Please always provide EXACTLY ONE action in triple backticks, found 3 actions.",  # mini-swe-agent's notes
    "The last command <command>sleep 99</command> timed out and has been killed.",
    [{"type": "text", "text": "<returncode>0</returncode>\n<output>ok</output>"}],  # an observation as parts
    [{"type": "text", "text": "[execute_command for 'grep -n \"a[0]\" x.py'] Result:"}, {"type": "text", "text": "1"}],
], ids=["format note", "timeout note", "observation as parts", "cline result with a ]"])
def test_what_an_agent_says_in_the_user_s_role_is_not_the_user_s_latest_words(said) -> None:
    history = [SYSTEM, TASK, {"role": "assistant", "content": "ok"}, INSTRUCTION, {"role": "assistant", "content": "x"},
               {"role": "user", "content": said}]
    assert last_instruction(history, 2) == 3


MODE = {"role": "system", "content": "From now on you are in read-only plan mode: never edit files."}


@pytest.mark.parametrize("role", ["system", "developer"])
@pytest.mark.parametrize("policy", [Window(budget_tokens=3000, max_payback_calls=None),
                                    Window(budget_tokens=3000, max_payback_calls=None, digest=False),
                                    MiddleOut(budget_tokens=3000)], ids=["window", "window-no-digest", "middle-out"])
def test_an_instruction_given_mid_session_outlives_a_cut(policy, role) -> None:
    """A system or developer message sent between turns (a mode switch) still applies after the turns
    around it are dropped: the window keeps it after its filler, middle-out drops other turns first."""
    history = agent_history(16, size=60)
    history.insert(12, {**MODE, "role": role})  # between turns 5 and 6: in the part a cut drops
    planned = policy(plan_for(history), STATE)
    sent = list(planned.messages)
    assert len(sent) < len(history) and planned.decisions[-1].action == "trim"
    assert sent.count({**MODE, "role": role}) == 1
    assert integrity_violations(sent) == []
    assert sent[:2] == history[:2] and sent[-2:] == history[-2:]
    if isinstance(policy, Window):
        assert "kept 1 system or developer messages" in planned.decisions[-1].reason
        at = sent.index({**MODE, "role": role})
        assert sent[at + 1:] == history[-len(sent[at + 1:]):]  # right before the kept turns, in order


def test_a_cut_keeps_each_dropped_reminder_once() -> None:
    """An agent's reminder repeated in every dropped turn (inside the turn, before its results) is kept
    once, where it was said last; its copies in the kept turns stay where they are."""
    history = with_reminders(agent_history(16, size=60), "developer")
    planned = Window(budget_tokens=3000, max_payback_calls=None)(plan_for(history), STATE)
    sent = list(planned.messages)
    reminder = {"role": "developer", "content": "Reminder: run the tests before you finish."}
    tail = next(i for i in range(len(sent)) if sent[i:] == history[len(history) - len(sent) + i:])
    assert sent[tail - 1] == reminder and reminder not in sent[:tail - 1]  # one for every dropped turn
    assert sent[tail:].count(reminder) == sum(1 for m in sent[tail:] if m.get("tool_calls"))
    assert integrity_violations(sent) == []


@pytest.mark.parametrize("turns", [20, 60, 120])
def test_kept_instructions_stay_within_their_share_of_the_budget(turns) -> None:
    """An agent's per-step developer notes, each text its own: the review found every one of them kept,
    in the part of the request nothing drops, growing with the session past the budget and the
    model's window (16,852 tokens sent at 240 turns for a 3,000-token budget). The latest are kept,
    within ``digest_share`` of the budget."""
    history = [SYSTEM, TASK]
    for i in range(turns):
        history += [*tool_turn(i, size=60), {"role": "developer", "content": f"Note {i}: {i} steps done, keep going."}]
    policy = ContextPolicy(ContextConfig(budget_tokens=3000, max_payback_calls=None))
    planned = policy(plan_for(history), STATE)
    notes = [m for m in planned.messages if m.get("role") == "developer"]
    assert STATE.tokens(planned.model, planned.messages) <= 3000
    assert [d.action for d in planned.decisions] == ["trim"]
    assert notes and notes[-1] == history[-1]  # the last note, in the kept turns
    kept = [m for m in notes if m not in history[-len(planned.messages):]]  # from the dropped span
    assert 0 < sum(STATE.message_tokens(planned.model, m) for m in kept) <= 300
    assert kept == [m for m in history if m in kept]  # in order, the latest of the dropped span


def test_middle_out_drops_the_user_s_latest_words_after_a_standing_instruction() -> None:
    """A system message between turns goes late, the user's latest words last: the review found the
    two ranked alike, and the latest words dropped first when the middle fell on them."""
    mode = {**MODE, "content": MODE["content"] + " Keep answers short." * 60}
    latest = {**INSTRUCTION, "content": INSTRUCTION["content"] + " Details follow." * 60}
    history = [SYSTEM, TASK, *tool_turn(0, size=60), mode, *tool_turn(1, size=60), latest,
               *tool_turn(2, size=60), *tool_turn(3, size=60)]
    for budget in (800, 700):
        sent = MiddleOut(budget_tokens=budget)(plan_for(history), STATE).messages
        assert latest in sent and mode not in sent, budget


def test_blocks_group_calls_with_their_results() -> None:
    history = agent_history(2, parallel=2)
    assert head_length(history) == 2
    assert blocks(history, 2) == [(2, 5), (5, 8)]
    reminded = with_reminders(history, "developer")  # a reminder before the results: in the block
    assert blocks(reminded, 2) == [(2, 6), (6, 10)]
    after = [*history, {"role": "developer", "content": "all answered"}]  # after them: a block of its own
    assert blocks(after, 2) == [(2, 5), (5, 8), (8, 9)]


def test_summary_is_written_once_and_reused(monkeypatch) -> None:
    import litellm

    pipeline = Pipeline.from_config({"context": {"watermark_tokens": 1500, "max_payback_calls": None,
                                                 "summarize": True,
                                                 "summary_params": {"mock_response": "They read src/mod0.py."}}})
    calls = []
    real = litellm.completion

    def spy(**kwargs):
        calls.append(kwargs["model"])
        return real(**kwargs)

    monkeypatch.setattr(litellm, "completion", spy)
    history = agent_history(12, size=40)
    first = pipeline.completion(model="deepseek/deepseek-chat", messages=history, mock_response="ok",
                                context={"session_id": "s"})
    second = pipeline.completion(model="deepseek/deepseek-chat",
                                 messages=[*history, {"role": "assistant", "content": "next"},
                                           {"role": "user", "content": "go on"}],
                                 mock_response="ok", context={"session_id": "s"})
    assert calls.count("gpt-4o-mini") == 1  # one summary for the span, reused by the second call
    for response in (first, second):
        sent = outcome(response).plan.messages
        assert any("They read src/mod0.py." in str(m.get("content")) for m in sent)
        assert integrity_violations(sent) == []


@pytest.mark.parametrize("output", [None, 16_000])
def test_a_span_over_the_summary_model_s_window_is_summarized_without_its_middle(monkeypatch, output) -> None:
    """A span bigger than the summary model's window was sent whole: refused by the provider (after a
    wait of seconds with 3 MB), and the call fell back to the digest. The room left for the summary's
    output is its ``summary_params.max_tokens`` where set (before the fifty-seventh session, always
    600: a 16,000-token cap left the request over the window)."""
    import litellm

    from router_middleware.tokens import encoder_for

    own = {"max_tokens": output} if output else {}
    pipeline = Pipeline.from_config({"context": {"watermark_tokens": 8000, "max_payback_calls": None,
                                                 "summarize": True, "summary_model": "gpt-4o-mini",
                                                 "summary_params": {"mock_response": "They read 20 files.", **own}}})
    sent: list[dict] = []
    real = litellm.completion

    def spy(**kwargs):
        if kwargs["model"] == "gpt-4o-mini":
            sent.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(litellm, "completion", spy)
    history = agent_history(20, size=3000)  # ~360k tokens, gpt-4o-mini reads 128k
    response = pipeline.completion(model="deepseek/deepseek-chat", messages=history, mock_response="ok")
    [summary] = sent
    text = summary["messages"][1]["content"]
    assert "characters left out here" in text and "src/mod0.py" in text and "src/mod18.py" in text
    assert summary["max_tokens"] == (output or 600)
    assert encoder_for("gpt-4o-mini")(text) + summary["max_tokens"] < 128_000
    assert any("They read 20 files." in str(m.get("content")) for m in outcome(response).plan.messages)


@pytest.mark.parametrize("output", [8_000, 8_192])
def test_a_summary_whose_output_cap_fills_the_window_still_sends_half_the_window_of_its_span(output) -> None:
    """``summary_params.max_tokens`` at or near the summary model's window left no room: the span was
    cut to nothing and the model asked to summarise an empty transcript (review57b). Half the window
    is kept for the span (the provider may refuse the request: the digest serves then)."""
    from router_middleware.context.summarize import summary_request
    from router_middleware.tokens import encoder_for
    from router_middleware.types import SummaryJob

    count = encoder_for("gpt-4o-mini")
    job = SummaryJob("k", tuple({"role": "user", "content": f"step {i}: edited src/f{i}.py, tests pass " * 20}
                                for i in range(40)))
    sent = summary_request(job, "ollama/qwen2.5-coder:7b", {"max_tokens": output}, window=8_192, count=count)
    assert 2_000 < count(sent["messages"][1]["content"]) <= 4_096


def test_failed_summary_falls_back_to_digest() -> None:
    pipeline = Pipeline.from_config({"context": {"watermark_tokens": 1500, "max_payback_calls": None,
                                                 "summarize": True, "summary_model": "no-such-provider/x"}})
    response = pipeline.completion(model="deepseek/deepseek-chat", messages=agent_history(12, size=40),
                                   mock_response="ok")
    assert response.choices[0].message.content == "ok"
    assert any(str(m.get("content", "")).startswith("[") for m in outcome(response).plan.messages[2:3])


@pytest.mark.parametrize(("summary_timeout", "call_timeout", "bound"), [(1.0, None, 1.0), (30.0, 1.0, 1.0)])
def test_a_summary_model_that_hangs_holds_the_call_up_once_for_its_timeout_at_most(
        summary_timeout, call_timeout, bound) -> None:
    """A summary model that takes the connection and never answers: a trial's call waited for ever
    (no timeout), or three times ``summary_params.timeout`` (litellm's retries), and ignored the call's
    own ``timeout``. Now the summary is tried once, for the shorter of the two, and the digest is sent."""
    import contextlib
    import socket
    import threading
    import time

    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        accepted: list[socket.socket] = []

        def take() -> None:  # the connections, never answered
            with contextlib.suppress(OSError):  # the socket closed at the end
                while True:
                    accepted.append(hung.accept()[0])

        threading.Thread(target=take, daemon=True).start()
        pipeline = Pipeline.from_config({"context": {
            "watermark_tokens": 1500, "max_payback_calls": None, "summarize": True,
            "summary_params": {"api_base": f"http://127.0.0.1:{hung.getsockname()[1]}/v1", "api_key": "x",
                               "timeout": summary_timeout}}})
        started = time.perf_counter()
        response = pipeline.completion(model="deepseek/deepseek-chat", messages=agent_history(12, size=40),
                                       mock_response="ok", **({"timeout": call_timeout} if call_timeout else {}))
        waited = time.perf_counter() - started
        for connection in accepted:
            connection.close()
    assert response.choices[0].message.content == "ok"
    assert bound <= waited < bound + 1.5  # one try: three were 3 s and more
    assert len(accepted) == 1


def test_the_protected_head_is_the_clients_whole_opening_request() -> None:
    """Cline sends a standing reminder as its third message: everything before the first assistant
    turn stays, however many messages it is."""
    body = cline_request("yolo_second_after_tool.json")
    opening = body["messages"][:3]
    assert [m["role"] for m in opening] == ["system", "user", "user"]
    assert head_length(body["messages"]) == 3 and head_length(opening) == 3
    steps = []
    for i in range(40):
        steps += [{"role": "assistant", "content": None, "tool_calls": [
            {"id": f"c{i}", "type": "function", "function": {"name": "run_commands", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": f"c{i}", "content": f"step {i}\n" + "1234567\n" * 400}]
    planned = Pipeline.from_config({"context": {"watermark_tokens": 6000}}).plan(
        Call.create("gpt-4o-mini", [*opening, *steps], {}, AgentContext(session_id="s")))
    assert len(planned.messages) < len(opening) + len(steps)
    assert list(planned.messages[:3]) == opening


def test_digests_keep_paths_verbatim_and_the_most_recent_ones() -> None:
    from router_middleware.context.digest import cleared_placeholder, span_digest

    old = [{"role": "tool", "tool_call_id": "c", "content": f"src/pkg/old_{i}.py"} for i in range(50)]
    recent = {"role": "tool", "tool_call_id": "c",
              "content": "edited /home/user/project/notes.txt, .github/workflows/ci.yml and ./setup.cfg"}
    digest = span_digest([*old, recent], chat=False, max_paths=5)
    assert "/home/user/project/notes.txt, .github/workflows/ci.yml, ./setup.cfg" in digest
    assert "src/pkg/old_49.py" in digest and "src/pkg/old_0.py" not in digest and "(+48 earlier)" in digest
    placeholder = cleared_placeholder(recent["content"], tokens=30)
    assert "paths: /home/user/project/notes.txt, .github/workflows/ci.yml, ./setup.cfg]" in placeholder


def test_a_file_named_alone_is_kept_in_a_digest_as_a_path_is() -> None:
    """A coding agent reads and edits its repository's top-level files by their names alone (``cat
    README.md``): only names with a directory were kept, and the placeholder of a cleared output that
    read ``pyproject.toml`` and ``package.json`` named no file at all. A name counts as a file by its
    extension, so that ``os.path``, ``e.g.`` and ``example.com`` do not."""
    from router_middleware.context.digest import cleared_placeholder, span_digest

    output = ("$ cat README.md pyproject.toml\n# demo (e.g. see example.com, os.path.join, v1.2.3)\n"
              "[project]\nname = 'demo'\n$ ls\npackage.json  setup.cfg  src/app/main.py  notes.txt.bak")
    placeholder = cleared_placeholder(output, tokens=40)
    assert placeholder.endswith("paths: README.md, pyproject.toml, package.json, setup.cfg, src/app/main.py]")
    digest = span_digest([{"role": "tool", "tool_call_id": "c", "content": output}], chat=False)
    assert "files mentioned, most recent last: README.md, pyproject.toml, package.json, setup.cfg, src/app/main.py" \
        in digest


def test_a_changed_message_inside_the_dropped_span_gets_a_new_digest() -> None:
    """Digests are kept per dropped span (named by the history's hash chain): resending the span reuses
    its digest, and any change inside it, even one the token count cannot see, writes a new one."""
    policy, state = Window(budget_tokens=3000, max_payback_calls=None), PolicyState()
    history = agent_history(30, size=40)
    first = policy(plan_for(history), state)
    again = policy(plan_for([dict(m) for m in history]), state)  # the same span, other dicts
    assert again.messages[2] is first.messages[2] and "src/mod24_0.py" in first.messages[2]["content"]
    renamed = [dict(m) for m in history]
    at = 2 + 2 * 24  # turn 24's assistant message, inside the dropped span
    renamed[at] = {**renamed[at], "tool_calls": [{**renamed[at]["tool_calls"][0], "function": {
        "name": "bash", "arguments": json.dumps({"command": "cat src/mod24_7.py"})}}]}
    counter = STATE.counter("deepseek/deepseek-chat")
    assert counter.message(renamed[at]) == counter.message(history[at])  # the same token count
    changed = policy(plan_for(renamed), state)
    assert len(changed.messages) == len(first.messages) and changed.messages[2] is not first.messages[2]
    assert "src/mod24_7.py" in changed.messages[2]["content"]


def test_a_plain_chat_s_digest_keeps_its_names_not_the_user_s_older_words() -> None:
    """In a chat (no tools, no agent speaking as the user) the user's latest words are never in the
    dropped span, and quoting older ones crowded names out of the digest: retention on the recorded
    chats fell from 0.9762 to 0.9548. An agent with XML tools keeps them (the test above)."""
    from router_middleware.context.digest import span_digest

    chat = [{"role": "user" if i % 2 == 0 else "assistant",
             "content": f"Tell me about Paris and Lyon, turn {i}, and what Marie Curie did there." * 3}
            for i in range(20)]
    digest = span_digest(chat, chat=True)
    assert "the user's latest words in them" not in digest
    assert "Marie" in digest and "Lyon" in digest
    cline = [{"role": "assistant", "content": "<read_file>\n<path>a.py</path>\n</read_file>"},
             {"role": "user", "content": "[read_file for 'a.py'] Result:\nprint(1)"},
             {"role": "user", "content": "<feedback>\nuse Lyon instead\n</feedback>"}]
    assert "the user's latest words in them: <feedback> use Lyon instead </feedback>" in span_digest(cline, chat=True)


def test_a_big_head_does_not_make_the_window_cut_anew_on_every_call() -> None:
    """With a head of 3/4 of the watermark, the room left for history is a few hundred tokens; the
    cut level still moves in steps of a fifth of the watermark, so most calls reuse the last cut."""
    rules = "\n".join(f"Rule {i}: keep the style of src/module_{i}.py and run its tests." for i in range(330))
    head = [{"role": "system", "content": f"You are a coding agent.\n{rules}"}, TASK]
    counter = STATE.counter("deepseek/deepseek-chat")
    assert 5500 < counter.messages(head) < 6500
    policy = Window(watermark_tokens=8000, budget_tokens=20000, max_payback_calls=None)
    history = agent_history(120, size=20)[2:]
    starts, calls = [], 0
    for end in range(2, len(history) + 1, 2):
        planned = policy(plan_for([*head, *history[:end]]), STATE)
        assert counter.messages(planned.messages) <= 20000
        assert integrity_violations(planned.messages) == []
        if planned.messages != (*head, *history[:end]):
            calls += 1
            starts.append(next(m for m in planned.messages[2:] if m.get("role") == "assistant")["content"])
    assert calls > 80  # nearly every call is over the watermark
    assert len(set(starts)) <= calls // 8  # but the kept history starts at few places


@pytest.mark.parametrize("seed", [13, 25])
def test_a_window_s_wider_steps_never_take_a_request_over_budget_tokens(seed) -> None:
    """Random agent histories (tool rounds, user feedback, reminders) under a big head: the step floor
    for a big head took 5 of 7,235 requests over ``budget_tokens`` (seed 25: 21,593 of 20,800) where the
    plain step kept them under; a cut now takes the wider step only where what it keeps fits."""
    rng = random.Random(seed)
    head = [{"role": "system", "content": "You are a coding agent.\n" + "\n".join(
        f"Rule {i}: keep the style of src/module_{i}.py and run its tests." for i in range(
            rng.choice([10, 200, 500, 800])))}, {"role": "user", "content": "Fix the bug in src/app/models.py"}]
    history: list[dict] = []
    for i in range(rng.randint(40, 90)):
        kind = rng.random()
        if kind < 0.6:
            call = {"id": f"c{i}", "type": "function",
                    "function": {"name": "bash", "arguments": json.dumps({"command": f"cat src/m{i}.py"})}}
            history += [{"role": "assistant", "content": f"step {i}", "tool_calls": [call]},
                        {"role": "tool", "tool_call_id": f"c{i}", "content": f"src/m{i}.py line\n" * rng.randint(5, 300)}]
        elif kind < 0.85:
            history += [{"role": "user", "content": f"<feedback> user words {i}: "
                         + "please do it this way " * rng.randint(1, 400) + "</feedback>"},
                        {"role": "assistant", "content": f"ok {i} " * rng.randint(5, 100)}]
        else:
            history += [{"role": "system", "content": f"Reminder {i}: run tests. " * rng.randint(1, 30)}]
    watermark = rng.choice([4000, 8000, 12000, 16000])
    budget = rng.choice([watermark, int(watermark * 1.3), watermark * 2, watermark * 4, None])
    assert budget is not None and budget > watermark  # the seeds chosen: a hard limit above the watermark
    policy = Window(watermark_tokens=watermark, budget_tokens=budget, max_payback_calls=None)
    counter = STATE.counter("deepseek/deepseek-chat")
    over = [end for end in range(1, len(history) + 1)
            if counter.messages(policy(plan_for([*head, *history[:end]]), STATE).messages) > budget]
    assert over == []


def test_a_short_message_after_the_latest_tool_results_keeps_them() -> None:
    """An agent's history ending with the user's short feedback lost every tool result to the cut (the
    blocks are bigger than the low watermark, and only the last block, the feedback, was kept)."""
    feedback = {"role": "user", "content": "<feedback>use pytest</feedback>"}
    for rounds in (12, 18, 22):
        history = [*agent_history(rounds, size=1200), feedback]
        kept = ContextPolicy()(plan_for(history, model="gpt-4o-mini"), STATE).messages
        assert kept[-1] == feedback and kept[-2] == history[-2]  # the latest tool result
        assert integrity_violations(kept) == []


@pytest.mark.parametrize("budget", [9500, 9000])
def test_a_big_head_s_wider_step_holds_with_a_hard_limit_just_over_the_watermark(budget) -> None:
    """review54b: the wider step was all or nothing, so with budget_tokens a little over the watermark a
    cut fell back to the few-hundred-token step (26 and 36 cut points over 120 calls, against 11 and 13)."""
    rules = "\n".join(f"Rule {i}: keep the style of src/module_{i}.py and run its tests." for i in range(330))
    head = [{"role": "system", "content": f"You are a coding agent.\n{rules}"}, TASK]
    policy = Window(watermark_tokens=8000, budget_tokens=budget, max_payback_calls=None)
    history = agent_history(120, size=20)[2:]
    counter = STATE.counter("deepseek/deepseek-chat")
    starts = []
    for end in range(2, len(history) + 1, 2):
        kept = policy(plan_for([*head, *history[:end]]), STATE).messages
        assert counter.messages(kept) <= budget
        if kept != (*head, *history[:end]):
            starts.append(next(m for m in kept[2:] if m.get("role") == "assistant")["content"])
    assert len(set(starts)) <= 16


def test_a_chat_s_current_turn_that_fits_the_hard_limit_is_kept_whole() -> None:
    """review54b: an allowance for kept instructions the span did not hold sent a 9,209-token paste that
    fits a 10,000-token limit to the digest."""
    history = [SYSTEM, {"role": "user", "content": "hello"}]
    for i in range(30):
        history += [{"role": "assistant", "content": f"answer {i} " + "blah " * 200},
                    {"role": "user", "content": f"question {i} " + "more " * 200}]
    paste = {"role": "user", "content": "paste " + "lorem ipsum dolor " * 2300}
    history += [{"role": "assistant", "content": "ok, paste it"}, paste,
                {"role": "user", "content": "What is wrong in the paste above?"}]
    kept = Window(watermark_tokens=4000, budget_tokens=10000, max_payback_calls=None)(plan_for(history), STATE).messages
    assert paste in kept and STATE.counter("deepseek/deepseek-chat").messages(kept) <= 10000


def test_a_summary_transcript_of_dense_text_is_cut_within_the_window() -> None:
    """review54b: a transcript of no more characters than the room was sent uncounted (emoji: 360,127
    tokens for a 128,000-token window), and a cut by character share was not counted again."""
    from router_middleware.context.summarize import fit_transcript
    from router_middleware.tokens import encoder_for

    count = encoder_for("gpt-4o-mini")
    for text in ("😀🎉" * 60_000, "plain english words here. " * 20_000 + "😀🎉" * 60_000):
        assert count(fit_transcript(text, 127_200, count)) <= 127_200
