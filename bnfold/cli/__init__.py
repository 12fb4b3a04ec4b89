"""The command line: commands, options, batches, configuration and all human-readable text."""

from bnfold.cli.commands import main

__all__ = ["main"]
