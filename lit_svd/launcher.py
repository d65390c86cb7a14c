"""The ``lightning`` console command: ``lightning run SCRIPT [--devices N --strategy …] [script args]``.

Lightning 2.6 ships no ``lightning`` command; its script launcher is ``fabric run``. This entry point *is*
that launcher (``lightning.fabric.cli``), so ``lightning run`` accepts exactly ``fabric run``'s options
and starts the script through ``torchrun`` on the requested devices; ``lit_svd.cli`` then hands the
chosen accelerator/strategy/devices/precision to the recipe's Trainer.
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``lightning`` console script."""
    from lightning.fabric.cli import _main

    _main(args=argv, prog_name="lightning")


if __name__ == "__main__":
    main()
