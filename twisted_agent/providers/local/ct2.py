"""CTranslate2 ``model.bin`` reader, and the CT2 Whisper -> openai-whisper checkpoint converter.

No registry ships Whisper in openai-whisper's ``.pt`` format, but several ship the CTranslate2
(faster-whisper) float16 conversion of OpenAI's MIT weights. The CT2 file is a header followed by
named tensors, so the conversion is a renaming, plus splitting CT2's fused attention projections
back into query/key/value. It is exact: openai-whisper on the converted checkpoint transcribes
word for word as faster-whisper does on the CT2 directory (shared/reference/OFFLINE_MODELS.md).

The reader and :func:`whisper_state` need only numpy (the arrays are zero-copy views of the
file's bytes); torch is imported inside :func:`convert_whisper` and :func:`checkpoint_bytes` only,
so importing this module stays cheap.

Binary format, versions 4-6 (all little-endian; a string is a uint16 length that counts a
trailing NUL, then the UTF-8 bytes and the NUL)::

    uint32 binary version
    string spec name ("WhisperSpec"), uint32 spec revision
    uint32 variable count, then per variable:
        string name, uint8 rank, uint32 dims[rank], uint8 dtype, uint32 byte count, bytes
    uint32 alias count, then per alias: string alias, string variable name
"""

from __future__ import annotations

import importlib
import io
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

#: CT2 DataType enum (include/ctranslate2/types.h) -> numpy dtype; 5 is bfloat16, which numpy lacks.
_DTYPES: dict[int, np.dtype[Any]] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
}
_BFLOAT16 = 5
SUPPORTED_VERSIONS = range(4, 7)


class CT2FormatError(ValueError):
    """The bytes are not a CTranslate2 model.bin this reader understands."""


@dataclass(frozen=True)
class CT2Model:
    version: int
    spec: str
    revision: int
    variables: dict[str, npt.NDArray[Any]]
    #: alias -> name of the variable it shares storage with (CT2 stores duplicates once)
    aliases: dict[str, str]

    def __getitem__(self, name: str) -> npt.NDArray[Any]:
        return self.variables[self.aliases.get(name, name)]


class _Cursor:
    def __init__(self, data: bytes | memoryview) -> None:
        self.data = memoryview(data).cast("B")
        self.offset = 0

    def take(self, count: int, what: str) -> memoryview:
        end = self.offset + count
        if end > len(self.data):
            raise CT2FormatError(f"truncated model.bin: {what} needs {count} bytes at offset {self.offset}, "
                                 f"the file has {len(self.data)}")
        view = self.data[self.offset:end]
        self.offset = end
        return view

    def unpack(self, fmt: str, what: str) -> int:
        value: int = struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))[0]
        return value

    def string(self, what: str) -> str:
        length = self.unpack("H", what)
        if length == 0:
            raise CT2FormatError(f"empty string for {what} at offset {self.offset}")
        raw = self.take(length, what)
        if raw[-1] != 0:
            raise CT2FormatError(f"{what} at offset {self.offset - length} is not NUL-terminated")
        return bytes(raw[:-1]).decode("utf-8")


def parse_model_bin(data: bytes | memoryview) -> CT2Model:
    """Parse a whole CT2 ``model.bin``; the arrays are read-only views into ``data``."""
    cur = _Cursor(data)
    version = cur.unpack("I", "binary version")
    if version not in SUPPORTED_VERSIONS:
        raise CT2FormatError(f"unsupported CTranslate2 binary version {version} "
                             f"(this reader knows {SUPPORTED_VERSIONS.start}-{SUPPORTED_VERSIONS.stop - 1})")
    spec = cur.string("spec name")
    revision = cur.unpack("I", "spec revision")
    variables: dict[str, npt.NDArray[Any]] = {}
    for _ in range(cur.unpack("I", "variable count")):
        name = cur.string("variable name")
        rank = cur.unpack("B", f"rank of {name}")
        shape = tuple(cur.unpack("I", f"shape of {name}") for _ in range(rank))
        type_id = cur.unpack("B", f"dtype of {name}")
        nbytes = cur.unpack("I", f"size of {name}")
        raw = cur.take(nbytes, f"data of {name}")
        variables[name] = _array(name, raw, type_id, shape)
    aliases: dict[str, str] = {}
    for _ in range(cur.unpack("I", "alias count")):
        alias = cur.string("alias")
        aliases[alias] = cur.string(f"target of alias {alias}")
    if cur.offset != len(cur.data):
        raise CT2FormatError(f"{len(cur.data) - cur.offset} unexpected bytes after the aliases")
    missing = sorted(target for target in aliases.values() if target not in variables)
    if missing:
        raise CT2FormatError(f"aliases point at missing variables: {', '.join(missing)}")
    return CT2Model(version, spec, revision, variables, aliases)


def _array(name: str, raw: memoryview, type_id: int, shape: tuple[int, ...]) -> npt.NDArray[Any]:
    count = int(np.prod(shape, dtype=np.int64))
    if type_id == _BFLOAT16:
        if len(raw) != 2 * count:
            raise CT2FormatError(f"{name}: {len(raw)} bytes for {count} bfloat16 values")
        # bfloat16 is the top half of a float32: widen exactly
        return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    dtype = _DTYPES.get(type_id)
    if dtype is None:
        raise CT2FormatError(f"{name}: unknown CTranslate2 dtype id {type_id}")
    if len(raw) != dtype.itemsize * count:
        raise CT2FormatError(f"{name}: {len(raw)} bytes for shape {shape} of {dtype.name}")
    return np.frombuffer(raw, dtype).reshape(shape)


def read_model_bin(path: str) -> CT2Model:
    with open(path, "rb") as f:
        return parse_model_bin(f.read())


# --- Whisper ---------------------------------------------------------------------------------

WHISPER_SPEC = "WhisperSpec"


class WhisperConversionError(ValueError):
    """The CT2 model is not a Whisper model this converter can map onto openai-whisper."""


def _layer_count(variables: Mapping[str, Any], stack: str) -> int:
    pattern = re.compile(rf"{stack}/layer_(\d+)/")
    indices = {int(m.group(1)) for name in variables if (m := pattern.match(name))}
    if not indices or indices != set(range(len(indices))):
        raise WhisperConversionError(f"{stack} layers are missing or not numbered 0..n-1: {sorted(indices)}")
    return len(indices)


def whisper_state(model: CT2Model) -> tuple[dict[str, int], dict[str, npt.NDArray[Any]]]:
    """openai-whisper's ``dims`` and ``model_state_dict`` (as numpy arrays) from a CT2 Whisper model.

    Pure numpy, so it can be checked without torch. The arrays keep CT2's dtype (float16 for the
    packaged models, as in OpenAI's own checkpoints); scalars such as ``num_heads`` go to ``dims``.
    """
    if model.spec != WHISPER_SPEC:
        raise WhisperConversionError(f"spec is {model.spec!r}, not {WHISPER_SPEC}")
    n_enc = _layer_count(model.variables, "encoder")
    n_dec = _layer_count(model.variables, "decoder")
    used: set[str] = set()
    state: dict[str, npt.NDArray[Any]] = {}

    def v(name: str) -> npt.NDArray[Any]:
        try:
            array = model[name]
        except KeyError:
            raise WhisperConversionError(f"the CT2 model has no {name}") from None
        used.add(model.aliases.get(name, name))
        return array

    width = int(v("encoder/conv1/weight").shape[0])
    text_width = int(v("decoder/embeddings/weight").shape[1])

    def copy(dst: str, src: str) -> None:
        state[dst] = v(src)

    def linear(dst: str, src: str) -> None:
        copy(f"{dst}.weight", f"{src}/weight")
        copy(f"{dst}.bias", f"{src}/bias")

    def norm(dst: str, src: str) -> None:
        copy(f"{dst}.weight", f"{src}/gamma")
        copy(f"{dst}.bias", f"{src}/beta")

    def zero_key_bias(bias: npt.NDArray[Any], where: str) -> None:
        # openai-whisper's key projection has no bias; CT2 fuses it in as zeros. Anything else
        # would be silently lost, so refuse.
        if np.any(bias):
            raise WhisperConversionError(f"{where}: the key bias is not zero; openai-whisper has none")

    def self_attention(dst: str, src: str, d: int) -> None:
        weight, bias = v(f"{src}/linear_0/weight"), v(f"{src}/linear_0/bias")
        if weight.shape[0] != 3 * d:
            raise WhisperConversionError(f"{src}: fused qkv has {weight.shape[0]} rows, expected {3 * d}")
        state[f"{dst}.query.weight"], state[f"{dst}.query.bias"] = weight[:d], bias[:d]
        state[f"{dst}.key.weight"] = weight[d:2 * d]
        zero_key_bias(bias[d:2 * d], src)
        state[f"{dst}.value.weight"], state[f"{dst}.value.bias"] = weight[2 * d:], bias[2 * d:]
        linear(f"{dst}.out", f"{src}/linear_1")

    def cross_attention(dst: str, src: str, d: int) -> None:
        linear(f"{dst}.query", f"{src}/linear_0")
        weight, bias = v(f"{src}/linear_1/weight"), v(f"{src}/linear_1/bias")
        if weight.shape[0] != 2 * d:
            raise WhisperConversionError(f"{src}: fused kv has {weight.shape[0]} rows, expected {2 * d}")
        state[f"{dst}.key.weight"] = weight[:d]
        zero_key_bias(bias[:d], src)
        state[f"{dst}.value.weight"], state[f"{dst}.value.bias"] = weight[d:], bias[d:]
        linear(f"{dst}.out", f"{src}/linear_2")

    def mlp(dst: str, src: str) -> None:
        linear(f"{dst}.mlp.0", f"{src}/ffn/linear_0")
        linear(f"{dst}.mlp.2", f"{src}/ffn/linear_1")
        norm(f"{dst}.mlp_ln", f"{src}/ffn/layer_norm")

    linear("encoder.conv1", "encoder/conv1")
    linear("encoder.conv2", "encoder/conv2")
    copy("encoder.positional_embedding", "encoder/position_encodings/encodings")
    for i in range(n_enc):
        dst, src = f"encoder.blocks.{i}", f"encoder/layer_{i}"
        self_attention(f"{dst}.attn", f"{src}/self_attention", width)
        norm(f"{dst}.attn_ln", f"{src}/self_attention/layer_norm")
        mlp(dst, src)
    norm("encoder.ln_post", "encoder/layer_norm")

    copy("decoder.token_embedding.weight", "decoder/embeddings/weight")
    copy("decoder.positional_embedding", "decoder/position_encodings/encodings")
    for i in range(n_dec):
        dst, src = f"decoder.blocks.{i}", f"decoder/layer_{i}"
        self_attention(f"{dst}.attn", f"{src}/self_attention", text_width)
        norm(f"{dst}.attn_ln", f"{src}/self_attention/layer_norm")
        cross_attention(f"{dst}.cross_attn", f"{src}/attention", text_width)
        norm(f"{dst}.cross_attn_ln", f"{src}/attention/layer_norm")
        mlp(dst, src)
    norm("decoder.ln", "decoder/layer_norm")
    # openai-whisper ties the output projection to the token embedding; CT2 stores it as an alias
    # of the same tensor. A projection of its own would be a model openai-whisper cannot express.
    if model.aliases.get("decoder/projection/weight", "decoder/embeddings/weight") != "decoder/embeddings/weight":
        raise WhisperConversionError("decoder/projection/weight is not tied to decoder/embeddings/weight")

    dims = {
        "n_mels": int(v("encoder/conv1/weight").shape[1]),
        "n_audio_ctx": int(v("encoder/position_encodings/encodings").shape[0]),
        "n_audio_state": width,
        "n_audio_head": int(v("encoder/num_heads")),
        "n_audio_layer": n_enc,
        "n_vocab": int(v("decoder/embeddings/weight").shape[0]),
        "n_text_ctx": int(v("decoder/position_encodings/encodings").shape[0]),
        "n_text_state": text_width,
        "n_text_head": int(v("decoder/num_heads")),
        "n_text_layer": n_dec,
    }
    # Every tensor must land somewhere: an unmapped one is a layout this converter does not know,
    # and dropping it would give a model that loads and then talks nonsense. Scalars are CT2
    # settings (pre_norm, activation, ...) that openai-whisper hard-codes.
    unmapped = sorted(name for name, array in model.variables.items() if array.ndim > 0 and name not in used)
    if unmapped:
        raise WhisperConversionError(f"tensors with no openai-whisper counterpart: {', '.join(unmapped)}")
    return dims, state


def convert_whisper(model: CT2Model, alignment_heads: list[list[int]] | None = None) -> dict[str, Any]:
    """The openai-whisper checkpoint dict: ``{"dims", "model_state_dict"}`` of torch tensors.

    ``alignment_heads`` (from the CT2 ``config.json``: ``[[layer, head], ...]``) is stored under
    its own key for word timestamps; ``whisper.load_model`` ignores keys it does not know.
    """
    torch = _torch()
    dims, arrays = whisper_state(model)
    checkpoint: dict[str, Any] = {
        "dims": dims,
        "model_state_dict": {name: _tensor(torch, a) for name, a in arrays.items()},
    }
    if alignment_heads is not None:
        checkpoint["alignment_heads"] = [[int(layer), int(head)] for layer, head in alignment_heads]
    return checkpoint


def _torch() -> Any:
    # imported here, and through importlib so type checking does not need torch installed
    return importlib.import_module("torch")


def _tensor(torch: Any, array: npt.NDArray[Any]) -> Any:
    # copy: the arrays are read-only views of the file's bytes, and torch wants owned memory
    return torch.from_numpy(np.array(array, copy=True))


def checkpoint_bytes(checkpoint: dict[str, Any]) -> bytes:
    """``torch.save`` into memory: the archive's inner name is then fixed ("archive"), not taken
    from a temporary file name, so the same weights give the same bytes with the same torch."""
    buffer = io.BytesIO()
    _torch().save(checkpoint, buffer)
    return buffer.getvalue()
