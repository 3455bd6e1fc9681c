"""ARI control plane: REST over treq, events over an Autobahn WebSocket, typed events."""
