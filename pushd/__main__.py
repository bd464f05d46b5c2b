"""`python -m pushd ...`: the `pushd` command (pushd.command)."""

from pushd.command import main

main()
