"""The ``ldm`` command: one sub-command per module in this package.

Every user error (``LdmError``, or a bad argument) is printed as one line and
exits with code 2, without a traceback. A ``SettingError`` names settings by the command's flags:
each command sets ``flag`` (field -> flag) beside ``run``.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from ldm import __version__
from ldm.cli import convert, finetune, info, merge, serve, txt2img
from ldm.errors import LdmError, SettingError

COMMANDS = (txt2img, convert, merge, info, finetune, serve)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is a single line that points to --help."""

    def error(self, message: str):  # noqa: D102 - argparse hook
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="ldm", description="Latent text-to-image: generate, convert, fine-tune.")
    parser.add_argument("--version", action="version", version=f"ldm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # argparse takes a command's positionals in one run, so `ldm merge A --lora F OUT` would leave OUT over:
    # a command that sets ``more_paths`` takes such leftover paths, in order, after its others.
    args, rest = parser.parse_known_args(argv)
    if rest:
        if getattr(args, "more_paths", None) is None or any(text.startswith("-") for text in rest):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.more_paths(args, rest)
    try:
        with warnings.catch_warnings():
            # ldm refuses such images itself, in one line (ldm.images.open_image); the command runs
            # in one thread, so changing the process's warning filters for its length is safe here.
            warnings.filterwarnings("ignore", message="Image size .* exceeds limit", module="PIL")
            warnings.showwarning = lambda message, *_: print(f"ldm {args.command}: warning: {message}", file=sys.stderr)
            return args.run(args) or 0
    except SettingError as error:  # worded with the command's flags
        print(f"ldm {args.command}: error: {error.worded(args.flag)}", file=sys.stderr)
        return 2
    except LdmError as error:
        print(f"ldm {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ldm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
