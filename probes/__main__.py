"""`python -m probes`: see probes/cli.py."""

from probes.cli import main

main()
