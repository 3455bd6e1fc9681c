"""The language model of the local pipeline, behind :class:`~..interfaces.ILanguageModel`.

Backends: :class:`OllamaLLM` (an Ollama server, NDJSON streaming), :class:`OpenAICompatibleLLM`
(any ``/v1/chat/completions`` server, SSE streaming: llama.cpp's, vLLM …), :class:`EmbeddedLLM`
(llama-cpp-python with a GGUF on a worker thread), and :class:`AutoLLM` (Ollama when it has the
model, else embedded). :func:`make_llm` builds the one ``LLM_BACKEND`` names.
"""

from twisted_agent.providers.local.llm.auto import AutoLLM, make_llm
from twisted_agent.providers.local.llm.embedded import EmbeddedLLM
from twisted_agent.providers.local.llm.errors import (
    LLMBusy,
    LLMError,
    LLMModelMissing,
    LLMStreamError,
    LLMTimeout,
    LLMUnavailable,
)
from twisted_agent.providers.local.llm.remote import (
    LLMTimeouts,
    OllamaLLM,
    OllamaReplyParser,
    OpenAICompatibleLLM,
    OpenAIReplyParser,
)

__all__ = [
    "AutoLLM",
    "EmbeddedLLM",
    "LLMBusy",
    "LLMError",
    "LLMModelMissing",
    "LLMStreamError",
    "LLMTimeout",
    "LLMTimeouts",
    "LLMUnavailable",
    "OllamaLLM",
    "OllamaReplyParser",
    "OpenAICompatibleLLM",
    "OpenAIReplyParser",
    "make_llm",
]
