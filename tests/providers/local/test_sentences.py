"""SentenceSplitter: streamed tokens in, speakable pieces out, as early as they are certain."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twisted_agent.providers.local.sentences import SentenceSplitter


def split_whole(text: str, **kwargs: int) -> list[str]:
    splitter = SentenceSplitter(**kwargs)
    pieces = splitter.feed(text)
    rest = splitter.flush()
    return pieces + ([rest] if rest else [])


def split_chunks(chunks: list[str], **kwargs: int) -> list[str]:
    splitter = SentenceSplitter(**kwargs)
    pieces: list[str] = []
    for chunk in chunks:
        pieces += splitter.feed(chunk)
    rest = splitter.flush()
    return pieces + ([rest] if rest else [])


@pytest.mark.parametrize(("text", "expected"), [
    ("Hello there. How are you? I am fine!", ["Hello there.", "How are you?", "I am fine!"]),
    # abbreviations never end a sentence
    ("Mr. Smith and Dr. Jones live on Elm St. near the park. Come by.",
     ["Mr. Smith and Dr. Jones live on Elm St. near the park.", "Come by."]),
    ("Bring bread, e.g. a baguette, i.e. something crusty. Thanks.",
     ["Bring bread, e.g. a baguette,", "i.e. something crusty.", "Thanks."]),
    # decimals, prices, domains: a dot not followed by a space
    ("It costs 3.50 dollars at example.com today. Bye.", ["It costs 3.50 dollars at example.com today.", "Bye."]),
    # a.m./p.m. end a sentence only before a capital
    ("We open at 9 a.m. on Saturday and close at 5 p.m. See you then!",
     ["We open at 9 a.m. on Saturday and close at 5 p.m.", "See you then!"]),
    # an ellipsis ends a sentence only before a capital
    ("Well... let me see. Hmm... Yes.", ["Well... let me see.", "Hmm...", "Yes."]),
    ("Wait… Okay.", ["Wait…", "Okay."]),
    # closing quotes and brackets stay with their sentence
    ('He said "no." Then he left.', ['He said "no."', "Then he left."]),
    ("We are open (most days.) Call us.", ["We are open (most days.)", "Call us."]),
    # a one-word answer is a sentence
    ("No. I cannot do that.", ["No.", "I cannot do that."]),
    # a numbered list item is not a sentence of its own
    ("1. Bread is baked daily.", ["1. Bread is baked daily."]),
    # a blank line ends a paragraph (and a list) even without punctuation
    ("Our hours\n\nMonday to Friday", ["Our hours", "Monday to Friday"]),
])
def test_sentences(text: str, expected: list[str]) -> None:
    assert split_whole(text) == expected
    assert split_chunks(list(text)) == expected


def test_first_piece_ends_early_at_a_clause_after_enough_words() -> None:
    splitter = SentenceSplitter(min_clause_words=4)
    assert splitter.feed("Our opening hours on Saturday are") == []
    # the comma alone is not enough: "1,000" keeps its comma, so the next character decides
    assert splitter.feed(",") == []
    assert splitter.feed(" nine") == ["Our opening hours on Saturday are,"]
    # later clauses wait for the end of their sentence
    assert splitter.feed(" to five, and on Sunday, ten to four.") == []
    assert splitter.feed(" Bye") == ["nine to five, and on Sunday, ten to four."]
    assert splitter.flush() == "Bye"


@pytest.mark.parametrize(("text", "expected"), [
    ("Sure, I can help with that.", ["Sure, I can help with that."]),  # one word before the comma
    ("Yes, we open at nine; we close at five.", ["Yes, we open at nine;", "we close at five."]),
    ("Our hours on Saturday — nine to five.", ["Our hours on Saturday —", "nine to five."]),
    ("We sell 1,000 loaves of bread a day.", ["We sell 1,000 loaves of bread a day."]),
    ("The bakery opens at 9:30 every day.", ["The bakery opens at 9:30 every day."]),
    ("The time is as follows: nine to five.", ["The time is as follows:", "nine to five."]),
])
def test_clause_rules(text: str, expected: list[str]) -> None:
    assert split_whole(text) == expected
    assert split_chunks(list(text)) == expected


def test_holds_back_at_most_until_the_next_character() -> None:
    splitter = SentenceSplitter()
    assert splitter.feed("Hello") == []
    assert splitter.feed(".") == []  # "Hello.5"? the next character decides
    assert splitter.feed(" ") == ["Hello."]
    assert splitter.pending == " "


def test_flush_returns_the_rest_once_and_resets() -> None:
    splitter = SentenceSplitter()
    assert splitter.feed("Hi. Over to") == ["Hi."]
    assert splitter.flush() == "Over to"
    assert splitter.flush() is None
    # after a flush a new reply may again start with an early clause
    assert splitter.feed("Our opening hours on Saturday are, ") == ["Our opening hours on Saturday are,"]


def test_whitespace_only_never_makes_a_piece() -> None:
    splitter = SentenceSplitter()
    assert splitter.feed("   \n\n  ") == []
    assert splitter.flush() is None


def test_a_reply_without_punctuation_is_cut_at_a_space_when_long() -> None:
    text = " ".join(["word"] * 100)
    pieces = split_whole(text, max_chars=50)
    assert all(len(p) <= 50 for p in pieces)
    assert " ".join(pieces) == text


@pytest.mark.parametrize(("text", "expected"), [
    # no punctuation by the fifth word: the first piece ends at the next word a phrase can end on
    ("The opening hours on Saturday are 8:00 AM to 5:00 PM.",
     ["The opening hours on Saturday", "are 8:00 AM to 5:00 PM."]),
    # never after a function word ("from") or a number ("nine" is a word, "9" is not)
    ("We are open from nine in the morning. Bye.", ["We are open from nine", "in the morning.", "Bye."]),
    ("We are open from 9 until 5 every Saturday.", ["We are open from 9 until 5 every Saturday."]),
    # an earlier boundary wins; later pieces are whole sentences
    ("Yes. We are open from nine in the morning until five.",
     ["Yes.", "We are open from nine in the morning until five."]),
    ("Sorry, we are closed on Sunday.", ["Sorry, we are closed on Sunday."]),
    # a short sentence is not cut
    ("I can help you.", ["I can help you."]),
])
def test_first_piece_word_cut(text: str, expected: list[str]) -> None:
    assert split_whole(text, first_piece_words=5) == expected
    assert split_chunks(list(text), first_piece_words=5) == expected


def test_first_piece_word_cut_waits_for_the_word_to_end() -> None:
    splitter = SentenceSplitter(first_piece_words=3)
    assert splitter.feed("Our shop opens") == []  # "opens" might go on: "openstreet"
    assert splitter.feed(" at") == ["Our shop opens"]
    assert splitter.feed(" nine every day and") == []  # only the first piece is cut by words
    with pytest.raises(ValueError, match="first_piece_words"):
        SentenceSplitter(first_piece_words=-1)


# --- properties -----------------------------------------------------------------------------------

ALPHABET = st.sampled_from([*"abcXY .,;:!?…—-'\"()\n19", "Mr.", "a.m.", "e.g.", "...", " ", "  ", "\n\n"])
TEXT = st.lists(ALPHABET, max_size=60).map("".join)


@st.composite
def chunkings(draw: st.DrawFn) -> tuple[str, list[str]]:
    text = draw(TEXT)
    cuts = sorted(draw(st.sets(st.integers(0, len(text)), max_size=12)))
    bounds = [0, *cuts, len(text)]
    return text, [text[a:b] for a, b in itertools.pairwise(bounds)]


@given(TEXT)
def test_pieces_keep_every_word_in_order(text: str) -> None:
    # documented normalisation: pieces are cut at whitespace and stripped, so the words survive
    pieces = split_whole(text)
    assert " ".join(pieces).split() == text.split()


@given(TEXT)
def test_no_piece_is_empty_or_padded(text: str) -> None:
    for piece in split_whole(text):
        assert piece
        assert piece == piece.strip()


@given(chunkings(), st.integers(1, 6))
def test_chunking_does_not_change_the_pieces(case: tuple[str, list[str]], min_words: int) -> None:
    text, chunks = case
    assert split_chunks(chunks, min_clause_words=min_words) == split_whole(text, min_clause_words=min_words)


@given(chunkings(), st.integers(1, 6))
def test_word_cut_keeps_words_and_does_not_depend_on_chunking(case: tuple[str, list[str]], words: int) -> None:
    text, chunks = case
    whole = split_whole(text, first_piece_words=words)
    assert " ".join(whole).split() == text.split()
    assert all(piece and piece == piece.strip() for piece in whole)
    assert split_chunks(chunks, first_piece_words=words) == whole


@given(TEXT)
def test_char_by_char_equals_all_at_once(text: str) -> None:
    assert split_chunks(list(text)) == split_whole(text)


@given(TEXT, st.integers(8, 40))
def test_max_chars_keeps_words_and_chunking(text: str, max_chars: int) -> None:
    whole = split_whole(text, max_chars=max_chars)
    assert " ".join(whole).split() == text.split()
    assert split_chunks(list(text), max_chars=max_chars) == whole
