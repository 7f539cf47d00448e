"""User-facing errors: one clear sentence, a non-zero exit code, no traceback.

Every mistake a user can make (missing weights, an empty folder, a bad flag value, a corrupt checkpoint)
raises `UserError` with a message that says what is wrong and what to do. The scripts wrap their
`main` in `run_cli`, which prints that message and exits with status 2. Bugs (any other exception)
still show their traceback, because those are ours to fix. Warnings print as one line too,
`warning: <message>`, without Python's `file:line: UserWarning:` prefix meant for programmers.
"""
import errno
import sys
import warnings

# Write failures that are the machine's, not the program's: what happened and what the user can do about it.
REASONS = {
    errno.ENOSPC: ("no space left on the device", "free some space"),
    errno.EDQUOT: ("the disk quota is used up", "free some space"),
    errno.EROFS: ("the file system is read-only", "choose a writable folder"),
    errno.EACCES: ("permission denied", "choose a folder you can write to"),
    errno.EPERM: ("operation not permitted", "choose a folder you can write to"),
}


class UserError(Exception):
    """Something the user can fix; the message says how."""


def need(ok, message: str) -> None:
    """Raise UserError(message) unless `ok`: how settings are checked (TrainConfig, a method's options)."""
    if not ok:
        raise UserError(message)


def format_warning(message, category, filename, lineno, line=None) -> str:
    """`warning: <message>` for the warnings a user should read (UserWarning: about their input); other
    categories (a library's DeprecationWarning, ...) keep their name and origin, still on one line."""
    text = " ".join(str(message).split())
    if issubclass(category, UserWarning):
        return f"warning: {text}\n"
    return f"warning: {category.__name__}: {text} ({filename}:{lineno})\n"


def write_failure(path, code: int) -> str:
    """The one sentence for a file that could not be written for one of REASONS."""
    reason, action = REASONS[code]
    return f"cannot write {path}: {reason}; {action} and run the command again"


def run_cli(main, argv=None):
    """Call `main(argv)`; turn `UserError`, a full disk or read-only target (an OSError tinyrpo.runs.atomic knows)
    and Ctrl-C into a one-line message and an exit code, and print warnings as one line each."""
    previous, warnings.formatwarning = warnings.formatwarning, format_warning
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a write tinyrpo.runs.atomic did not wrap: still one line when the machine is at fault
        if e.errno not in REASONS:
            raise
        print(f"error: {write_failure(e.filename or 'a file', e.errno)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:  # the program may say what was saved and how to go on (train.py does)
        print(e.args[0] if e.args else "interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        warnings.formatwarning = previous
