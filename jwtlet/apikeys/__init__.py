"""API keys: their format, and checking a presented key against the store."""
