"""The `moco` command. Only the standard library is imported before `main` runs, so that an interrupt during
start-up (importing torch takes seconds) is one line, not a traceback; each command group registers its
subcommands from its own module.

Exit codes: 0 success; 2 a user error (a bad flag or config value, a missing or wrong file, a missing optional
package), printed as one line `moco: error: ...`; 130 / 143 a run stopped by Ctrl-C / SIGTERM (with a checkpoint
saved when training); 1 an internal error (a bug: please report it, with its traceback).
"""

import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

GROUPS = ("pretrain", "evaluate", "transfer", "data")  # the modules of moco.cli, in the order of `moco --help`


def build_parser(argv: Sequence[str] = ()):
    """The parser of every subcommand; `argv` lets help texts show the defaults of the preset it names."""
    from importlib import import_module

    from .flags import Parser

    parser = Parser(prog="moco", description="Momentum Contrast (MoCo v1, v2, v3): self-supervised pretraining of image "
                    "encoders, their evaluation and transfer. Exit codes: 0 done, 2 a user error (one line says "
                    "what and how to fix it), 130/143 stopped by Ctrl-C/SIGTERM.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for group in GROUPS:
        import_module(f"{__name__}.{group}").register(sub, list(argv))
    return parser


@contextmanager
def _noting_interrupts(noted: list[int]) -> Iterator[None]:
    """While starting (importing torch and the rest), Ctrl-C is noted instead of raised: an interrupt raised inside
    a library's import can be swallowed by it, or leave the interpreter to die of the signal at exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: noted.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    warnings.formatwarning = lambda message, category, *a, **k: f"moco: warning: {message}\n"
    noted: list[int] = []
    try:
        with _noting_interrupts(noted):
            from ..errors import Interrupted, MocoError

            args = build_parser(argv).parse_args(argv)
        if noted:
            raise KeyboardInterrupt
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("moco: interrupted", file=sys.stderr)
        return 130
    except MocoError as e:
        print(f"moco: {'stopped by' if isinstance(e, Interrupted) else 'error:'} {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a path that cannot be read or written: the user's to fix
        where = f": {e.filename}" if e.filename else ""
        print(f"moco: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
