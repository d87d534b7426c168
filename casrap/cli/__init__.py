"""The ``casrap`` command line: a thin layer mapping flags onto library calls.

One module per command group, each with a ``register(app)`` function, all registered
here explicitly, so ``from casrap.cli import app`` has every command:

- :mod:`casrap.cli.model_commands`: info, eval, calibrate, bench, export;
- :mod:`casrap.cli.rl`: collect, train, test, report;
- :mod:`casrap.cli.record`: record (the replay recording at scale);
- :mod:`casrap.cli.search`: search;
- :mod:`casrap.cli.runtime`: generate, serve, loadtest, bundle;
- :mod:`casrap.cli.heal`: heal.

Only this package prints. ``.env`` is read in :func:`main` and nowhere else; tokens
from it are never logged.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

from casrap.cli import heal, model_commands, record, rl, runtime, search
from casrap.cli.common import console
from casrap.errors import CasrapError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Context Aware Structured Runtime Adaptive Pruning.")
for _group in (model_commands, rl, record, search, runtime, heal):
    _group.register(app)


def main() -> None:
    """Console-script entry: one-line errors for user mistakes, no tracebacks."""
    try:
        from dotenv import load_dotenv

        load_dotenv(Path.cwd() / ".env", override=False)
    except ImportError:  # pragma: no cover
        pass
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = app(standalone_mode=False)  # click returns typer.Exit's code here instead of exiting
        if isinstance(code, int) and code:
            sys.exit(code)
    except CasrapError as err:
        console.print(f"[red]error:[/] {err}", soft_wrap=True, highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as err:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            sys.exit(err.exit_code)
        if isinstance(err, click.exceptions.Abort):
            sys.exit(1)
        raise


__all__ = ["app", "main"]
