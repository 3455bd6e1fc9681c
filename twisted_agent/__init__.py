"""twisted-agent: an AI voice agent for Asterisk and FreePBX, built on Twisted."""

__version__ = "0.1.0"
