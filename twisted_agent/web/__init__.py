"""The engine's web site: /health, /live, /ready; later /metrics and the admin UI."""
