"""One script per DVC stage; run from the repository root as ``python -m stages.<name>``."""
