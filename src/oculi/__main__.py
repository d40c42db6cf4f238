"""``python -m oculi``: the same as the ``oculi`` command."""

from oculi.cli import main

if __name__ == "__main__":
    main()
