"""One call's conversation, as the chat messages a language model is given each turn.

The system prompt always comes first and is never dropped; after it come the caller's and the
agent's turns, oldest first, bounded by a number of exchanges and optionally by a rough token
budget (the oldest exchanges go first). Roles alternate after the system prompt, as chat templates
expect: two caller turns in a row (the agent's reply was never heard) are merged into one.

When the caller interrupts, :meth:`ConversationHistory.truncate_last_assistant` rewrites the
agent's last turn to what the caller actually heard, so the model does not believe it said
things nobody heard.

Keeping the prefix stable matters for speed: an embedded model reuses its cache for the part of
the prompt that did not change since the last turn. Dropping an old exchange changes the
prefix, so when a bound is hit the history drops down to ``keep_after_trim`` exchanges at once
rather than one per turn: one slow turn, then several fast ones.
"""

from __future__ import annotations

from dataclasses import dataclass

#: a rough, model-independent estimate: English text is about four characters per token, and
#: chat templates add a few tokens of role markers per message
CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4


@dataclass
class Turn:
    role: str  # "user" or "assistant"
    content: str


def estimate_tokens(text: str) -> int:
    return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN + TOKENS_PER_MESSAGE


class ConversationHistory:
    """The system prompt plus the last ``max_turns`` caller/agent exchanges.

    ``max_tokens``: an optional rough budget for the whole prompt (system prompt included); the
    oldest exchanges are dropped to stay under it, but the system prompt and the newest caller turn
    are always kept. ``keep_after_trim``: how many exchanges to keep when a bound is hit
    (default: all that fit, i.e. drop one at a time).
    """

    def __init__(
        self, system_prompt: str, max_turns: int, max_tokens: int | None = None, keep_after_trim: int | None = None
    ) -> None:
        if max_turns < 1:
            raise ValueError("max_turns must be at least 1")
        if keep_after_trim is not None and not 1 <= keep_after_trim <= max_turns:
            raise ValueError("keep_after_trim must be between 1 and max_turns")
        self.system_prompt = system_prompt
        self.max_turns = max_turns
        self.max_tokens = max_tokens
        self.keep_after_trim = keep_after_trim if keep_after_trim is not None else max_turns
        self._turns: list[Turn] = []
        #: exchanges dropped so far (for logs and tests)
        self.dropped = 0

    # --- reading ---------------------------------------------------------------------------------

    def messages(self) -> list[dict[str, str]]:
        """The chat messages for the next request: system prompt first, then the kept turns."""
        return [{"role": "system", "content": self.system_prompt}] + [
            {"role": t.role, "content": t.content} for t in self._turns]

    @property
    def turns(self) -> list[Turn]:
        return list(self._turns)

    def __len__(self) -> int:
        return len(self._turns)

    def exchanges(self) -> int:
        """Caller turns kept (each with the agent's answer, if any)."""
        return sum(1 for t in self._turns if t.role == "user")

    def estimated_tokens(self) -> int:
        return estimate_tokens(self.system_prompt) + sum(estimate_tokens(t.content) for t in self._turns)

    # --- writing ---------------------------------------------------------------------------------

    def add_user(self, text: str) -> None:
        """What the caller said. Follows another caller turn (the agent's answer was lost): merged."""
        text = text.strip()
        if not text:
            return
        if self._turns and self._turns[-1].role == "user":
            self._turns[-1].content = f"{self._turns[-1].content} {text}"
        else:
            self._turns.append(Turn("user", text))
        self._enforce_bounds()

    def add_assistant(self, text: str) -> None:
        """What the agent said (the greeting may come before any caller turn). Consecutive ones are joined."""
        text = text.strip()
        if not text:
            return
        if self._turns and self._turns[-1].role == "assistant":
            self._turns[-1].content = f"{self._turns[-1].content} {text}"
        else:
            self._turns.append(Turn("assistant", text))
        self._enforce_bounds()

    def truncate_last_assistant(self, heard_text: str) -> bool:
        """Barge-in: the agent's last turn becomes ``heard_text``, what the caller heard of it.

        Nothing heard removes the turn. False (and no change) if the last turn is not the agent's.
        """
        if not self._turns or self._turns[-1].role != "assistant":
            return False
        heard = heard_text.strip()
        if heard:
            self._turns[-1].content = heard
        else:
            self._turns.pop()
        return True

    def clear(self) -> None:
        self._turns.clear()

    # --- bounds ----------------------------------------------------------------------------------

    def _over(self, exchanges: int) -> bool:
        if self.exchanges() > exchanges:
            return True
        return self.max_tokens is not None and self.estimated_tokens() > self.max_tokens

    def _enforce_bounds(self) -> None:
        if not self._over(self.max_turns):
            return
        # Trim to keep_after_trim exchanges (hysteresis: the prompt prefix stays stable for a while).
        while self._over(self.keep_after_trim) and self.exchanges() > 1:
            self._drop_oldest()
        # the newest caller turn stays even alone over the budget; an older greeting can go
        while self._turns and self._turns[0].role != "user" and self._over(self.keep_after_trim):
            self._turns.pop(0)

    def _drop_oldest(self) -> None:
        """Drop everything up to (not including) the second caller turn: one exchange, and a greeting before it."""
        seen_user = False
        while self._turns:
            if self._turns[0].role == "user":
                if seen_user:
                    break
                seen_user = True
            self._turns.pop(0)
        self.dropped += 1
