"""Per-call sessions: the call registry, state machine, turn-taking, playback, barge-in."""
