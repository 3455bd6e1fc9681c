"""The records in Redis: the key layout described in :mod:`twisted_agent.store.redis`, written and
read a round trip (or two) at a time on the connection given.

Nothing here decides when to write or what to do when Redis fails: that is
:class:`~twisted_agent.store.redis.RedisStore`'s business. Errors reach the caller as raised by
:meth:`~twisted_agent.store.redis_link.RedisLink.run`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from twisted_agent.config import StoreConfig
from twisted_agent.store.interfaces import HistoryRecord, LiveRecord
from twisted_agent.store.memory import matches
from twisted_agent.store.redis_link import WRITE_TIMEOUT, RedisConnection, RedisLink
from twisted_agent.store.write_queue import Write

#: seconds one round trip of a read may take
READ_TIMEOUT = 3.0
#: history records fetched per round trip while searching
HISTORY_PAGE = 200
#: a history search stops (returning what it found) after scanning this long; the admin UI gives up
#: on a read after 5 s
HISTORY_SEARCH_TIME = 3.0

DAY = 86400.0


class RedisKeys:
    """Every key this store writes, all below ``prefix:``."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.live_index = f"{prefix}:live"
        self.history = f"{prefix}:history"

    def live(self, call_id: str) -> str:
        return f"{self.prefix}:live:{call_id}"

    def call(self, call_id: str) -> str:
        return f"{self.prefix}:call:{call_id}"


def live_member(engine_id: str, call_id: str) -> str:
    return json.dumps([engine_id, call_id], separators=(",", ":"))


def parse_live_member(member: str) -> tuple[str, str] | None:
    """(engine id, call id) of a live index member; None for anything this store did not write."""
    try:
        value = json.loads(member)
    except ValueError:
        return None
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
        return value[0], value[1]
    return None


class RedisRecords:
    """One engine's reads and writes of the shared records.

    ``decode`` turns a stored record into a dict (None, counted and logged, for a bad one); ``log``
    is the store's logger.
    """

    def __init__(self, link: RedisLink, config: StoreConfig, engine_id: str, clock: IReactorTime, log: Logger,
                 decode: Callable[[str], dict[str, Any] | None]) -> None:
        self._link = link
        self._config = config
        self.engine_id = engine_id
        self._clock = clock
        self.log = log
        self._decode = decode
        self.keys = RedisKeys(config.prefix)
        #: calls in the history, as last counted (None: not known yet)
        self.history_size: int | None = None

    def _live_ms(self) -> int:
        return max(1, int(self._config.live_ttl * 1000))

    def _others(self, members: Sequence[str]) -> list[tuple[str, str]]:
        """(member, call id) of the live index entries of other engines."""
        others = []
        for member in members:
            parsed = parse_live_member(member)
            if parsed is not None and parsed[0] != self.engine_id:
                others.append((member, parsed[1]))
        return others

    # --- this engine's records --------------------------------------------------------------------

    async def write(self, protocol: RedisConnection, batch: Sequence[Write]) -> None:
        """Write a batch of queued writes, in order; a finished call also trims the history."""
        keys = self.keys
        now = self._clock.seconds()
        live_ms = self._live_ms()
        keep_s = self._config.history_days * DAY
        commands: list[tuple[Any, ...]] = []
        finished = False
        for write in batch:
            member = live_member(self.engine_id, write.call_id)
            if write.kind == "live":
                # the record before its index entry: whoever sees the entry finds the record
                commands += [("SET", keys.live(write.call_id), write.text, "PX", live_ms),
                             ("ZADD", keys.live_index, write.score, member)]
                continue
            finished = True
            keep_ms = int((write.score + keep_s - now) * 1000)
            if keep_ms > 0:  # a call that ended before the history's horizon is not kept at all
                commands += [("SET", keys.call(write.call_id), write.text, "PX", keep_ms),
                             ("ZADD", keys.history, write.score, write.call_id)]
            commands += [("DEL", keys.live(write.call_id)), ("ZREM", keys.live_index, member)]
        if finished:
            beyond = -(self._config.history_max + 1)
            commands += [("ZREMRANGEBYSCORE", keys.history, "-inf", f"({now - keep_s:.6f}"),
                         ("ZRANGE", keys.history, 0, beyond),
                         ("ZREMRANGEBYRANK", keys.history, 0, beyond),
                         ("ZCARD", keys.history)]
        replies = await self._link.run(protocol, commands, WRITE_TIMEOUT)
        if finished:
            self.history_size = int(replies[-1])
            trimmed = replies[-3]
            if trimmed:
                await self._link.run(protocol, [("DEL", *[keys.call(call_id) for call_id in trimmed])], WRITE_TIMEOUT)

    async def live_index(self, protocol: RedisConnection, timeout: float) -> list[str]:
        """Every member of the live index."""
        members: list[str] = (await self._link.run(protocol, [("ZRANGE", self.keys.live_index, 0, -1)], timeout))[0]
        return members

    def stale(self, members: Sequence[str], live: Mapping[str, object], finishing: set[str]) -> list[tuple[str, str]]:
        """(member, call id) of this engine's live index entries for calls it does not know
        (``live``): left by a previous run."""
        stale = []
        for member in members:
            parsed = parse_live_member(member)
            if parsed is None or parsed[0] != self.engine_id or parsed[1] in finishing:
                continue  # another engine's, or one whose queued finish deletes it in order
            if parsed[1] not in live:
                stale.append((member, parsed[1]))
        return stale

    async def rewrite(self, protocol: RedisConnection, stale: Sequence[tuple[str, str]],
                      live: Mapping[str, tuple[float, str]]) -> None:
        """Delete the ``stale`` live records and write every one in ``live`` (call id -> (started_at, JSON))."""
        live_ms = self._live_ms()
        commands: list[tuple[Any, ...]] = []
        for member, call_id in stale:
            commands += [("DEL", self.keys.live(call_id)), ("ZREM", self.keys.live_index, member)]
        for call_id, (started, text) in live.items():
            commands += [("SET", self.keys.live(call_id), text, "PX", live_ms),
                         ("ZADD", self.keys.live_index, started, live_member(self.engine_id, call_id))]
        if commands:
            await self._link.run(protocol, commands, WRITE_TIMEOUT)

    async def refresh(self, protocol: RedisConnection, own: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
        """Renew the expiry of this engine's live records ``own`` and count the history; returns the
        call ids Redis no longer had, and (member, call id) of the other engines' live index entries."""
        commands: list[tuple[Any, ...]] = [("PEXPIRE", self.keys.live(call_id), self._live_ms()) for call_id in own]
        commands += [("ZRANGE", self.keys.live_index, 0, -1), ("ZCARD", self.keys.history)]
        replies = await self._link.run(protocol, commands, READ_TIMEOUT)
        lost = [call_id for call_id, kept in zip(own, replies, strict=False) if not kept]
        self.history_size = int(replies[-1])
        return lost, self._others(replies[-2])

    # --- everyone's records -----------------------------------------------------------------------

    async def existing(self, protocol: RedisConnection, entries: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The live index entries whose record still exists; removes the others from the index."""
        if not entries:
            return []
        exists = await self._link.run(protocol, [("EXISTS", self.keys.live(call_id)) for _, call_id in entries],
                                      READ_TIMEOUT)
        gone = [member for (member, _), there in zip(entries, exists, strict=True) if not there]
        if gone:
            await self._link.run(protocol, [("ZREM", self.keys.live_index, *gone)], READ_TIMEOUT)
        return [entry for entry, there in zip(entries, exists, strict=True) if there]

    async def others_live(self, protocol: RedisConnection) -> list[LiveRecord]:
        """The other engines' live records; removes the index entries of expired ones."""
        others = self._others(await self.live_index(protocol, READ_TIMEOUT))
        if not others:
            return []
        texts = (await self._link.run(protocol, [("MGET", *[self.keys.live(c) for _, c in others])],
                                      READ_TIMEOUT))[0]
        records = []
        gone = []
        for (member, _), text in zip(others, texts, strict=True):
            if text is None:
                gone.append(member)  # its engine stopped refreshing it: it is dead
            elif (record := self._decode(text)) is not None:
                records.append(record)
        if gone:
            await self._link.run(protocol, [("ZREM", self.keys.live_index, *gone)], READ_TIMEOUT)
        return records

    async def call(self, protocol: RedisConnection, call_id: str) -> str | None:
        """The stored record of a call, live or finished (None if there is none)."""
        live, finished = await self._link.run(protocol, [("GET", self.keys.live(call_id)),
                                                         ("GET", self.keys.call(call_id))], READ_TIMEOUT)
        return live if live is not None else finished

    async def search(self, protocol: RedisConnection, number: str, since: float | None, until: float | None,
                     limit: int) -> list[HistoryRecord]:
        now = self._clock.seconds()
        lowest = now - self._config.history_days * DAY
        if since is not None:
            lowest = max(lowest, since)  # a call cannot end before it started
        deadline = now + HISTORY_SEARCH_TIME
        found: list[HistoryRecord] = []
        seen: set[str] = set()
        offset = 0
        while len(found) < limit and offset < self._config.history_max:
            page = min(HISTORY_PAGE, self._config.history_max - offset)
            call_ids = (await self._link.run(protocol, [("ZREVRANGEBYSCORE", self.keys.history, "+inf",
                                                         f"{lowest:.6f}", "LIMIT", offset, page)], READ_TIMEOUT))[0]
            if not call_ids:
                break
            texts = (await self._link.run(protocol, [("MGET", *[self.keys.call(c) for c in call_ids])],
                                          READ_TIMEOUT))[0]
            for call_id, text in zip(call_ids, texts, strict=True):
                record = None if text is None or call_id in seen else self._decode(text)
                seen.add(call_id)
                if record is not None and matches(record, number, since, until):
                    found.append(record)
                    if len(found) >= limit:
                        break
            offset += len(call_ids)
            if len(call_ids) < page:
                break
            if self._clock.seconds() > deadline:
                self.log.info("Redis store: a history search stopped after {scanned} calls ({seconds}s)",
                              scanned=offset, seconds=HISTORY_SEARCH_TIME)
                break
        return found
