from __future__ import annotations

from router_middleware.tokens import Calibration, TokenCounter, tokenizer_name


def test_tokenizer_choice() -> None:
    assert tokenizer_name("deepseek/deepseek-chat") == "deepseek"
    assert tokenizer_name("gpt-3.5-turbo") == "cl100k_base"
    assert tokenizer_name("gpt-4o-mini") == "o200k_base"
    assert tokenizer_name("openrouter/google/gemini-3-pro-preview") == "o200k_base"


def test_each_message_is_counted_once() -> None:
    counter = TokenCounter("gpt-4o-mini")
    calls = 0
    encode = counter._encode

    def counting(text: str) -> int:
        nonlocal calls
        calls += 1
        return encode(text)

    counter._encode = counting
    history = [{"role": "user", "content": f"message number {i}"} for i in range(300)]
    first = counter.messages(history)
    used = calls
    assert counter.messages(history) == first
    assert calls == used  # the second pass hit the cache for every message
    counter.messages([*history, {"role": "assistant", "content": "new"}])
    assert calls == used + 1


def test_list_content_tools_and_images_count() -> None:
    counter = TokenCounter("gpt-4o-mini")
    text_only = counter.message({"role": "user", "content": [{"type": "text", "text": "describe this"}]})
    with_image = counter.message({"role": "user", "content": [
        {"type": "text", "text": "describe this"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]})
    assert with_image > text_only
    tools = [{"type": "function", "function": {"name": "bash", "parameters": {"type": "object"}}}]
    assert counter.messages([], tools) > counter.messages([])


def test_calibration_learns_offset_then_ratio() -> None:
    calibration = Calibration()
    assert calibration.apply(1000) == 1000
    calibration.observe(1000, 1200)
    assert calibration.apply(2000) == 2200  # one point: offset only
    calibration.observe(2000, 2300)
    offset, ratio = calibration.coefficients()
    assert ratio == 1.1 and round(offset) == 100
