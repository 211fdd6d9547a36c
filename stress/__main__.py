"""``python -m stress``: the ``stress`` command, for environments where the script is not on PATH."""

from .cli import main

main()
