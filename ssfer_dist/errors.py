"""Errors shown to users as one line (no traceback) with a non-zero exit."""


class UserError(RuntimeError):
    """Bad input (config, file, URL, weights): the message names the file/field/URL and what was expected."""


def run_command(prog: str, args) -> int:
    """Run a parsed CLI subcommand (``args.handler``) the way both ``ssfer`` and ``ssfer-shard`` do:
    logging per ``--verbose``, a ``UserError`` printed as one line with exit code 2, Ctrl-C as 130."""
    import logging
    import sys

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except UserError as e:
        print(f"{prog} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
