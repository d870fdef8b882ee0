"""The `cfcml` command: the one front door. It only parses arguments and calls the library.

- ``parser``: the argument parser, one function per command
- ``args``: argument types and the arguments several commands share
- ``commands``: one function per command, from parsed arguments to a library call
- ``errors``: exit statuses and the one line an error leaves on stderr
- ``main``: the entry point (``cfcml = cfcml.cli:main``; ``python -m cfcml.cli``)
"""

from .errors import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_REFUSED
from .main import main
from .parser import build_parser

__all__ = ["EXIT_BAD_INPUT", "EXIT_INTERNAL", "EXIT_REFUSED", "build_parser", "main"]
