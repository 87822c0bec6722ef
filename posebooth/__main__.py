"""``python -m posebooth``: the same as the ``posebooth`` command."""

from posebooth.cli import main

main()
