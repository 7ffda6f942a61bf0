"""The `rlhfc` command line: one thin command per compiler stage.

The commands are plain functions in this package's modules; they are registered on the
one `app` here, so no command module imports this one (no import circle). Errors reach
the user as diagnostics, never tracebacks.
"""

from __future__ import annotations

import typer

from rlhfc.cli.calibrate import calibrate_command
from rlhfc.cli.interfaces import interfaces_command
from rlhfc.cli.language import check, fmt, graph
from rlhfc.cli.plan import plan_command
from rlhfc.cli.profile import profile_command
from rlhfc.cli.run import compile_command, run_command

app = typer.Typer(
    name="rlhfc",
    help="Compile RLHF dataflow programs (.rlhf) into placed, parallel, runnable plans.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for name, command in (("check", check), ("graph", graph), ("fmt", fmt), ("compile", compile_command),
                      ("run", run_command), ("plan", plan_command), ("calibrate", calibrate_command),
                      ("profile", profile_command),
                      ("interfaces", interfaces_command)):
    app.command(name)(command)
