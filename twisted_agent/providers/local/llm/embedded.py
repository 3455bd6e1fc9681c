"""A GGUF language model run in this process by llama-cpp-python, on a worker thread of its own.

Why a thread, not a process (as Whisper and Piper get): llama.cpp releases the GIL for the whole
of each decode step, and the Python around it is about a millisecond per token, so the reactor
keeps its 20 ms media clock. Measured on 2 cores (a 20 ms LoopingCall, lateness idle -> while
generating): SmolLM2-135M p99 0.9 -> 1.4-4 ms; Qwen2.5-0.5B p99 1-3 -> 4-10 ms, max 16-20 ms
(with n_threads=1: p99 4 ms, max 8 ms, at 12 instead of 21 tok/s). What lateness there is comes
from two compute threads on two cores, not from the GIL, so a process would not remove it.
A thread also keeps the model's KV cache next to the next turn at no cost.

``n_threads=2`` on a 2-core machine is fastest when the machine is otherwise idle, but llama.cpp's
threads wait for each other at every step: one busy process at the same priority (nice 0) cut
SmolLM2 from ~50-80 to 2-13 tok/s, where ``n_threads=1`` kept 27-46. Whisper and Piper run at
nice 10, which llama.cpp's threads win against.

One model serves every call, one reply at a time, through a bounded queue (``LOCAL_MAX_QUEUE``):
a turn beyond the bound fails at once with :class:`LLMBusy`. Tokens cross to the reactor with
``callFromThread``. Cancelling a reply sets a flag that the generation loop checks after each
token, so the thread stops within one token (measured 6 ms for SmolLM2, 40 ms for Qwen2.5-0.5B),
and a reply still waiting is skipped.

The prompt cache: llama.cpp keeps the KV cache of the last prompt and reply, and
``Llama.generate`` reuses the longest common token prefix with the next prompt, so a call's next
turn (same system prompt, same history, one more exchange) only evaluates the new tokens:
Qwen2.5-0.5B's time to first token goes from 480 ms (66-token prompt) to 135 ms (82 of 96 tokens
reused); SmolLM2's from 230 to 60 ms. When another call's reply ran in between, a
``LlamaRAMCache`` of saved states (KV cache only, see :func:`load_llama`) restores the call's
own: 145 ms (104 of 119 reused) instead of a full evaluation.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_agent.config import LocalProviderConfig
from twisted_agent.providers.local.interfaces import ILanguageModel, ModelStatus
from twisted_agent.providers.local.llm.errors import LLMBusy, LLMError, LLMModelMissing, LLMTimeout, LLMUnavailable
from twisted_agent.providers.local.llm.remote import LLMTimeouts, bounded

#: the KV states kept for reuse across interleaved calls (a short call's state is a few MB)
DEFAULT_PROMPT_CACHE_BYTES = 128 * 1024 * 1024
#: the longest generation pauses for yield_to (the first piece of a reply being synthesized)
YIELD_MAX_S = 1.0

ModelLoader = Callable[[str], Any]


@dataclass
class _Job:
    messages: list[dict[str, str]]
    on_token: Callable[[str], None]
    result: Deferred[str]
    cancelled: threading.Event = field(default_factory=threading.Event)
    #: set by the worker thread (read after it hands the job back)
    started: float = 0.0
    first_token: float = 0.0
    finished: float = 0.0
    tokens: int = 0
    #: tokens the worker produced after the cancel flag was set (0 or 1 when it stops in time)
    tokens_after_cancel: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0


@dataclass
class EmbeddedStats:
    replies: int = 0
    cancelled: int = 0
    failures: int = 0
    last_first_token_ms: float = 0.0
    last_tokens_per_s: float = 0.0
    last_prompt_tokens: int = 0
    last_reused_tokens: int = 0
    #: tokens after which generation paused for other work (yield_to)
    yields: int = 0


def load_llama(path: str, n_ctx: int, n_threads: int, prompt_cache_bytes: int) -> Any:
    """A ``llama_cpp.Llama`` for ``path``, with the AMX safety net (models.llama_model_params_fix).

    Two changes to the stock class, both for the prompt cache:

    * it counts the tokens it decodes (``evaluated``), so a reply can tell how much of its prompt
      came from the KV cache;
    * its saved states (what ``LlamaRAMCache`` keeps) hold the KV cache and the token ids but not
      llama-cpp-python's copy of the logits: that copy is ``n_tokens x n_vocab`` floats (600 KB a
      token for Qwen2.5's 152k vocabulary, so 180 MB for a 300-token call, and not counted against
      the cache's capacity), and restoring it scans the whole ``n_batch x n_vocab`` array (0.3 s).
      Nothing reads those logits after a restore: ``generate`` always decodes at least the last
      prompt token again (``_requires_eval``), which writes fresh ones.
    """
    import llama_cpp  # type: ignore[import-not-found,unused-ignore]
    import numpy as np

    from twisted_agent.providers.local.models import llama_model_params_fix

    class VoiceLlama(llama_cpp.Llama):
        evaluated = 0

        def eval(self, tokens: Any) -> None:
            self.evaluated += len(tokens)
            super().eval(tokens)

        def save_state(self) -> Any:
            ctx = self._ctx.ctx
            size = llama_cpp.llama_state_get_size(ctx)
            buffer = (ctypes.c_uint8 * int(size))()
            written = int(llama_cpp.llama_state_get_data(ctx, buffer, size))
            if written > int(size):
                raise RuntimeError("llama_state_get_data wrote past its buffer")
            return llama_cpp.LlamaState(
                input_ids=self.input_ids[: self.n_tokens].copy(),
                scores=np.empty((0, 0), dtype=np.single),
                n_tokens=self.n_tokens,
                llama_state=bytes(memoryview(buffer)[:written]),
                llama_state_size=written,
                seed=self._seed,
            )

        def load_state(self, state: Any) -> None:
            self.input_ids[: state.n_tokens] = state.input_ids[: state.n_tokens]
            self.n_tokens = state.n_tokens
            self._requires_eval = True
            self._seed = state.seed
            data = (ctypes.c_uint8 * state.llama_state_size).from_buffer_copy(state.llama_state)
            if llama_cpp.llama_state_set_data(self._ctx.ctx, data, state.llama_state_size) != state.llama_state_size:
                raise RuntimeError("llama_state_set_data did not take the saved state")

    llama_model_params_fix()
    model = VoiceLlama(model_path=path, n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads, verbose=False)
    if prompt_cache_bytes:
        model.set_cache(llama_cpp.LlamaRAMCache(capacity_bytes=prompt_cache_bytes))
    return model


@implementer(ILanguageModel)
class EmbeddedLLM:
    """llama-cpp-python with ``EMBEDDED_MODEL`` (an installed name or a .gguf path), on a worker thread."""

    name = "embedded"
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        config: LocalProviderConfig,
        *,
        model_path: str | None = None,
        max_queue: int | None = None,
        timeouts: LLMTimeouts | None = None,
        n_ctx: int = 2048,
        n_threads: int = 2,
        prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES,
        loader: ModelLoader | None = None,
    ) -> None:
        self._reactor = reactor
        self.config = config
        self._model_path = model_path
        self.max_queue = max_queue if max_queue is not None else config.max_queue
        self.timeouts = timeouts or LLMTimeouts()
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.prompt_cache_bytes = prompt_cache_bytes
        self._loader = loader
        self.model: Any = None
        self.path = ""
        self.amx_fix = False
        self.stats = EmbeddedStats()
        #: replies accepted and not yet finished: the one generating plus those waiting
        self.pending = 0
        self._jobs: queue.Queue[Any] = queue.Queue()  # _Job, _Call, or None: stop
        self._thread: threading.Thread | None = None
        self._loading = False
        self._start_waiters: list[Deferred[None]] = []
        self._load_error: LLMError | None = None
        self._idle_waiters: list[Deferred[None]] = []
        self._stopping = False
        #: cleared while other work has priority (yield_to); the thread waits on it between tokens
        self._may_generate = threading.Event()
        self._may_generate.set()
        self._yielding = 0

    # --- ILanguageModel -------------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Load the model on the worker thread (once); fails with an LLMError (and its fix).

        After a failure the next ``start()`` (or ``chat()``) tries again: the model may have been
        installed since.
        """
        if self.model is not None:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._start_waiters.append(waiter)
        if not self._loading:
            self._loading = True
            self._load_error = None
            Deferred.fromCoroutine(self._start()).addBoth(self._loaded)
        return waiter

    def _loaded(self, result: Any) -> None:
        self._loading = False
        waiters, self._start_waiters = self._start_waiters, []
        for waiter in waiters:
            if waiter.called:
                continue  # cancelled while waiting (the chat that wanted it was)
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(None)

    def chat(self, messages: list[dict[str, str]], on_token: Callable[[str], None]) -> Deferred[str]:
        return Deferred.fromCoroutine(self._chat(list(messages), on_token))

    def status(self) -> ModelStatus:
        extra = {
            "backend": self.name, "model": self.config.embedded_model, "path": self.path,
            "queue_depth": max(0, self.pending - 1), "generating": self.pending > 0, "max_queue": self.max_queue,
            "n_threads": self.n_threads, "n_ctx": self.n_ctx, "amx_fix": self.amx_fix,
            "replies": self.stats.replies, "cancelled": self.stats.cancelled, "failures": self.stats.failures,
            "last_first_token_ms": round(self.stats.last_first_token_ms, 1),
            "last_tokens_per_s": round(self.stats.last_tokens_per_s, 1),
            "last_prompt_tokens": self.stats.last_prompt_tokens,
            "last_reused_tokens": self.stats.last_reused_tokens,
        }
        model = self.config.embedded_model
        described = f"embedded llama.cpp {os.path.basename(model) if model.endswith('.gguf') else model}"
        if self._load_error is not None:
            return ModelStatus(self.name, False, self._load_error.message, self._load_error.fix, extra=extra)
        if self.model is None:
            detail = f"{described}: loading" if self._loading else f"{described}: not loaded yet"
            return ModelStatus(self.name, False, detail, extra=extra)
        busy = f", {self.pending} replies pending" if self.pending else ""
        return ModelStatus(self.name, True, f"{described}: loaded{busy}", loaded=True,
                           extra=extra)

    def stop(self) -> Deferred[None]:
        """Stop the worker thread after the current token and free the model.

        Replies still waiting fail with CancelledError. A later ``start()`` or ``chat()`` loads it again.
        """
        thread = self._thread
        if thread is None:
            return succeed(None)
        self._stopping = True
        self._thread = None
        drained: list[Any] = []
        while True:
            try:
                drained.append(self._jobs.get_nowait())
            except queue.Empty:
                break
        for item in drained:
            if isinstance(item, _Job):
                item.cancelled.set()
                self._jobs.put(item)  # the worker skips it and accounts for it (in order)
            elif isinstance(item, _Call) and not item.result.called:
                item.result.errback(LLMUnavailable("the embedded model was stopped before it loaded"))
        self._jobs.put(None)
        self._cancel_running()
        stopped: Deferred[None] = Deferred()

        def stopped_on_reactor() -> None:
            self.model = None
            self._stopping = False
            stopped.callback(None)

        def wait() -> None:
            thread.join()
            model = self.model
            close = getattr(model, "close", None)
            if close is not None:
                close()  # frees the weights and the KV cache now, not whenever the GC gets to it
            self._reactor.callFromThread(stopped_on_reactor)

        threading.Thread(target=wait, name="llm-stop", daemon=True).start()
        return stopped

    # --- more than the interface ----------------------------------------------------------------

    def when_idle(self) -> Deferred[None]:
        """Fires once no reply is generating or waiting (tests, graceful shutdown)."""
        if self.pending == 0:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    # --- the reactor side -----------------------------------------------------------------------

    async def _start(self) -> None:
        try:
            path = self._resolve_path()
            loader = self._loader or self._default_loader
            self._ensure_thread()
            loaded: Deferred[Any] = Deferred()
            self._run_in_thread(lambda: loader(path), loaded)
            model = await loaded
        except LLMError as e:
            self._load_error = e
            raise
        except Exception as e:
            self._load_error = LLMError(f"embedded model {self.config.embedded_model} did not load: {e}",
                                        fatal=True, fix="check the GGUF file (`ai-agent models verify`)")
            raise self._load_error from None
        self.model = model
        self.path = path
        self.log.info("embedded model {model} loaded from {path} (n_ctx={n_ctx}, n_threads={n_threads})",
                      model=self.config.embedded_model, path=path, n_ctx=self.n_ctx, n_threads=self.n_threads)

    def _default_loader(self, path: str) -> Any:
        from twisted_agent.providers.local.models import llama_model_params_fix

        model = load_llama(path, self.n_ctx, self.n_threads, self.prompt_cache_bytes)
        self.amx_fix = llama_model_params_fix()
        return model

    def _resolve_path(self) -> str:
        if self._model_path is not None:
            if not os.path.isfile(self._model_path):
                raise LLMModelMissing(f"no GGUF file at {self._model_path}", fix="set EMBEDDED_MODEL to a .gguf path")
            return self._model_path
        from twisted_agent.providers.local.models import ModelMissing, gguf_path, install_command

        if importlib.util.find_spec("llama_cpp") is None:  # (importing it here would load the library)
            raise LLMUnavailable("llama-cpp-python is not installed: the embedded model cannot run",
                                 fix=f"{install_command(self.config)} (or set LLM_BACKEND=ollama)")

        try:
            return gguf_path(self.config, self.config.embedded_model)
        except ModelMissing as e:
            raise LLMModelMissing(f"embedded model {e.name}: {e.detail}", fix=e.fix) from None

    async def _chat(self, messages: list[dict[str, str]], on_token: Callable[[str], None]) -> str:
        if self._stopping:
            raise LLMUnavailable("the embedded model is stopped")
        await self.start()
        if self.pending >= self.max_queue:
            raise LLMBusy(f"embedded model busy: {self.pending} replies pending (LOCAL_MAX_QUEUE={self.max_queue})")
        clock = self._reactor
        t = self.timeouts
        started = clock.seconds()
        expired: list[LLMTimeout] = []

        def cancel(_: Deferred[str]) -> None:
            job.cancelled.set()

        job = _Job(messages, on_token, Deferred(cancel))
        first_token_timer: Any = None

        def first_token_expired() -> None:
            expired.append(LLMTimeout("first token", t.first_token_s, self.name))
            job.result.cancel()

        def delivered(piece: str) -> None:
            if first_token_timer is not None and first_token_timer.active():
                first_token_timer.cancel()
            on_token(piece)

        job.on_token = delivered
        self.pending += 1
        self._jobs.put(job)
        first_token_timer = clock.callLater(t.first_token_s, first_token_expired)
        try:
            return await bounded(job.result, clock, started + t.total_s,
                                 LLMTimeout("complete reply", t.total_s, self.name))
        except CancelledError:
            job.cancelled.set()
            if expired:
                raise expired[0] from None
            raise
        except LLMTimeout:
            job.cancelled.set()
            raise
        finally:
            if first_token_timer.active():
                first_token_timer.cancel()

    def yield_to(self, busy: Deferred[Any]) -> None:
        """Pause generation between tokens until ``busy`` fires, or YIELD_MAX_S at most.

        Measured with Qwen2.5-0.5B (2 threads) generating the rest of a reply while Piper (one
        thread, nice 10) synthesized its first piece on the 2-core box: the piece took ~250-380 ms
        instead of ~120 ms. The model writes much faster than the caller listens, so the pause
        costs the caller nothing; and no other reply waits longer than YIELD_MAX_S.
        """
        self._yielding += 1
        self._may_generate.clear()
        released = False

        def release(result: Any = None) -> Any:
            nonlocal released
            if not released:
                released = True
                if timer.active():
                    timer.cancel()
                self._yielding -= 1
                if self._yielding == 0:
                    self._may_generate.set()
            return result

        timer = self._reactor.callLater(YIELD_MAX_S, release)
        busy.addBoth(release)

    def _deliver(self, job: _Job, piece: str) -> None:
        if job.result.called or job.cancelled.is_set():
            return  # cancelled while the token crossed over: the caller gets nothing more
        try:
            job.on_token(piece)
        except Exception:
            job.cancelled.set()
            if not job.result.called:
                job.result.errback(Failure())

    def _ended(self, job: _Job, text: str | None, failure: Failure | None) -> None:
        self.pending -= 1
        stats = self.stats
        if job.cancelled.is_set():
            stats.cancelled += 1
        elif failure is not None:
            stats.failures += 1
        else:
            stats.replies += 1
            if job.first_token:
                stats.last_first_token_ms = (job.first_token - job.started) * 1000
                if job.tokens > 1 and job.finished > job.first_token:
                    stats.last_tokens_per_s = (job.tokens - 1) / (job.finished - job.first_token)
            stats.last_prompt_tokens = job.prompt_tokens
            stats.last_reused_tokens = job.reused_tokens
        if not job.result.called:
            if failure is not None:
                error = failure.value
                if not isinstance(error, LLMError):
                    self.log.failure("embedded model failed a reply", failure)
                    failure = Failure(LLMError(f"embedded model failed: {error}", fatal=False))
                job.result.errback(failure)
            elif job.cancelled.is_set():
                job.result.cancel()
            else:
                job.result.callback(text or "")
        if self.pending == 0:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    def _cancel_running(self) -> None:
        for job in list(self._running):
            job.cancelled.set()

    # --- the worker thread ----------------------------------------------------------------------

    _running: list[_Job]

    def _ensure_thread(self) -> None:
        if self._thread is not None:
            return
        self._running = []
        self._thread = threading.Thread(target=self._work, name=f"llm-{self.config.embedded_model}", daemon=True)
        self._thread.start()

    def _run_in_thread(self, fn: Callable[[], Any], result: Deferred[Any]) -> None:
        """Run ``fn`` on the worker thread, between replies; ``result`` fires on the reactor thread."""
        self._jobs.put(_Call(fn, result))

    def _work(self) -> None:
        call_from_thread = self._reactor.callFromThread
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if isinstance(job, _Call):
                try:
                    value = job.fn()
                except BaseException:
                    call_from_thread(_errback, job.result, Failure())
                else:
                    call_from_thread(_callback, job.result, value)
                continue
            if job.cancelled.is_set():
                call_from_thread(self._ended, job, None, None)
                continue
            self._running.append(job)
            try:
                text = self._generate(job)
            except BaseException:
                call_from_thread(self._ended, job, None, Failure())
            else:
                call_from_thread(self._ended, job, text, None)
            finally:
                self._running.remove(job)

    def _generate(self, job: _Job) -> str:
        """Stream one reply (on the worker thread). Stops after the token during which cancel was set."""
        model = self.model
        call_from_thread = self._reactor.callFromThread
        job.started = time.monotonic()
        evaluated_before = getattr(model, "evaluated", None)
        pieces: list[str] = []
        stream = model.create_chat_completion(
            job.messages, stream=True, max_tokens=self.config.llm_max_tokens,
            temperature=self.config.llm_temperature)
        try:
            for chunk in stream:
                if job.cancelled.is_set():
                    job.tokens_after_cancel += 1
                    break
                choices = chunk.get("choices") or [{}]
                piece = (choices[0].get("delta") or {}).get("content")
                if not piece:
                    continue
                job.tokens += 1
                if not job.first_token:
                    job.first_token = time.monotonic()
                    # the prompt is in the KV cache now; what was not decoded for it was reused
                    job.prompt_tokens = int(getattr(model, "n_tokens", 0))
                    if evaluated_before is not None:
                        job.reused_tokens = max(0, job.prompt_tokens - (model.evaluated - evaluated_before))
                pieces.append(piece)
                call_from_thread(self._deliver, job, piece)
                # the next token is computed when the loop asks for it: hold it while asked to
                if not self._may_generate.is_set():
                    self.stats.yields += 1
                    self._may_generate.wait(YIELD_MAX_S)
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        job.finished = time.monotonic()
        return "".join(pieces)


@dataclass
class _Call:
    fn: Callable[[], Any]
    result: Deferred[Any]


def _callback(d: Deferred[Any], value: Any) -> None:
    d.callback(value)


def _errback(d: Deferred[Any], failure: Failure) -> None:
    d.errback(failure)
