"""`python -m batchdb.workers`: the same as `batchdb worker`."""

from batchdb.cli import main

if __name__ == "__main__":
    main(["worker", *__import__("sys").argv[1:]])
