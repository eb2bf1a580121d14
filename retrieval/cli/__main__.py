"""`python -m retrieval.cli`: the `retrieve` command."""

from . import main

main()
