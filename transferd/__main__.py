"""`python -m transferd` runs the CLI."""

from transferd.cli import main

if __name__ == "__main__":
    main()
