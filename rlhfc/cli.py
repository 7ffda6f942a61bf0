"""The `rlhfc` command line: one thin command per compiler stage.

Each command lives with its stage's module and is registered here, so that this file
stays a table of contents. Errors reach the user as diagnostics, never tracebacks.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="rlhfc",
    help="Compile RLHF dataflow programs (.rlhf) into placed, parallel, runnable plans.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Registrations (each helper module adds its commands to `app`):
from rlhfc import cli_language  # noqa: E402,F401  check, graph, fmt
from rlhfc import cli_run  # noqa: E402,F401  compile, run
from rlhfc import cli_plan  # noqa: E402,F401  plan
from rlhfc import calibrate  # noqa: E402,F401  calibrate
from rlhfc import profile  # noqa: E402,F401  profile
