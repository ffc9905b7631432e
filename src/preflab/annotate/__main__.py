"""``python -m preflab.annotate ...``: the same commands as ``preflab annotate ...``."""

from preflab.cli import main

if __name__ == "__main__":
    import sys

    main(["annotate", *sys.argv[1:]])
