"""`cfcml`'s entry point: parse, run the command, turn every error into one line and a status."""

from __future__ import annotations

import sys
import traceback
import warnings

from ..platform.redact import redact
from .errors import EXIT_BAD_INPUT, EXIT_INTERNAL, bad_input_errors, error_line, quiet_showwarning
from .parser import build_parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; every error becomes one line on stderr and exit status 2 (bad input)
    or 1 (internal error), with the traceback only under ``--debug`` (accepted anywhere)."""
    from ..datasets.cohort import CohortError  # numpy, PIL: not before a command runs

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    args = build_parser(tune_options=argv[:1] == ["tune"]).parse_args(argv)
    show = warnings.showwarning
    if not debug:
        warnings.showwarning = quiet_showwarning(show)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI boundary: every error becomes one line
        if debug:
            traceback.print_exc()
        code = getattr(e, "exit_code", None)  # an error class may say what it is
        if code is None:
            code = EXIT_BAD_INPUT if isinstance(e, bad_input_errors()) else EXIT_INTERNAL
        if code == EXIT_INTERNAL:
            hint = "" if debug else " (cfcml --debug ... shows the traceback)"
            print(f"error: internal error: {type(e).__name__}: {error_line(e)}{hint}", file=sys.stderr)
        elif isinstance(e, CohortError):  # every problem on its own line: fix them all at once
            print(f"error: {redact(str(e))}", file=sys.stderr)
        else:
            print(f"error: {error_line(e)}", file=sys.stderr)
        return int(code)
    finally:
        warnings.showwarning = show
