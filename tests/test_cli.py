import subprocess
import sys

from preflab.cli import COMMANDS, main


def test_import_preflab_does_not_import_torch():
    code = "import sys, preflab, preflab.cli, preflab.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_help_lists_every_command(capsys):
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code in (0, None)
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out
