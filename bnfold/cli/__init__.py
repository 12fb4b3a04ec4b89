"""The command line: commands, options, batch planning and all human-readable text."""

from bnfold.cli.commands import main

__all__ = ["main"]
