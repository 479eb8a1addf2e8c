"""``python -m fetchpool``: the same as the ``fetchpool`` command."""

from fetchpool.cli import main

if __name__ == "__main__":
    main()
