"""The offline model registry (names, paths, statuses), the CT2 reader/converter and the llama.cpp
safety net; ``ai-agent models install`` is tested in test_install.py.

All use small synthetic models: no pip, no network.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import struct
import sys
import types
from typing import Any

import numpy as np
import pytest

from twisted_agent.config import LocalProviderConfig
from twisted_agent.providers.local import ct2, models
from twisted_agent.providers.local.models import (
    ModelMissing,
    faster_whisper_dir,
    gguf_path,
    install_command,
    model_statuses,
    piper_voice_paths,
    whisper_path,
)


def ct2_bytes(spec: str, variables: dict[str, np.ndarray], aliases: dict[str, str] | None = None,
              version: int = 6, revision: int = 3, dtypes: dict[str, int] | None = None) -> bytes:
    """A CT2 model.bin written from the format description (independently of the reader)."""
    type_ids = {np.dtype("float32"): 0, np.dtype("int8"): 1, np.dtype("int16"): 2, np.dtype("int32"): 3,
                np.dtype("float16"): 4}

    def string(s: str) -> bytes:
        raw = s.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    out = [struct.pack("<I", version), string(spec), struct.pack("<I", revision),
           struct.pack("<I", len(variables))]
    for name, array in variables.items():
        out += [string(name), struct.pack("<B", array.ndim), *(struct.pack("<I", d) for d in array.shape)]
        type_id = (dtypes or {}).get(name, type_ids.get(array.dtype, -1))
        data = array.astype(array.dtype.newbyteorder("<")).tobytes()
        out += [struct.pack("<B", type_id), struct.pack("<I", len(data)), data]
    out.append(struct.pack("<I", len(aliases or {})))
    for alias, target in (aliases or {}).items():
        out += [string(alias), string(target)]
    return b"".join(out)


def tiny_whisper_state(seed: int = 0, d: int = 8, n_enc: int = 2, n_dec: int = 1, vocab: int = 11,
                       n_mels: int = 4, audio_ctx: int = 6, text_ctx: int = 5) -> dict[str, np.ndarray]:
    """A random state dict with openai-whisper's names and shapes (float16, as OpenAI ships them)."""
    rng = np.random.default_rng(seed)

    def r(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float16)

    state: dict[str, np.ndarray] = {
        "encoder.conv1.weight": r(d, n_mels, 3), "encoder.conv1.bias": r(d),
        "encoder.conv2.weight": r(d, d, 3), "encoder.conv2.bias": r(d),
        "encoder.positional_embedding": r(audio_ctx, d),
        "encoder.ln_post.weight": r(d), "encoder.ln_post.bias": r(d),
        "decoder.token_embedding.weight": r(vocab, d), "decoder.positional_embedding": r(text_ctx, d),
        "decoder.ln.weight": r(d), "decoder.ln.bias": r(d),
    }

    def attention(prefix: str) -> None:
        for part in ("query", "key", "value", "out"):
            state[f"{prefix}.{part}.weight"] = r(d, d)
            if part != "key":
                state[f"{prefix}.{part}.bias"] = r(d)

    def block(prefix: str, cross: bool) -> None:
        attention(f"{prefix}.attn")
        state[f"{prefix}.attn_ln.weight"], state[f"{prefix}.attn_ln.bias"] = r(d), r(d)
        if cross:
            attention(f"{prefix}.cross_attn")
            state[f"{prefix}.cross_attn_ln.weight"], state[f"{prefix}.cross_attn_ln.bias"] = r(d), r(d)
        state[f"{prefix}.mlp.0.weight"], state[f"{prefix}.mlp.0.bias"] = r(4 * d, d), r(4 * d)
        state[f"{prefix}.mlp.2.weight"], state[f"{prefix}.mlp.2.bias"] = r(d, 4 * d), r(d)
        state[f"{prefix}.mlp_ln.weight"], state[f"{prefix}.mlp_ln.bias"] = r(d), r(d)

    for i in range(n_enc):
        block(f"encoder.blocks.{i}", cross=False)
    for i in range(n_dec):
        block(f"decoder.blocks.{i}", cross=True)
    return state


def to_ct2(state: dict[str, np.ndarray], heads: int = 2) -> dict[str, np.ndarray]:
    """What CTranslate2's Whisper converter makes of ``state``: fused q/k/v (zero key bias), fused
    cross-attention k/v, gamma/beta norms, plus its scalar settings."""
    d = state["encoder.conv1.weight"].shape[0]
    zeros = np.zeros(d, np.float16)
    v: dict[str, np.ndarray] = {}

    def linear(dst: str, src: str) -> None:
        v[f"{dst}/weight"], v[f"{dst}/bias"] = state[f"{src}.weight"], state[f"{src}.bias"]

    def norm(dst: str, src: str) -> None:
        v[f"{dst}/gamma"], v[f"{dst}/beta"] = state[f"{src}.weight"], state[f"{src}.bias"]

    def block(dst: str, src: str, cross: bool) -> None:
        a = f"{src}.attn"
        v[f"{dst}/self_attention/linear_0/weight"] = np.concatenate(
            [state[f"{a}.query.weight"], state[f"{a}.key.weight"], state[f"{a}.value.weight"]])
        v[f"{dst}/self_attention/linear_0/bias"] = np.concatenate(
            [state[f"{a}.query.bias"], zeros, state[f"{a}.value.bias"]])
        linear(f"{dst}/self_attention/linear_1", f"{a}.out")
        norm(f"{dst}/self_attention/layer_norm", f"{src}.attn_ln")
        if cross:
            c = f"{src}.cross_attn"
            linear(f"{dst}/attention/linear_0", f"{c}.query")
            v[f"{dst}/attention/linear_1/weight"] = np.concatenate(
                [state[f"{c}.key.weight"], state[f"{c}.value.weight"]])
            v[f"{dst}/attention/linear_1/bias"] = np.concatenate([zeros, state[f"{c}.value.bias"]])
            linear(f"{dst}/attention/linear_2", f"{c}.out")
            norm(f"{dst}/attention/layer_norm", f"{src}.cross_attn_ln")
        linear(f"{dst}/ffn/linear_0", f"{src}.mlp.0")
        linear(f"{dst}/ffn/linear_1", f"{src}.mlp.2")
        norm(f"{dst}/ffn/layer_norm", f"{src}.mlp_ln")

    linear("encoder/conv1", "encoder.conv1")
    linear("encoder/conv2", "encoder.conv2")
    v["encoder/position_encodings/encodings"] = state["encoder.positional_embedding"]
    v["encoder/num_heads"] = np.array(heads, np.int16)
    norm("encoder/layer_norm", "encoder.ln_post")
    for name in state:
        if m := re.match(r"(encoder|decoder)\.blocks\.(\d+)\.attn\.query\.weight$", name):
            stack, i = m.groups()
            block(f"{stack}/layer_{i}", f"{stack}.blocks.{i}", cross=stack == "decoder")
    v["decoder/embeddings/weight"] = state["decoder.token_embedding.weight"]
    v["decoder/position_encodings/encodings"] = state["decoder.positional_embedding"]
    v["decoder/num_heads"] = np.array(heads, np.int16)
    v["decoder/pre_norm"] = np.array(1, np.int8)
    norm("decoder/layer_norm", "decoder.ln")
    return v




# --- CT2 reader ------------------------------------------------------------------------------

def test_reader_reads_every_dtype_shape_and_alias() -> None:
    bf16 = np.array([1.5, -2.0, 3.25], np.float32)
    variables: dict[str, np.ndarray] = {
        "a/f32": np.arange(6, dtype=np.float32).reshape(2, 3),
        "a/f16": np.array([[0.5, -1.0]], np.float16),
        "b/i8": np.array([-3, 4], np.int8),
        "b/i16": np.array(7, np.int16),  # a scalar: rank 0
        "b/i32": np.array([1, 2, 3, 70000], np.int32),
        "c/bf16": (bf16.view(np.uint32) >> 16).astype(np.uint16),
    }
    blob = ct2_bytes("TestSpec", variables, aliases={"c/tied": "a/f32"}, dtypes={"c/bf16": 5})
    model = ct2.parse_model_bin(blob)
    assert (model.version, model.spec, model.revision) == (6, "TestSpec", 3)
    for name in ("a/f32", "a/f16", "b/i8", "b/i16", "b/i32"):
        assert model.variables[name].dtype == variables[name].dtype
        assert model.variables[name].shape == variables[name].shape
        np.testing.assert_array_equal(model.variables[name], variables[name])
    assert model.variables["c/bf16"].dtype == np.float32
    np.testing.assert_array_equal(model.variables["c/bf16"], bf16)
    assert model.aliases == {"c/tied": "a/f32"}
    np.testing.assert_array_equal(model["c/tied"], variables["a/f32"])


@pytest.mark.parametrize("mangle, message", [
    (lambda b: b[:-3], "truncated|unexpected|alias"),
    (lambda b: b + b"\0", "unexpected bytes"),
    (lambda b: struct.pack("<I", 2) + b[4:], "unsupported CTranslate2 binary version 2"),
    (lambda b: b"", "truncated"),
])
def test_reader_rejects_damaged_files(mangle: Any, message: str) -> None:
    blob = ct2_bytes("TestSpec", {"w": np.ones((2, 2), np.float32)}, aliases={"v": "w"})
    with pytest.raises(ct2.CT2FormatError, match=message):
        ct2.parse_model_bin(mangle(blob))


def test_reader_rejects_unknown_dtype_and_wrong_byte_count() -> None:
    with pytest.raises(ct2.CT2FormatError, match="unknown CTranslate2 dtype id 9"):
        ct2.parse_model_bin(ct2_bytes("S", {"w": np.ones(2, np.float32)}, dtypes={"w": 9}))
    with pytest.raises(ct2.CT2FormatError, match="bytes for shape"):  # 8 bytes declared as float16[2]
        ct2.parse_model_bin(ct2_bytes("S", {"w": np.ones(2, np.float32)}, dtypes={"w": 4}))


def test_reader_reads_a_file(tmp_path: Any) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(ct2_bytes("S", {"w": np.arange(3, dtype=np.int32)}))
    np.testing.assert_array_equal(ct2.read_model_bin(str(path)).variables["w"], [0, 1, 2])


# --- Whisper conversion (numpy level: no torch) ----------------------------------------------

def test_whisper_state_inverts_ct2s_fusion_exactly() -> None:
    state = tiny_whisper_state()
    model = ct2.parse_model_bin(ct2_bytes(
        "WhisperSpec", to_ct2(state), aliases={"decoder/projection/weight": "decoder/embeddings/weight"}))
    dims, converted = ct2.whisper_state(model)
    assert dims == {"n_mels": 4, "n_audio_ctx": 6, "n_audio_state": 8, "n_audio_head": 2, "n_audio_layer": 2,
                    "n_vocab": 11, "n_text_ctx": 5, "n_text_state": 8, "n_text_head": 2, "n_text_layer": 1}
    assert sorted(converted) == sorted(state)
    for name, array in state.items():
        assert converted[name].dtype == np.float16, name
        np.testing.assert_array_equal(converted[name], array, err_msg=name)


def test_whisper_conversion_refuses_what_it_would_lose() -> None:
    state = tiny_whisper_state()
    bad_bias = to_ct2(state)
    bad_bias["encoder/layer_1/self_attention/linear_0/bias"][8 + 3] = 1.0  # inside the key slice
    with pytest.raises(ct2.WhisperConversionError, match="layer_1/self_attention: the key bias is not zero"):
        ct2.whisper_state(ct2.parse_model_bin(ct2_bytes("WhisperSpec", bad_bias)))

    extra = to_ct2(state) | {"decoder/layer_0/gate/weight": np.ones((2, 2), np.float16)}
    with pytest.raises(ct2.WhisperConversionError, match="no openai-whisper counterpart: decoder/layer_0/gate"):
        ct2.whisper_state(ct2.parse_model_bin(ct2_bytes("WhisperSpec", extra)))

    untied = ct2_bytes("WhisperSpec", to_ct2(state) | {"other": np.ones(1, np.float16)},
                       aliases={"decoder/projection/weight": "other"})
    with pytest.raises(ct2.WhisperConversionError, match="not tied"):
        ct2.whisper_state(ct2.parse_model_bin(untied))

    with pytest.raises(ct2.WhisperConversionError, match="spec is 'TransformerSpec'"):
        ct2.whisper_state(ct2.parse_model_bin(ct2_bytes("TransformerSpec", to_ct2(state))))

    gap = {k: a for k, a in to_ct2(tiny_whisper_state(n_enc=3)).items() if not k.startswith("encoder/layer_1/")}
    with pytest.raises(ct2.WhisperConversionError, match=r"encoder layers .* \[0, 2\]"):
        ct2.whisper_state(ct2.parse_model_bin(ct2_bytes("WhisperSpec", gap)))


def test_converted_checkpoint_loads_strictly_into_openai_whisper() -> None:
    torch = pytest.importorskip("torch")
    whisper_model = pytest.importorskip("whisper.model")
    state = tiny_whisper_state()
    blob = ct2_bytes("WhisperSpec", to_ct2(state), aliases={"decoder/projection/weight": "decoder/embeddings/weight"})
    checkpoint = ct2.convert_whisper(ct2.parse_model_bin(blob), alignment_heads=[[0, 1]])
    assert checkpoint["alignment_heads"] == [[0, 1]]
    model = whisper_model.Whisper(whisper_model.ModelDimensions(**checkpoint["dims"]))
    model.load_state_dict(checkpoint["model_state_dict"])  # strict: every name and shape must match
    np.testing.assert_array_equal(model.decoder.blocks[0].cross_attn.value.bias.detach().numpy(),
                                  state["decoder.blocks.0.cross_attn.value.bias"])
    # the bytes: the same weights make the same file, whatever the temporary file was called
    assert ct2.checkpoint_bytes(checkpoint) == ct2.checkpoint_bytes(ct2.convert_whisper(ct2.parse_model_bin(blob),
                                                                                        [[0, 1]]))
    loaded = torch.load(io.BytesIO(ct2.checkpoint_bytes(checkpoint)), weights_only=True)
    assert loaded["dims"] == checkpoint["dims"]


# --- name resolution -------------------------------------------------------------------------

def put(config: LocalProviderConfig, relative: str, data: bytes = b"x") -> str:
    path = models.models_path(config, relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_whisper_names_resolve_to_installed_checkpoints_only(models_config: LocalProviderConfig) -> None:
    with pytest.raises(ModelMissing) as missing:
        whisper_path(models_config, "tiny.en")
    assert missing.value.fix == install_command(models_config)
    assert models_config.models_dir in missing.value.detail
    pt = put(models_config, "whisper/tiny.en.pt")
    with pytest.raises(ModelMissing):  # converted but never recorded: an interrupted install
        whisper_path(models_config, "tiny.en")
    put(models_config, "whisper/tiny.en.pt.sha256")
    assert whisper_path(models_config, "tiny.en") == pt
    assert os.path.isabs(pt)


@pytest.mark.parametrize("name", ["small", "medium.en", "large-v3", "turbo", "base.en", "tiny"])
def test_whisper_names_that_would_download_are_refused(models_config: LocalProviderConfig, name: str) -> None:
    for resolve in (whisper_path, faster_whisper_dir):
        with pytest.raises(ModelMissing, match="download") as refused:
            resolve(models_config, name)
        assert "tiny.en, base" in refused.value.fix


def test_download_names_cover_openai_whispers_own_list() -> None:
    whisper = pytest.importorskip("whisper")
    assert set(whisper._MODELS) <= models.WHISPER_DOWNLOAD_NAMES


def test_whisper_paths_are_taken_as_given(models_config: LocalProviderConfig, tmp_path: Any,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mine.pt").write_bytes(b"x")
    assert whisper_path(models_config, str(tmp_path / "mine.pt")) == str(tmp_path / "mine.pt")
    monkeypatch.chdir(tmp_path)
    assert whisper_path(models_config, "mine.pt") == str(tmp_path / "mine.pt")  # absolute: never a name
    with pytest.raises(ModelMissing, match="does not exist"):
        whisper_path(models_config, str(tmp_path / "other.pt"))
    with pytest.raises(ModelMissing, match="not a known Whisper model"):
        whisper_path(models_config, "tiny-en")


def test_faster_whisper_dir(models_config: LocalProviderConfig, tmp_path: Any) -> None:
    with pytest.raises(ModelMissing, match=r"missing faster-whisper/tiny\.en/model\.bin"):
        faster_whisper_dir(models_config, "tiny.en")
    for f in models.MODELS["tiny.en"].files:
        put(models_config, f.name, b"\0" * f.size)
    assert faster_whisper_dir(models_config, "tiny.en") == os.path.join(models_config.models_dir, "faster-whisper",
                                                                       "tiny.en")
    (tmp_path / "ct2").mkdir()
    with pytest.raises(ModelMissing, match=r"no model\.bin"):
        faster_whisper_dir(models_config, str(tmp_path / "ct2"))
    (tmp_path / "ct2" / "model.bin").write_bytes(b"x")
    assert faster_whisper_dir(models_config, str(tmp_path / "ct2")) == str(tmp_path / "ct2")


def test_gguf_names_aliases_and_paths(models_config: LocalProviderConfig, tmp_path: Any) -> None:
    with pytest.raises(ModelMissing) as missing:
        gguf_path(models_config, "qwen")
    assert (missing.value.name, missing.value.fix) == ("qwen2.5-0.5b", install_command(models_config))
    spec = models.MODELS["smollm2-135m"]
    put(models_config, spec.files[0].name, b"short")  # a partial copy is not installed
    with pytest.raises(ModelMissing):
        gguf_path(models_config, "smollm2")
    path = put(models_config, spec.files[0].name, b"\0" * spec.files[0].size)
    assert gguf_path(models_config, "smollm2") == gguf_path(models_config, "smollm2-135m") == path
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert gguf_path(models_config, str(tmp_path / "m.gguf")) == str(tmp_path / "m.gguf")
    with pytest.raises(ModelMissing, match="not a known embedded language model"):
        gguf_path(models_config, "qwen2.5:0.5b")  # an Ollama tag, not a file


def test_piper_voice_paths(models_config: LocalProviderConfig, tmp_path: Any) -> None:
    with pytest.raises(ModelMissing) as missing:
        piper_voice_paths(models_config, "en_US-joe-medium")
    assert missing.value.fix == install_command(models_config)
    for f in models.MODELS["en_US-joe-medium"].files:
        put(models_config, f.name, b"\0" * f.size)
    onnx, config_json = piper_voice_paths(models_config, "en_US-joe-medium")
    assert (onnx + ".json") == config_json and onnx.startswith(models_config.models_dir)
    (tmp_path / "v.onnx").write_bytes(b"x")
    with pytest.raises(ModelMissing, match=r"v.onnx.json does not exist"):
        piper_voice_paths(models_config, str(tmp_path / "v.onnx"))
    (tmp_path / "v.onnx.json").write_bytes(b"{}")
    assert piper_voice_paths(models_config, str(tmp_path / "v.onnx")) == (str(tmp_path / "v.onnx"),
                                                                         str(tmp_path / "v.onnx.json"))


def test_statuses_say_what_is_missing_and_the_fix(models_config: LocalProviderConfig, tmp_path: Any) -> None:
    statuses = model_statuses(models_config)
    assert set(statuses) == set(models.MODELS)
    assert not any(s.ready for s in statuses.values())
    assert statuses["tiny.en"].fix == install_command(models_config)
    assert statuses["tiny.en"].extra["configured"] == "WHISPER_MODEL"
    assert statuses["en_US-joe-medium"].extra["configured"] == "TTS_VOICE"
    assert statuses["base"].extra["configured"] == ""

    (tmp_path / "own.gguf").write_bytes(b"GGUF1234")
    config = dataclasses.replace(models_config, stt_model="large-v3", embedded_model=str(tmp_path / "own.gguf"))
    statuses = model_statuses(config)
    assert not statuses["large-v3"].ready and "download" in statuses["large-v3"].detail
    own = statuses[str(tmp_path / "own.gguf")]
    assert own.ready and own.extra["bytes"] == 8 and own.extra["configured"] == "EMBEDDED_MODEL"


# --- llama.cpp runtime safety net ------------------------------------------------------------

@pytest.fixture
def models_fake_llama(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    top = types.ModuleType("llama_cpp")
    low = types.ModuleType("llama_cpp.llama_cpp")

    def default_params() -> types.SimpleNamespace:
        return types.SimpleNamespace(use_extra_bufts=True, n_gpu_layers=0)

    low.llama_model_default_params = default_params  # type: ignore[attr-defined]
    top.llama_model_default_params = default_params  # type: ignore[attr-defined]
    top.llama_cpp = low  # type: ignore[attr-defined]
    top.llama_print_system_info = lambda: b"CPU : AVX2 = 1 | AMX_INT8 = 1 | "  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "llama_cpp", top)
    monkeypatch.setitem(sys.modules, "llama_cpp.llama_cpp", low)
    return top


def test_llama_fix_turns_off_extra_buffer_types_on_amx_builds(models_fake_llama: Any) -> None:
    assert models.llama_has_amx()
    assert models.llama_model_params_fix()
    assert models_fake_llama.llama_cpp.llama_model_default_params().use_extra_bufts is False
    assert models_fake_llama.llama_model_default_params().use_extra_bufts is False
    wrapped = models_fake_llama.llama_cpp.llama_model_default_params
    assert models.llama_model_params_fix()  # idempotent: not wrapped twice
    assert models_fake_llama.llama_cpp.llama_model_default_params is wrapped


def test_llama_fix_leaves_portable_builds_alone(models_fake_llama: Any) -> None:
    models_fake_llama.llama_print_system_info = lambda: b"CPU : AVX2 = 1 | REPACK = 1 | "
    assert not models.llama_model_params_fix()
    assert models_fake_llama.llama_cpp.llama_model_default_params().use_extra_bufts is True
    assert models.llama_model_params_fix(force=True)
    assert models_fake_llama.llama_cpp.llama_model_default_params().use_extra_bufts is False


def test_llama_fix_without_llama_cpp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    assert models.llama_model_params_fix(force=True) is False
    assert models.llama_has_amx() is False
