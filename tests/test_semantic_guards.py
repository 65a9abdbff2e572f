"""The semantic cache's guards: pure functions that refuse a look-alike turn whatever its similarity."""

from __future__ import annotations

import pytest

from router_middleware.semantic import (
    directions,
    features,
    flipped,
    identifiers,
    negations,
    opposites,
    refusal,
    swapped,
)


def test_identifiers_are_file_names_backticked_names_and_quoted_strings() -> None:
    assert identifiers("Why does loading config.yaml fail?") == ["config.yaml"]
    assert identifiers("Open src/app/main.py and ./tests/test_x.py") == ["./tests/test_x.py", "src/app/main.py"]
    assert identifiers("What does `parse_args` return for 'good  morning' and \u201cHi\u201d?") == \
        ["good morning", "hi", "parse_args"]
    assert identifiers('Grep for "Connection\nRefused"') == identifiers('Grep for "connection refused"')
    # Apostrophes, abbreviations and decimals are not identifiers.
    assert identifiers("Janet's ducks don't lay 3.5 eggs, e.g. on Mondays; the students' notes.") == []
    assert identifiers("Load config.yaml") != identifiers("Load secrets.yaml")


def test_negations_count_words_and_contractions_alike() -> None:
    assert negations("Explain why we should cache it.") == 0
    assert negations("Explain why we should not cache it.") == 1
    assert negations("Explain why we shouldn't cache it.") == negations("Explain why we should not cache it.")
    assert negations("The user cannot log in and never could; no luck, nothing works") == 4
    assert negations("Notice the note on knots") == 0  # whole words only


def test_directions_are_the_ends_of_to_into_and_arrows() -> None:
    assert ("celsius", "fahrenheit") in directions("Write a function that converts Celsius to Fahrenheit.")
    assert ("landlord", "tenant") in directions("Draft a letter from a landlord to a tenant.")
    assert ("json", "yaml") in directions("Convert this JSON document into YAML.")
    assert directions("map keys -> values") == [("keys", "values"), ("map", "values")]  # sorted, one way only
    assert directions("What is the capital of France?") == []


def test_swapped_means_one_way_here_and_only_the_other_way_there() -> None:
    ours, theirs = directions("Celsius to Fahrenheit"), directions("Fahrenheit to Celsius")
    assert swapped(ours, theirs) and swapped(theirs, ours)
    assert not swapped(ours, directions("Please turn Celsius into Fahrenheit"))
    ranges = directions("A. 3 to 7 minutes B. 7 to 3 minutes")  # both ways in each text: nothing swapped
    assert not swapped(ranges, ranges)


@pytest.mark.parametrize(("ours", "theirs", "guard"), [
    ("Why does loading config.yaml fail?", "Why does loading secrets.yaml fail?", "identifiers"),
    ("Should I use threads here?", "Should I not use threads here?", "negation"),
    ("Convert Celsius to Fahrenheit", "Convert Fahrenheit to Celsius", "direction"),
    ("Janet has 16 eggs", "Janet has 18 eggs", "numbers"),
    ("Why isn't the build passing?", "Why is the build not passing?", None),
    ("Sort the list of users in ascending order by age.", "Sort the list of users in descending order by age.",
     "opposite"),
    ("Explain the advantages of using Rust over C++.", "Explain the disadvantages of using Rust over C++.",
     "opposite"),
    ("Write a function to encrypt a string with AES.", "Write a function to decrypt a string with AES.", "opposite"),
    ("List the pros of remote work.", "List the cons of remote work.", "opposite"),
    ("List the pros and cons of remote work.", "What are the pros and cons of remote work?", None),
    # a trial's hits at the default threshold: the same numbers in another order, and three opposites
    ("What is 3 minus 5?", "What is 5 minus 3?", "numbers"),
    ("Divide 10 by 4.", "Divide 4 by 10.", "numbers"),
    ("Who won the 2018 World Cup final?", "Who lost the 2018 World Cup final?", "opposite"),
    ("Write a short poem about the sea.", "Write a long poem about the sea.", "opposite"),
    ("Explain quantum computing briefly.", "Explain quantum computing in detail.", "opposite"),
    # a trial's hit at the default threshold (0.912): the same question in other units
    ("What is the boiling point of water in Celsius?", "What is the boiling point of water in Fahrenheit?", "units"),
    ("How heavy is 3 kg?", "How heavy is 3 lbs?", "units"),
    ("Water boils at 100 °C, right?", "Water boils at 100 °F, right?", "units"),
    ("How many kilometres is a marathon?", "A marathon is how many kilometers?", None),
    ("Convert $5 to euros", "Convert 5 dollars to €", None),  # a symbol is its unit
])
def test_refusal_names_the_guard_that_refuses(ours: str, theirs: str, guard: str | None) -> None:
    assert refusal(features(ours), features(theirs)) == guard
    assert refusal(features(ours), features(theirs), number_guard=False, text_guards=False) is None


def test_opposites_are_the_side_of_each_pair_a_turn_uses_and_flipped_means_only_the_other_side_there() -> None:
    """Four of eleven antonym pairs a user tried were served each other's answer (similarity 0.93-0.99)
    before this guard; a turn with both words of a pair, or neither, flips nothing."""
    ours = opposites("Encrypted the files, then sort ascending")
    assert len(ours) == 2 and all(side.endswith("a") for side in ours)
    theirs = opposites("Decrypting the files, then sort ascending")
    assert flipped(ours, theirs) and flipped(theirs, ours)
    assert not flipped(opposites("pros and cons"), opposites("the cons"))
    assert not flipped(opposites("Add a retry"), opposites("Please add a retry"))
    assert opposites("What is the capital of France?") == []


def test_an_entry_stored_without_the_text_features_is_refused() -> None:
    text = "Convert Celsius to Fahrenheit"
    assert refusal(features(text), {"numbers": []}) == "identifiers"  # written before the text guards
    assert refusal(features(text), {"numbers": []}, text_guards=False) is None
