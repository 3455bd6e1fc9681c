"""Media plane: RTP (UDP) and AudioSocket (TCP) endpoints, codecs, pacing, VAD."""
