"""`python -m batchdb` is the `batchdb` command."""

from batchdb.cli import main

main()
