"""``python -m bnfold`` runs the command line."""

from bnfold.cli.commands import main

if __name__ == "__main__":
    main()
