"""``python -m fedlm.cli``: the command line."""

from fedlm.cli.main import main

main()
