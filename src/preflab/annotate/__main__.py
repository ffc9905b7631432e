"""``python -m preflab.annotate ...``: the same commands as ``preflab annotate ...``."""

if __name__ == "__main__":
    import sys

    from preflab.annotate.cli import annotate
    from preflab.command_group import run

    run(annotate, sys.argv[1:], prog_name="preflab annotate")
