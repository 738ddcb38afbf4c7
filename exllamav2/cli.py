"""`exllamav2` / `python -m exllamav2`: one subcommand per module in exllamav2/commands/."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# command name -> module in exllamav2.commands; a missing module just leaves its command out
COMMANDS = {
    "generate": "generate",
    "chat": "chat",
    "ppl": "ppl",
    "info": "info",
    "serve": "serve",
    "convert-gguf": "convert_gguf",
    "convert": "convert",
}


def build_parser(debug: bool = False) -> argparse.ArgumentParser:
    from .version import __version__
    parser = argparse.ArgumentParser(prog="exllamav2",
                                     description="ExLlamaV2 in pure PyTorch: run, inspect and serve LLMs.",
                                     epilog="Add --debug to any command to see full tracebacks.")
    parser.add_argument("--version", action="version", version=f"exllamav2 {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        full = f"exllamav2.commands.{module_name}"
        if importlib.util.find_spec(full) is None:
            continue
        try:
            module = importlib.import_module(full)
            sub = module.add_parser(subparsers)
        except Exception as e:  # one broken command must not take the others down
            if debug:
                raise
            print(f"warning: command '{name}' is unavailable ({type(e).__name__}: {e})", file=sys.stderr)
            continue
        if sub is None:
            sub = subparsers.choices.get(getattr(module, "NAME", name))
        if sub is not None:
            sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser(debug)
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    args.debug = debug
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:
        if debug:
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    first = text.splitlines()[0]
    if isinstance(e, (FileNotFoundError, ValueError, RuntimeError, NotImplementedError)) or type(e).__name__ in ("CLIError", "ConfigError"):
        return first
    return f"{type(e).__name__}: {first}"


if __name__ == "__main__":
    sys.exit(main())
