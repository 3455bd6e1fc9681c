"""Session and call-history store: in memory (default) or Redis (txredisapi)."""
