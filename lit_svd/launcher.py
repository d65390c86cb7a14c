"""The ``lightning`` console command: ``lightning run [--devices N --strategy …] SCRIPT [script args]``.

Lightning 2.6 ships no ``lightning`` command; its script launcher is ``fabric run``. ``lightning run`` takes
exactly ``fabric run``'s options (``--accelerator``, ``--strategy``, ``--devices``, ``--num-nodes``,
``--node-rank``, ``--main-address``, ``--main-port``, ``--precision``; validated by the same click
definitions) and hands them to the script in the ``LT_*`` environment variables that ``lit_svd.cli`` turns
into Trainer settings. Where it differs from ``fabric run``:

- one process (one device, one node) runs the script right here, without ``torchrun``: no rendezvous
  port, no elastic-agent banner around an error, and the script's own last line (``error: …`` for a
  recipe) is the last line of output;
- several processes go through ``torchrun`` as before; on one node a free rendezvous port is picked
  unless ``--main-port`` is given (two runs on one machine do not collide on port 29400), and a failed
  worker ends the output with the worker's own message instead of the ``ChildFailedError`` report;
- ``--help`` after the script is the script's help (a recipe's LightningCLI options), ``--help`` before it
  the launcher's.
"""

from __future__ import annotations

import logging
import os
import runpy
import sys
from argparse import Namespace
from pathlib import Path
from typing import Any

__all__ = ["main", "split_script_args"]

# fabric run's options that take a value, in every spelling it accepts
_VALUE_OPTIONS = frozenset(
    {
        "--accelerator",
        "--strategy",
        "--devices",
        "--num-nodes",
        "--num_nodes",
        "--node-rank",
        "--node_rank",
        "--main-address",
        "--main_address",
        "--main-port",
        "--main_port",
        "--precision",
    }
)


def _launcher_option(arg: str) -> bool:
    return arg in _VALUE_OPTIONS or arg.split("=", 1)[0] in _VALUE_OPTIONS and "=" in arg


def split_script_args(args: list[str]) -> tuple[list[str], list[str]]:
    """Split ``run``'s arguments into the launcher's (options + SCRIPT) and the script's.

    Launcher options may come before or after SCRIPT (as with ``fabric run``); no recipe option has one of
    their names. Everything else after SCRIPT, ``--help`` included, belongs to the script.

    Args:
        args: The arguments after ``run``.

    Returns:
        ``(launcher_args, script_args)``; ``launcher_args`` ends with SCRIPT when one was given.
    """
    launcher: list[str] = []
    script_args: list[str] = []
    script_seen = False
    i = 0
    while i < len(args):
        arg = args[i]
        if _launcher_option(arg):
            takes_value = "=" not in arg
            launcher += args[i : i + 2] if takes_value else [arg]
            i += 2 if takes_value else 1
            continue
        if script_seen:
            script_args.append(arg)
        else:
            launcher.append(arg)
            script_seen = not arg.startswith("-")
        i += 1
    return launcher, script_args


def _run_in_process(script: str, script_args: list[str]) -> None:
    """Run ``script`` as ``__main__`` in this interpreter, as ``python SCRIPT ARGS`` would."""
    sys.argv = [script, *script_args]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")


def _run_with_torchrun(options: Namespace, script_args: list[str], free_port: bool) -> None:
    """Start ``processes`` copies of the script with ``torchrun``; exit 1 if any fails."""
    import torch.distributed.run as torchrun
    from lightning.fabric.cli import _get_num_processes
    from lightning.fabric.utilities.distributed import _suggested_max_num_threads
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    processes = 1 if options.strategy == "dp" else _get_num_processes(options.accelerator, options.devices)
    rendezvous = (
        ["--standalone"]  # c10d rendezvous on a free local port
        if free_port
        else [f"--master_addr={options.main_address}", f"--master_port={options.main_port}"]
    )
    args = [
        f"--nproc_per_node={processes}",
        f"--nnodes={options.num_nodes}",
        f"--node_rank={options.node_rank}",
        *rendezvous,
        options.script,
        *script_args,
    ]
    os.environ.setdefault("OMP_NUM_THREADS", str(_suggested_max_num_threads()))
    # The elastic agent logs each failure (and "Sending process … closing signal") after the worker's own
    # error line; the worker's line is the message.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        torchrun.run(torchrun.parse_args(args))
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        if failure.exitcode != 1:  # 1: the worker printed its own "error: …" line (lit_svd.cli.run_recipe)
            how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
            print(f"error: process of rank {rank} failed with {how}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def _run_command(script_args: list[str]):
    """``fabric run``'s click command (same options and checks) with our callback."""
    import click
    from click.core import ParameterSource
    from lightning.fabric.cli import _get_num_processes, _run, _set_env_variables

    def callback(**kwargs: Any) -> None:
        kwargs.pop("script_args", None)  # never filled: the script's arguments were split off before click
        options = Namespace(**kwargs)
        _set_env_variables(options)
        help_requested = any(arg in ("-h", "--help") for arg in script_args)
        processes = 1 if options.strategy == "dp" else _get_num_processes(options.accelerator, options.devices)
        if help_requested or (processes == 1 and options.num_nodes == 1):
            _run_in_process(options.script, script_args)
            return
        context = click.get_current_context()
        free_port = options.num_nodes == 1 and context.get_parameter_source("main_port") == ParameterSource.DEFAULT
        _run_with_torchrun(options, script_args, free_port)

    return click.Command(
        "run",
        params=list(_run.params),
        callback=callback,
        help=(
            "Run SCRIPT on the requested devices: in this process for one device, else through torchrun. "
            "Options after SCRIPT (other than the ones below) are the script's; 'SCRIPT --help' shows them."
        ),
        context_settings={"ignore_unknown_options": True},
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``lightning`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["run"]:
        launcher_args, script_args = split_script_args(args[1:])
        _run_command(script_args).main(args=launcher_args, prog_name="lightning run")
        return
    from lightning.fabric.cli import _main

    _main(args=args, prog_name="lightning")


if __name__ == "__main__":
    main()
