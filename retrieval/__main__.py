"""`python -m retrieval`: the `retrieve` command."""

from .cli import main

main()
