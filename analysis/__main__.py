"""`python -m analysis`: see analysis/cli.py."""

from analysis.cli import main

main()
