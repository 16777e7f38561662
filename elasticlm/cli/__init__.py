"""``elasticlm <verb>``: the command line.

One module per group of verbs, each with the verbs' functions and their ``add_parsers`` (the arguments of its
verbs): ``models`` (init, info, generate, extract, quantize, convert), ``training`` (pretrain, train, plan,
importance, reorder, prune, tokenizer), ``evaluation`` (demo, eval, serve); ``common`` holds what they share.
This module builds the parser from them and runs a verb.

Errors caused by input (bad config, missing or corrupt checkpoint, …) print one line,
``error: …``, and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from ..errors import ElasticLMError
from . import evaluation, models, training


class _Parser(argparse.ArgumentParser):
    """Usage mistakes in one line (``error: …``, exit 2), like every other input error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(
        prog="elasticlm",
        description="Many nested model sizes from one hybrid Mamba-2/attention language model "
                    "(Nemotron Elastic). Each verb has its own --help.",
    )
    parser.add_argument("--version", action="version", version=f"elasticlm {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="print the full traceback of an unexpected error instead of one line")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    for verbs in (models, training, evaluation):
        verbs.add_parsers(sub, fmt)
    return parser


def main(argv: list[str] | None = None) -> int:
    import logging

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed in one line)
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("elasticlm").setLevel(logging.INFO)
    try:
        rc = args.func(args)
    except ElasticLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`elasticlm info … | head`): nothing to report
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush does not fail again
        return 141
    except MemoryError:
        print("error: out of memory; lower the batch size or sequence length (or use a larger machine)",
              file=sys.stderr)
        return 1
    except Exception as exc:  # a bug, or a case without its own message yet: one line, the rest in a file
        if args.debug:
            raise
        report = _write_traceback(exc)
        where = f"full traceback in {report}" if report else "the traceback could not be saved"
        print(f"error: unexpected {type(exc).__name__}: {_first_line(exc)} ({where}; --debug prints it; "
              "please report it)", file=sys.stderr)
        return 1
    return rc if isinstance(rc, int) else 0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


def _write_traceback(exc: BaseException) -> str | None:
    import tempfile
    import traceback

    try:
        fd, name = tempfile.mkstemp(prefix="elasticlm-error-", suffix=".txt")
        with open(fd, "w") as fh:
            fh.write(f"elasticlm {' '.join(sys.argv[1:])}\n\n")
            fh.write("".join(traceback.format_exception(exc)))
        return name
    except OSError:
        return None


__all__ = ["build_parser", "main"]
