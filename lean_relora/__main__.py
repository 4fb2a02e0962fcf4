"""`python -m lean_relora`: the command line (cli/app.py), also how torchrun starts each rank."""

from lean_relora.cli.app import main

main()
