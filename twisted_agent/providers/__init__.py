"""Conversation providers: local pipeline (STT, LLM, TTS), Deepgram Voice Agent, OpenAI Realtime."""
