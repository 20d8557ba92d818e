"""Training, evaluation and I/O utilities."""
