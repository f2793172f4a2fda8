"""The Python code that reads or writes guest files, run in the sandbox (vmim.sandbox).

The newc extractor, the merge of a staging directory into the guest, the preparation of an
insert's target directory and the cpio store's survey of a guest tree are this package's own
code, not a program's: they run as
`python3 -m vmim.guestwork OPERATION JSON` under bwrap, seeing only the slot (or the staging
directory) at a fixed name, so that even a bug in them (in tree.resolve, say) cannot reach a
host file. The request is one JSON object; the answer is one JSON line on stdout: the result,
or the typed error the operation raised, which call() raises again here, message and exit code
unchanged.
"""

from __future__ import annotations

import errno
import json
import sys
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence

from vmim import errors

if TYPE_CHECKING:
    from vmim.sandbox import Bind, Caps


#: errors that cross the sandbox boundary as themselves (an allow-list: a name from the child
#: never picks an arbitrary class here)
def _error_classes() -> Dict[str, type]:
    from vmim.archive import CorruptArchive, UnsafeMember, UnsupportedVariant

    return {c.__name__: c for c in (errors.OperationError, errors.StateError, CorruptArchive,
                                    UnsafeMember, UnsupportedVariant)}


# ------------------------------------------------------------------ the operations (inside)


def _extract_newc(req: Dict[str, Any]) -> int:
    from vmim.archive import newc

    return newc.extract(sys.stdin.buffer, req["root"])


def _merge(req: Dict[str, Any]) -> int:
    from vmim import tree

    moved = tree.merge(req["staging"], req["root"], req["dest"], exact=bool(req.get("exact")))
    if req.get("remove_staging"):
        import shutil

        shutil.rmtree(req["staging"])  # what is left: directories merged into existing ones
    return moved


def _prepare(req: Dict[str, Any]) -> None:
    """The insert's target directory, made in the guest when missing; the staging directory
    takes its metadata (so an archive without a "." entry changes none of it)."""
    from vmim import tree

    # exact: the staging directory, made at the guest root, may carry the root's default ACL
    # (the kernel's inheritance); what the insert unpacks takes the target's, as there
    target = tree.target_dir(req["root"], req["dest"])
    tree.not_into(req["staging"], target, req["root"], req["dest"])
    tree.copy_dir_metadata(target, req["staging"], exact=True)


def _survey_cpio(req: Dict[str, Any]) -> Dict[str, Any]:
    """The cpio store's survey of the guest tree (vmim.archive.cpio.survey): the first
    SHOWN files too big for newc and how many, entries with xattrs, the tree's shape."""
    from vmim.archive import cpio

    big, xattrs, shape = cpio.survey(req["root"], req["what"])
    return {"big": big[:cpio.SHOWN], "big_count": len(big), "xattrs": xattrs, "shape": shape}


OPERATIONS: Dict[str, Callable[[Dict[str, Any]], Any]] = {
    "extract-newc": _extract_newc, "merge": _merge, "prepare": _prepare,
    "survey-cpio": _survey_cpio,
}


def _answer(obj: Dict[str, Any], code: int) -> int:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()
    return code


def child(argv: List[str]) -> int:
    """The entry point inside the sandbox."""
    op, payload = argv
    # the walks of guest trees are iterative (the merge, the survey); the making of an
    # insert's target through dangling guest symlinks recurses once a missing parent, which
    # PATH_MAX bounds (2048 levels of one-letter names), beyond Python's default 1000
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 3000))
    try:
        result = OPERATIONS[op](json.loads(payload))
    except errors.VmimError as exc:
        name = type(exc).__name__ if type(exc).__name__ in _error_classes() else "OperationError"
        return _answer({"error": name, "message": str(exc), "exit_code": exc.exit_code},
                       exc.exit_code)
    except OSError as exc:
        return _answer({"oserror": exc.errno, "strerror": exc.strerror,
                        "filename": exc.filename if isinstance(exc.filename, str) else None},
                       errors.EXIT_FAILED)
    except Exception as exc:  # noqa: BLE001 - a bug, or input nobody foresaw: still an answer
        import traceback

        traceback.print_exc()  # on stderr, which the caller keeps
        return _answer({"error": "OperationError",
                        "message": f"{op} failed in the sandbox: {exc!r}"}, errors.EXIT_FAILED)
    return _answer({"result": result}, 0)


# ------------------------------------------------------------------ the call (outside)


def call(op: str, payload: Dict[str, Any], binds: Sequence[Bind], *, caps: Caps,
         feed: Sequence[Sequence[str]] = (), stdin_path: Optional[str] = None) -> Any:
    """Run operation op in the sandbox, keeping the capabilities caps (vmim.sandbox's sets),
    and return its result, or raise its error. `feed` are stages (run here, outside) whose
    output is the operation's stdin; the first reads stdin_path."""
    import tempfile

    from vmim import process, sandbox

    inner = sandbox.python("vmim.guestwork", [op, json.dumps(payload)], binds, caps=caps)
    with tempfile.TemporaryFile() as out:
        try:
            process.pipeline([*feed, inner], stdin_path=stdin_path, stdout_fd=out.fileno())
            failure: Optional[errors.CommandError] = None
        except errors.CommandError as exc:
            failure = exc
        out.seek(0)
        lines = out.read().decode("utf-8", "replace").splitlines()
    answer: Dict[str, Any] = {}
    if lines:
        try:
            answer = json.loads(lines[-1])
        except (ValueError, RecursionError):
            answer = {}
    if failure is not None and failure.argv != sandbox.shown(inner):
        raise failure  # a feeding stage failed (the decompressor): it says why
    if "error" in answer:
        cls = _error_classes().get(answer["error"], errors.OperationError)
        error = cls(answer["message"])
        if cls is errors.OperationError and answer.get("exit_code") == errors.EXIT_COMMAND:
            error.exit_code = errors.EXIT_COMMAND  # the one other code it takes: a full disk
        raise error
    if "oserror" in answer:
        raise OSError(answer["oserror"] or errno.EIO, answer["strerror"], answer["filename"])
    if failure is not None or "result" not in answer:
        raise failure or errors.OperationError(f"{op} in the sandbox gave no answer")
    result = answer["result"]
    if not RESULTS[op](result):  # it crossed from a process that read guest data
        raise errors.OperationError(f"{op} in the sandbox answered {result!r:.200}")
    return result


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


#: what each operation's answer may be (the survey's fields: vmim.archive.cpio.survey_answer)
RESULTS: Dict[str, Callable[[Any], bool]] = {
    "extract-newc": _count, "merge": _count, "prepare": lambda r: r is None,
    "survey-cpio": lambda r: isinstance(r, dict),
}


if __name__ == "__main__":
    sys.exit(child(sys.argv[1:]))
