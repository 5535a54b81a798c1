"""Output folders that appear whole or not at all, never clobber what is not ours, and survive faults.

``staged_output(out, force)`` is how every command writes a folder:

- **one writer per --out**: an exclusive lock on ``.OUT.lock`` beside it (``fcntl.flock``,
  released by the kernel if the process dies); a second run for the same --out fails at once,
  naming the process that holds it;
- **staging**: the output is built in ``.OUT.partial-XXXX`` beside it (same filesystem) and
  renamed into place only when complete; any exception, Ctrl-C (SIGINT) or SIGTERM removes the
  staging folder (the CLI turns SIGTERM into an exception and exits 143, Ctrl-C 130); a
  ``.OUT.partial-*`` left by a run that was killed outright (SIGKILL, power loss) is found and
  removed by the next run for that --out, which says so;
- **--force replaces only our own output**: an existing --out is replaced (after the new one is
  complete) only if phi3-export wrote it (`is_ours`); anything else is refused, never deleted;
- **disk full** mid-write is one line naming the output, with nothing left behind.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Self

from phi3_export.errors import Phi3ExportError


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_entries(folder: Path, root: Path) -> list[dict]:
    return [
        {"path": str(p.relative_to(root)), "size": p.stat().st_size, "sha256": sha256(p)}
        for p in sorted(folder.rglob("*")) if p.is_file()
    ]


def check_free_space(where: Path, needed: int) -> None:
    free = shutil.disk_usage(where).free
    if free < needed:
        raise Phi3ExportError(f"{where}: not enough free disk space: need about {needed / 1e9:.1f} GB, {free / 1e9:.1f} GB free")


def _json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def is_ours(folder: Path) -> bool:
    """A folder phi3-export wrote: a quantize output or bundle (our manifest), a report, or a fixture."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    tool = _json(folder / "manifest.json").get("tool")
    return ((isinstance(tool, dict) and tool.get("name") == "phi3-export")
            or _json(folder / "report.json").get("kind") == "phi3-export report"
            or isinstance(_json(folder / "config.json").get("phi3_export_fixture"), dict))


def check_replaceable(out: Path, force: bool) -> None:
    """Refuse up front an --out that exists, unless --force and phi3-export wrote it."""
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise Phi3ExportError(f"{out}: output already exists (use --force to replace it)")
    if not is_ours(out):
        raise Phi3ExportError(f"{out}: exists and was not written by phi3-export (no phi3-export manifest): "
                              "--force replaces only phi3-export output; choose another --out")


class _Lock:
    """Exclusive, non-blocking lock on ``.OUT.lock``; the file holds the owner's pid."""

    def __init__(self, out: Path):
        self.out = out
        self.path = out.parent / f".{out.name}.lock"
        self.fd: int | None = None

    def __enter__(self) -> Self:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise Phi3ExportError(f"{self.out}: another phi3-export run (pid {owner}) "
                                      "is writing this output; wait for it or choose another --out") from None
            # The file may have been unlinked by the previous holder between our open and flock.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self.fd = fd
                return self
            os.close(fd)

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still held: nobody can be holding another inode of it
            os.close(self.fd)
            self.fd = None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _clean_stale(out: Path, notify) -> None:
    """With the lock held, any staging or half-replaced folder for ``out`` is a killed run's."""
    for stale in sorted(out.parent.glob(f".{out.name}.partial-*")) + sorted(out.parent.glob(f".{out.name}.old-*")):
        _remove(stale)
        notify(f"removed {stale.name}, left beside {out} by an interrupted run")


@contextmanager
def staged_output(out: Path, force: bool, notify=None) -> Iterator[Path]:
    """A locked temp folder beside ``out``, renamed into place on success only (see the module docstring)."""
    out = Path(out)
    notify = notify or (lambda text: print(text, file=sys.stderr, flush=True))
    out.parent.mkdir(parents=True, exist_ok=True)
    with _Lock(out):
        check_replaceable(out, force)
        _clean_stale(out, notify)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        staging.chmod(0o755)  # mkdtemp makes it private; the output is an ordinary folder
        try:
            yield staging
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise Phi3ExportError(f"{out}: no space left on device while writing it; nothing was written") from None
            raise
        old = None
        if out.exists() or out.is_symlink():
            old = out.parent / f".{out.name}.old-{staging.name.rsplit('-', 1)[-1]}"
            out.rename(old)
        staging.rename(out)
        if old is not None:
            _remove(old)
