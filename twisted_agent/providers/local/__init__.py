"""The local, offline pipeline: Whisper (speech to text) -> a language model -> Piper (text to speech)."""
