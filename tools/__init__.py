"""Small command-line helpers (run as python -m tools.<name>)."""
