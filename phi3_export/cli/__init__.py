"""The `phi3-export` command: a thin Click layer over phi3_export.api.

This module holds the group and its error contract; the commands live by pipeline stage in
build.py (quantize, fixture, recipes), measure.py (chat, validate, report, sweep) and
bundle.py (package, verify), with their shared options in options.py.
"""

from __future__ import annotations

import signal
import sys
import traceback

import click

from phi3_export.errors import Phi3ExportError
from phi3_export.memory import bound_heap
from phi3_export.versions import tool_version


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so staged output is cleaned up like on Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated()


class _Group(click.Group):
    """The error contract of every command (README: "What phi3-export promises").

    Bad input (Phi3ExportError, an unusable path): one line `error: ...`, exit 2. Ctrl-C:
    exit 130; SIGTERM: exit 143 (staging removed either way). Anything else is a bug: one
    line `internal error: ...` saying how to see the traceback (--debug), exit 1.
    """

    def main(self, *args, **kwargs):
        """Click's own usage errors (a missing option, a bad choice) as one line too, exit 2."""
        try:
            return super().main(*args, **{**kwargs, "standalone_mode": False})
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
            sys.exit(0)
        except click.UsageError as exc:
            where = f" (phi3-export {exc.ctx.command_path.split(' ', 1)[-1]} --help)" if exc.ctx and " " in exc.ctx.command_path else ""
            click.echo(f"error: {exc.format_message()}{where}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("interrupted: nothing was written", err=True)
            sys.exit(130)

    def invoke(self, ctx: click.Context):
        signal.signal(signal.SIGTERM, _on_sigterm)
        bound_heap()
        try:
            return super().invoke(ctx)
        except Phi3ExportError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was written", err=True)
            sys.exit(130)
        except Terminated:
            click.echo("terminated: nothing was written", err=True)
            sys.exit(143)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except BrokenPipeError:
            # The reader went away (`phi3-export recipes list | head -2`): nothing to report.
            # Python's own advice: point stdout at devnull so the exit flush cannot fail again.
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except OSError as exc:
            if exc.filename is None:
                raise _internal(ctx, exc) from None
            click.echo(f"error: {exc.filename}: {exc.strerror or exc}", err=True)
            sys.exit(2)
        except Exception as exc:  # noqa: BLE001  (any other exception is a bug: reported as one, see the docstring)
            raise _internal(ctx, exc) from None


def _internal(ctx: click.Context, exc: Exception) -> SystemExit:
    debug = (ctx.obj or {}).get("debug")
    if debug:
        traceback.print_exception(exc)
    reason = str(exc).splitlines()[0] if str(exc) else ""
    hint = "" if debug else " (run `phi3-export --debug ...` to see the traceback)"
    click.echo(f"internal error: {type(exc).__name__}{': ' + reason if reason else ''}{hint}", err=True)
    return SystemExit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(tool_version(), prog_name="phi3-export")
@click.option("--debug", is_flag=True, help="On an internal error, print the Python traceback.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Quantize Phi-3-family checkpoints to 4 bits and export them for devices.

    \b
    Typical use:
      phi3-export fixture --recipe phi-3-mini-4k --out tiny/      # a tiny test checkpoint
      phi3-export quantize --checkpoint tiny/ --bits 4 --out out/  # int4 ONNX for onnxruntime-genai
      phi3-export validate out/ --reference tiny/ --json result.json
      phi3-export recipes list

    \b
    Exit status: 0 ok; 1 checks failed or internal error; 2 bad input; 130 Ctrl-C; 143 SIGTERM.
    """
    ctx.obj = {"debug": debug}




def _register() -> None:
    from phi3_export.cli import build, bundle, measure

    for command in (build.quantize, build.fixture, build.recipes, measure.chat, measure.validate, measure.report,
                    measure.sweep, bundle.package, bundle.verify):
        main.add_command(command)


_register()
