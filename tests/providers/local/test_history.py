"""ConversationHistory: the messages a model sees each turn, bounded, and honest about barge-in."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twisted_agent.providers.local.history import ConversationHistory

SYSTEM = "You are the receptionist of Joe's Bakery."


def roles(history: ConversationHistory) -> list[str]:
    return [m["role"] for m in history.messages()]


def test_messages_start_with_the_system_prompt_then_the_turns_in_order() -> None:
    history = ConversationHistory(SYSTEM, max_turns=4)
    history.add_assistant("Joe's Bakery, how can I help?")
    history.add_user("When do you open on Saturday?")
    history.add_assistant("From nine to five.")
    assert history.messages() == [
        {"role": "system", "content": SYSTEM},
        {"role": "assistant", "content": "Joe's Bakery, how can I help?"},
        {"role": "user", "content": "When do you open on Saturday?"},
        {"role": "assistant", "content": "From nine to five."},
    ]


def test_oldest_exchanges_go_first_and_the_system_prompt_stays() -> None:
    history = ConversationHistory(SYSTEM, max_turns=2)
    history.add_assistant("Hello!")
    for i in range(1, 5):
        history.add_user(f"question {i}")
        history.add_assistant(f"answer {i}")
    assert history.messages() == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "question 3"},
        {"role": "assistant", "content": "answer 3"},
        {"role": "user", "content": "question 4"},
        {"role": "assistant", "content": "answer 4"},
    ]
    assert history.dropped >= 2


def test_the_newest_question_counts_as_an_exchange() -> None:
    history = ConversationHistory(SYSTEM, max_turns=1)
    history.add_user("one")
    history.add_assistant("1")
    history.add_user("two")
    assert history.messages() == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "two"}]


def test_barge_in_keeps_only_what_the_caller_heard() -> None:
    history = ConversationHistory(SYSTEM, max_turns=4)
    history.add_user("When do you open?")
    history.add_assistant("We open at nine on weekdays and at ten on Sundays.")
    assert history.truncate_last_assistant("We open at nine")
    assert history.messages()[-1] == {"role": "assistant", "content": "We open at nine"}


def test_barge_in_before_anything_was_heard_removes_the_turn_and_the_next_question_merges() -> None:
    history = ConversationHistory(SYSTEM, max_turns=4)
    history.add_user("When do you open?")
    history.add_assistant("We open at nine.")
    assert history.truncate_last_assistant("")
    assert roles(history) == ["system", "user"]
    history.add_user("Sorry, on Sunday?")
    # roles still alternate, as chat templates require
    assert history.messages()[-1] == {"role": "user", "content": "When do you open? Sorry, on Sunday?"}


def test_truncate_without_an_agent_turn_changes_nothing() -> None:
    history = ConversationHistory(SYSTEM, max_turns=4)
    history.add_user("Hello?")
    assert not history.truncate_last_assistant("anything")
    assert roles(history) == ["system", "user"]


def test_empty_text_is_not_a_turn() -> None:
    history = ConversationHistory(SYSTEM, max_turns=4)
    history.add_user("   ")
    history.add_assistant("")
    assert history.messages() == [{"role": "system", "content": SYSTEM}]


def test_token_budget_drops_old_exchanges_but_keeps_the_last_question() -> None:
    history = ConversationHistory(SYSTEM, max_turns=50, max_tokens=60)
    for i in range(10):
        history.add_user(f"question number {i} " + "x" * 40)
        history.add_assistant(f"answer number {i} " + "y" * 40)
    assert history.estimated_tokens() <= 60
    history.add_user("z" * 1000)  # alone over the budget: still kept, with the system prompt
    assert roles(history) == ["system", "user"]
    assert history.messages()[-1]["content"] == "z" * 1000


def test_trimming_in_steps_keeps_the_prompt_prefix_stable_between_trims() -> None:
    history = ConversationHistory(SYSTEM, max_turns=4, keep_after_trim=2)
    prefixes = []
    for i in range(10):
        history.add_user(f"q{i}")
        prefixes.append(history.messages()[1]["content"])
        history.add_assistant(f"a{i}")
    # the first kept turn changes only when a bound is hit (every other exchange), not every turn
    changes = sum(1 for a, b in itertools.pairwise(prefixes) if a != b)
    assert changes <= 4
    assert history.exchanges() <= 4


def test_rejects_nonsense_bounds() -> None:
    with pytest.raises(ValueError, match="max_turns"):
        ConversationHistory(SYSTEM, max_turns=0)
    with pytest.raises(ValueError, match="keep_after_trim"):
        ConversationHistory(SYSTEM, max_turns=2, keep_after_trim=3)


OPS = st.lists(st.one_of(
    st.tuples(st.just("user"), st.text(max_size=30)),
    st.tuples(st.just("assistant"), st.text(max_size=30)),
    st.tuples(st.just("truncate"), st.text(max_size=10)),
), max_size=40)


@given(OPS, st.integers(1, 5), st.one_of(st.none(), st.integers(20, 200)))
def test_invariants_hold_after_any_sequence(ops: list[tuple[str, str]], max_turns: int, budget: int | None) -> None:
    history = ConversationHistory(SYSTEM, max_turns=max_turns, max_tokens=budget)
    last_user = None
    for op, text in ops:
        if op == "user":
            history.add_user(text)
            if text.strip():
                last_user = text.strip()
        elif op == "assistant":
            history.add_assistant(text)
        else:
            history.truncate_last_assistant(text)
        messages = history.messages()
        assert messages[0] == {"role": "system", "content": SYSTEM}
        turns = messages[1:]
        assert all(m["content"] == m["content"].strip() and m["content"] for m in turns)
        assert all(a["role"] != b["role"] for a, b in itertools.pairwise(turns)), "roles alternate"
        assert history.exchanges() <= max_turns
        if op == "user" and text.strip():
            assert last_user is not None
            assert last_user in turns[-1]["content"], "the newest question is never dropped"
