"""Writing files so that a failure never leaves a half-written one: a temporary path, then a rename."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


def holds_any(folder: str | os.PathLike, paths: Iterable[str | os.PathLike]) -> bool:
    """Whether `folder` is, or contains, one of `paths`: writing a new folder in its place would destroy it."""
    folder = Path(folder).resolve()
    return any(folder == path or folder in path.parents for path in map(Path.resolve, map(Path, paths)))


def default_mode(directory: bool = False) -> int:
    """The permissions a plain `open()` (or `mkdir`) would give under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def check_replaceable(path: str | os.PathLike) -> Path:
    """`path` as a Path, refusing one that exists but is no regular file: the rename of `atomic_path` would put
    a plain file in place of a device or pipe (`-o /dev/null` run as root replaced /dev/null itself)."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ValueError(f"{path} is not a regular file (it is a folder, device or pipe) and cannot be replaced; "
                         "write to a file path instead.")
    return path


def link_target(path: str | os.PathLike) -> Path:
    """The file a symlink at `path` points to, else `path`: writing goes through the link, as a shell's `>` does.
    Renaming a new file onto the link itself would replace the link (and a dangling one needs no overwrite)."""
    path = Path(path)
    if not path.is_symlink():
        return path
    target = Path(os.path.realpath(path))
    if target.is_symlink():
        raise ValueError(f"{path} is a symbolic link that leads nowhere (a loop); remove it or write elsewhere.")
    return target


def check_save_directory(path: str | os.PathLike) -> None:
    """Refuse a `save_pretrained` folder that is empty or an existing file: transformers only logged an error for a
    file and the save went on to fail deep inside (NotADirectoryError, FileExistsError)."""
    if not os.fspath(path):
        raise ValueError("The save folder is an empty path; name a folder (use '.' for the current folder).")
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{os.fspath(path)} is a file, not a folder; save_pretrained writes a folder of "
                                 "files: choose another save_directory.")


def check_writable_folder(path: str | os.PathLike) -> None:
    """Create and remove a temporary file beside `path`: a folder that takes no new files fails here, before any
    long work, instead of when the result is written."""
    folder = Path(path).parent
    try:
        handle, probe = tempfile.mkstemp(prefix=f".{Path(path).name}.", suffix=".tmp", dir=folder)
    except OSError as error:
        raise PermissionError(f"Cannot create files in the folder {folder} ({error.strerror or error}); "
                              "choose another output path.") from None
    os.close(handle)
    os.unlink(probe)


def check_new_file(path: str | os.PathLike) -> None:
    """Refuse, before any long work, a path where a writer that makes the missing folders cannot put a new file:
    one that exists (results are never overwritten), one under a file, or one whose nearest existing folder takes
    no new files."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; choose a new path (results are never overwritten).")
    if any(folder.is_file() for folder in path.parents):
        raise NotADirectoryError(f"{path}: a folder on that path is a file; choose another path.")
    nearest = next(folder for folder in path.parents if folder.exists())
    check_writable_folder(nearest / path.name)


@contextmanager
def atomic_path(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """A temporary file beside `path` to write into; it replaces `path` when the block succeeds and is
    removed when it fails. A replaced file's permissions stay (a private 0600 file stays private); a new
    file gets ordinary ones (mkstemp's own are owner-only).

    With `replace=False` the file takes the name only if nothing holds it yet, checked in the same system
    call (a hard link), so a file created at `path` while the block ran is kept: FileExistsError.
    """
    path = check_replaceable(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, path.stat().st_mode & 0o7777 if path.is_file() else default_mode())
        if replace:
            os.replace(temporary, path)
        else:
            _rename_unless_taken(Path(temporary), path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _rename_unless_taken(source: Path, path: Path) -> None:
    """Give `source` the name `path` unless a file holds it; a plain rename would replace that file."""
    taken = FileExistsError(f"{path} was created by something else while this output was written; it was kept "
                            "and nothing was written to it. Choose another path, or allow replacing it.")
    try:
        os.link(source, path)
    except FileExistsError:
        raise taken from None
    except OSError:  # a file system without hard links: check, then rename (a short window remains there)
        if path.exists():
            raise taken from None
        os.replace(source, path)
        return
    source.unlink()
