"""Cut a language model's streamed reply into pieces that text-to-speech can start on.

Speech synthesis wants whole sentences (a voice reads "nine." differently from "nine and"), but
waiting for the whole reply wastes the time the model spends generating it. :class:`SentenceSplitter`
takes the reply token by token and hands back each sentence as soon as it is certainly complete;
the very first piece may end at a clause boundary (``, ; : —``) once it holds enough words, or,
with ``first_piece_words``, at the first word boundary after that many words, so the caller hears
the agent start speaking while the rest is still being generated.

The word cut trades a little prosody for time. Measured with Qwen2.5-0.5B on the 2-core box, the
first sentence of a typical answer ("The opening hours on Saturday are 8:00 AM to 5:00 PM.") is
complete ~900 ms after the first token; its first five words ~300 ms. Piper reads the piece as a
sentence of its own, so the cut never falls after a function word ("on", "the", "are") or a number
(the unit may follow: "8:00 | AM"), where the break would be most audible.

"Certainly complete" means that more text could not change the decision: a full stop is a
boundary only once the character after it is known to be whitespace (``3.5``, ``example.com``),
and after ``a.m.``, ``etc.`` or an ellipsis only once the next word is known to start with a
capital letter. The splitter therefore gives the same pieces however the text is chunked, and
holds a piece back by at most one token.

Pieces are cut only at whitespace and are stripped, so ``" ".join(pieces + [rest])`` has the
same words as the input (``" ".join(pieces).split() == text.split()``); whitespace inside a piece
is kept as the model wrote it. No piece is empty.
"""

from __future__ import annotations

TERMINATORS = frozenset(".!?…")
CLAUSE_MARKS = frozenset(",;:—–")  # noqa: RUF001 (the en dash is meant)
# closing quotes and brackets that belong to the sentence before them: `He said "no."`
CLOSERS = frozenset("\"')]}”’»")  # noqa: RUF001
OPENERS = frozenset("\"'([{“‘«")  # noqa: RUF001

#: a full stop after these never ends a sentence ("Mr. Smith", "e.g. bread")
NEVER_FINAL = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "st", "mt", "ft", "vs", "e.g", "i.e", "cf", "approx", "fig",
    "dept", "ave", "apt",
})
#: the first piece's word cut never falls right after these: the phrase would be broken mid-way
FUNCTION_WORDS = frozenset({
    "a", "an", "the", "and", "or", "but", "nor", "so", "to", "of", "on", "in", "at", "by", "for", "from",
    "with", "into", "onto", "about", "as", "until", "till", "before", "after", "between", "over", "under",
    "through", "during", "without", "within", "like", "per", "via", "every", "each", "some", "any", "all",
    "than", "that", "which", "who", "whose", "if", "is", "are", "was", "were", "be", "been", "am", "do",
    "does", "did", "have", "has", "had", "will", "would", "can", "could", "should", "may", "might", "must",
    "shall", "not", "no", "my", "your", "our", "their", "his", "her", "its", "this", "these", "those", "very",
    "i", "we", "you", "they", "he", "she", "it", "there", "i'm", "we're", "you're", "it's", "there's",
    "let's", "please", "just",
})
#: a full stop after these ends a sentence only when the next word is capitalised ("9 a.m. We open")
MAYBE_FINAL = frozenset({"a.m", "p.m", "etc", "inc", "ltd", "co", "corp", "jr", "sr", "min", "mins", "hr", "hrs"})


class SentenceSplitter:
    """Feed streamed text; get back complete sentences (and an early first clause) as they end.

    ``min_clause_words``: the first piece may end at a clause mark after this many words.
    ``first_piece_words``: the first piece may end at the whitespace after its Nth (or a later)
    word, when no boundary came earlier; never after a function word or a word with a digit
    (0 = never).
    ``max_chars``: a piece with no boundary is cut at its last space once it is this long, so a
    model that never punctuates still gets spoken (0 = never).
    """

    def __init__(self, min_clause_words: int = 4, max_chars: int = 250, first_piece_words: int = 0) -> None:
        if min_clause_words < 1:
            raise ValueError("min_clause_words must be at least 1")
        if first_piece_words < 0:
            raise ValueError("first_piece_words must be 0 (off) or more")
        self.min_clause_words = min_clause_words
        self.first_piece_words = first_piece_words
        self.max_chars = max_chars
        self._buffer = ""
        self._emitted = 0

    def feed(self, text: str) -> list[str]:
        """Add streamed text; the pieces it completes, in order (often none)."""
        self._buffer += text
        pieces: list[str] = []
        while True:
            cut = self._find_cut(self._buffer)
            if cut is None:
                return pieces
            piece, self._buffer = self._buffer[:cut].strip(), self._buffer[cut:]
            if piece:
                pieces.append(piece)
                self._emitted += 1

    def flush(self) -> str | None:
        """The end of the reply: whatever is left (None if only whitespace); the splitter is reset."""
        rest = self._buffer.strip()
        self.reset()
        return rest or None

    def reset(self) -> None:
        """Forget everything (a new reply starts; its first piece may again end at a clause)."""
        self._buffer = ""
        self._emitted = 0

    @property
    def pending(self) -> str:
        """Text received but not yet returned."""
        return self._buffer

    # --- where to cut ------------------------------------------------------------------------

    def _find_cut(self, text: str) -> int | None:
        """The end of the first complete piece in ``text`` (a cut at whitespace), or None if none is known yet.

        Every decision looks only at characters already present; a boundary whose decision needs a
        character that has not arrived stops the scan, which then restarts on the next feed.
        """
        n = len(text)
        i = 0
        while i < n:
            if self.max_chars and i >= self.max_chars:
                space = _last_space(text, self.max_chars)
                if space is not None:
                    return space
            c = text[i]
            if c in TERMINATORS:
                j = _skip(text, i, TERMINATORS)
                k = _skip(text, j, CLOSERS)
                if k == n:
                    return None  # the next character decides
                if not text[k].isspace():
                    i = k
                    continue
                verdict = _sentence_end(text, i, j)
                if verdict == "yes":
                    return k
                if verdict == "if-capital":
                    m = _skip_space_and_openers(text, k)
                    if m == n:
                        return None
                    if _starts_sentence(text[m]):
                        return k
                i = k
                continue
            if c in CLAUSE_MARKS or (c == "-" and i > 0 and text[i - 1].isspace()):
                if self._emitted == 0 and len(text[:i].split()) >= self.min_clause_words:
                    k = _skip(text, i + 1, CLOSERS)
                    if k == n:
                        return None
                    if text[k].isspace():
                        return k
                i += 1
                continue
            if c.isspace() and self._emitted == 0 and self.first_piece_words and _word_cut(
                    text, i, self.first_piece_words):
                return i
            if c == "\n":
                # a blank line ends a paragraph (and a bullet list item with it)
                m = i + 1
                while m < n and text[m].isspace() and text[m] != "\n":
                    m += 1
                if m < n and text[m] == "\n" and text[:i].strip():
                    return i
            i += 1
        return None


def _word_cut(text: str, i: int, words: int) -> bool:
    """Whether the first piece may end at the whitespace ``text[i]``: enough words before it, and
    the last of them one a phrase can end on."""
    if i == 0 or text[i - 1].isspace():
        return False
    before = text[:i].split()
    if len(before) < words:
        return False
    last = before[-1].strip("".join(OPENERS | CLOSERS)).lower()
    return bool(last) and last not in FUNCTION_WORDS and last.replace("'", "").isalpha()


def _skip(text: str, i: int, chars: frozenset[str]) -> int:
    while i < len(text) and text[i] in chars:
        i += 1
    return i


def _skip_space_and_openers(text: str, i: int) -> int:
    while i < len(text) and (text[i].isspace() or text[i] in OPENERS):
        i += 1
    return i


def _last_space(text: str, limit: int) -> int | None:
    for i in range(limit, 0, -1):
        if text[i].isspace() and text[:i].strip():
            return i
    return None


def _starts_sentence(c: str) -> bool:
    return c.isupper()


def _sentence_end(text: str, start: int, end: int) -> str:
    """Whether the terminators ``text[start:end]`` (followed by whitespace) end a sentence.

    "yes", "no" or "if-capital" (only when the next word starts like a sentence).
    """
    run = text[start:end]
    if run.endswith(("...", "…")) and not any(c in "!?" for c in run):
        return "if-capital"  # "Well... let me see" goes on; "I see... Thanks." ends
    if run != ".":
        return "yes"  # ! ? ?! and friends
    word_start = start
    while word_start > 0 and not text[word_start - 1].isspace():
        word_start -= 1
    word = text[word_start:start].lstrip("".join(OPENERS)).lower()
    if not word:
        return "yes"
    if word in NEVER_FINAL:
        return "no"
    if word.isdigit() and not text[:word_start].strip():
        return "no"  # a numbered list item, "1. Bread"
    if word in MAYBE_FINAL:
        return "if-capital"
    if len(word) == 1 and word.isalpha() and text[start - 1].isupper():
        return "no"  # an initial: "J. Smith" (rarely "plan B." ends a sentence; then it only joins two)
    return "yes"
