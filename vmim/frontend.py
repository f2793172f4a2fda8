"""What every front end shares — the command line (vmim.cli), the fleet's worker and a
worker's child (vmim.fleet): the argument parser class, logging set-up, signals turned into
exceptions, and running an Invocation with its errors turned into one line on stderr and an
exit code (and a JSON document with --json)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import traceback
from typing import Any, Callable, Dict, NoReturn, Optional, TextIO

from vmim import __version__
from vmim.errors import (
    EXIT_FAILED,
    EXIT_SIGINT,
    ConfigError,
    Interrupted,
    UsageError,
    VmimError,
)
from vmim.invocation import Invocation
from vmim.output import PROG
from vmim.terminal import continuation, escaped_stderr, escaping, one_line_records

log = logging.getLogger("vmim")

ENV_LOG_CONFIG = "VMIM_LOG_CONF"


class ArgParser(argparse.ArgumentParser):
    """argparse whose errors are UsageError (exit 2, one line), with a hint for a misspelt
    long option: the parser class of the command line and of the worker."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}{self._did_you_mean(message)} (see '{PROG} --help')")

    def _did_you_mean(self, message: str) -> str:
        """'; did you mean --list-images?' for a misspelt long option."""
        import difflib

        if not message.startswith("unrecognized arguments: "):
            return ""
        longs = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        hints = []
        for word in message.split(": ", 1)[1].split():
            flag = word.split("=", 1)[0]
            close = difflib.get_close_matches(flag, longs, n=1, cutoff=0.7) \
                if flag.startswith("--") else []
            if close:
                hints.append(f"{close[0]} for {flag}")
        return f"; did you mean {', '.join(hints)}?" if hints else ""


class _Formatter(logging.Formatter):
    """`vmimagemanager: level: message`, one line (terminal.OneLineRecord), then the record's
    traceback indented under it."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"{PROG}: {record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info and not record.exc_text:  # a record not made by OneLineRecord
            record.exc_text = continuation(self.formatException(record.exc_info))
        return text + ("\n" + record.exc_text if record.exc_text else "")


def setup_logging(verbose: int, quiet: int, log_config: Optional[str],
                  syslog: Optional[str] = None) -> None:
    one_line_records()  # whatever formatter writes a record, it cannot forge a line
    log_config = log_config or os.environ.get(ENV_LOG_CONFIG) or None
    if log_config:
        if not os.path.isfile(log_config):
            raise UsageError(f"logging configuration '{log_config}' was not found")
        import logging.config as logging_config  # only when asked for: start-up stays light

        try:
            logging_config.fileConfig(log_config, disable_existing_loggers=False)
        except Exception as exc:  # fileConfig raises anything from KeyError to ValueError
            raise UsageError(f"logging configuration '{log_config}' is invalid: {exc!r}") from None
        return
    level_index = max(0, min(5, 1 - verbose + quiet))  # default INFO: one line per step
    level = (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL,
             logging.CRITICAL + 10)[level_index]
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_vmim", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(escaping(sys.stderr))
    handler._vmim = True  # type: ignore[attr-defined]
    handler.setFormatter(_Formatter())
    handler.setLevel(level)
    root.addHandler(handler)
    root.setLevel(level)
    if syslog:
        import logging.handlers as logging_handlers

        class SyslogHandler(logging_handlers.SysLogHandler):
            """Syslog, given up (with one warning) at its first failure: a cron run without a
            syslog daemon must not print a traceback for every line it logs."""

            def handleError(self, record: logging.LogRecord) -> None:
                logging.getLogger().removeHandler(self)
                self.close()
                exc = sys.exc_info()[1]
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                log.warning("cannot log to syslog at %s (%s); logging to stderr only", syslog, why)

        try:
            sh = SyslogHandler(address=syslog)
        except OSError as exc:
            log.warning("cannot log to syslog at %s (%s); logging to stderr only", syslog,
                        exc.strerror)
            return
        sh._vmim = True  # type: ignore[attr-defined]
        sh.setFormatter(logging.Formatter(f"{PROG}[{os.getpid()}]: %(levelname)s: %(message)s"))
        sh.setLevel(min(level, logging.INFO))  # the steps, even when stderr stays quiet
        root.addHandler(sh)
        root.setLevel(min(level, logging.INFO))


def _raise_interrupt(signum: int, _frame: Any) -> None:
    from vmim import signals

    signals.on_signal(signum)  # raised where the run waits, else kept until it does


def _install_signal_handlers() -> Dict[int, Any]:
    old: Dict[int, Any] = {}
    # SIGINT too: as an Interrupted (a VmimError) it runs the same cleanup as a failed step.
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        try:
            old[sig] = signal.signal(sig, _raise_interrupt)
        except ValueError:  # not the main thread (tests calling main() from a thread)
            pass
    return old


def run_invocation(get: Callable[[], Invocation], stdout: Optional[TextIO] = None,
                   want_json: bool = False) -> int:
    """Run the invocation `get()` returns (from the command line, or a fleet worker's child
    from its stdin): errors become one line on stderr and an exit code, --json a document."""
    # every control but newline and tab escaped, whatever wrote it (terminal.EscapingStream):
    # --json is unchanged (json.dumps writes controls as \u escapes)
    out = escaping(stdout or sys.stdout)
    from vmim import signals

    signals.reset()
    old_handlers = _install_signal_handlers()
    doc: Dict[str, Any] = {"version": __version__}
    try:
        with escaped_stderr():
            return _run(get, out, doc, want_json)
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)


def _run(get: Callable[[], Invocation], out: TextIO, doc: Dict[str, Any],
         want_json: bool) -> int:
    try:
        try:
            inv = get()
        except SystemExit as exc:  # --help and --version
            return int(exc.code or 0)
        want_json = inv.options.json
        setup_logging(inv.options.verbose, inv.options.quiet, inv.log_config, inv.syslog)
        from vmim.commands import run_command

        code = run_command(inv, doc, out)
    except BrokenPipeError:  # the reader went away (| head): not an error, nothing more to say
        return _reader_gone(code=0)
    except VmimError as exc:
        code = exc.exit_code
        _report(exc, doc)
    except KeyboardInterrupt:
        code = EXIT_SIGINT
        _report(Interrupted(signal.SIGINT), doc)
    except Exception as exc:  # a bug: say so, with the traceback
        code = EXIT_FAILED
        sys.stderr.write(f"{PROG}: internal error: {exc!r}\n{traceback.format_exc()}")
        doc["error"] = {"message": f"internal error: {exc!r}", "exit_code": code}
    try:
        if want_json:
            doc["exit_code"] = code
            json.dump(doc, out, indent=2, sort_keys=False)
            out.write("\n")
        out.flush()
    except BrokenPipeError:
        return _reader_gone(code)
    return code


def _reader_gone(code: int) -> int:
    """stdout's reader closed the pipe early (`vmimagemanager -l | head -1`): stop writing,
    quietly, as other Unix tools do. stdout now points at /dev/null, so the interpreter's own
    flush at exit cannot fail a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real stdout (a test's StringIO): nothing to redirect
        pass
    return code


def _report(exc: VmimError, doc: Dict[str, Any]) -> None:
    if isinstance(exc, ConfigError) and len(exc.problems) > 1:
        sys.stderr.write(f"{PROG}: error: the configuration has {len(exc.problems)} problems:\n")
        for p in exc.problems:
            sys.stderr.write(f"  {p}\n")
    else:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        traceback.print_exc(file=sys.stderr)
    doc["error"] = {"message": str(exc), "exit_code": exc.exit_code, "type": type(exc).__name__}
    if isinstance(exc, ConfigError):
        doc["error"]["problems"] = exc.problems
