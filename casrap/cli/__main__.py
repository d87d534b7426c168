"""``python -m casrap.cli``: the same entry point as the ``casrap`` console script."""

from casrap.cli import main

main()
