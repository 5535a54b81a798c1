"""Output folders that appear whole or not at all, and their manifest."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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


@contextmanager
def staged_output(out: Path, force: bool) -> Iterator[Path]:
    """A temp folder beside ``out`` (same filesystem), renamed into place on success only."""
    out = Path(out)
    if out.exists() and not force:
        raise Phi3ExportError(f"{out}: output already exists (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the output is an ordinary folder
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{staging.name.rsplit('-', 1)[-1]}"
        out.rename(old)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
