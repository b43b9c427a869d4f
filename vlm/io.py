"""Small file helpers shared by every stage: atomic writes, output locks and slide ids.

Every output of `vlm` is written to a temporary name in the destination folder and renamed into place
only when complete, so an interrupted run never leaves a file that looks finished (resume relies on it).
Folder outputs (`atomic_dir`) commit with one rename and are finished by the next reader or writer if a
kill interrupts them. Outputs that several processes could write at once are locked (`folder_lock`,
`output_lock`): a second writer waits or is refused, never silently loses the first one's work.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import filelock

from vlm.errors import InputError, MissingInputError

log = logging.getLogger(__name__)

INTERNAL_PREFIX = ".vlm"  # names of vlm's bookkeeping inside folder outputs
LOCK_NAME = ".vlm.lock"
COMMIT_NAME = ".vlm-commit"  # a complete new version, being moved into place
FILES_NAME = ".vlm-files"  # the entries the last commit wrote (JSON list)
STAGING_PREFIX = ".vlm-staging-"
TRASH_NAME = ".vlm-trash"
OUTPUT_MARKER = ".vlm-output"  # the kind of run folder vlm wrote here (`claim_output_folder`)
# kind -> the command that writes it, and the files by which a folder of an earlier vlm (before the marker) is
# recognised as that kind's: any one of the sets, all its files present.
OUTPUT_KINDS: dict[str, tuple[str, tuple[frozenset[str], ...]]] = {
    "zeroshot": (
        "vlm zeroshot",
        (frozenset({"run.json", "prompts_used.json"}), frozenset({"slide_embeddings.parquet"})),
    ),
    "train": ("vlm train", (frozenset({"train_config.json"}),)),
    "probe": ("vlm probe", (frozenset({"metrics.json", "predictions.csv", "probe.png"}),)),
    "heatmaps": ("vlm heatmap", ()),  # recognised by its per-slide files instead (`_is_heatmap_folder`)
    "demo": ("vlm demo", (frozenset({"summary.md", "pairs.csv"}),)),
}
LOCK_TIMEOUT_S = 600.0
NAME_MAX = 255  # bytes in one file name on Linux/macOS file systems
_MKSTEMP_RANDOM = 8  # characters `tempfile.mkstemp` adds between prefix and suffix
# Below this many free bytes after a failed write, the failure is taken to be the full disk (libraries such as
# FAISS, torch and safetensors report ENOSPC as their own "write error" without the errno).
DISK_FULL_MARGIN = 1 << 20
_WRITER_ERRORS = frozenset({"SafetensorError"})  # by name: `vlm.io` imports no heavy library


def _current_umask() -> int:
    """The process umask (read by setting and restoring it: Python has no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _follow_umask(path: Path, directory: bool = False) -> None:
    """Give a temporary file (0600) or folder (0700) the mode a plain `open`/`mkdir` would have.

    `mkstemp`/`mkdtemp` (and safetensors' writer) create private modes; without this, outputs renamed into
    place stay unreadable to colleagues on a shared server whatever their umask says. Execute bits a file
    was given on purpose are kept.
    """
    executable = not directory and path.stat().st_mode & 0o111
    os.chmod(path, (0o777 if directory or executable else 0o666) & ~_current_umask())


def _follow_umask_tree(folder: Path) -> None:
    """`_follow_umask` on every file and folder inside `folder` (the staging folder of `atomic_dir`)."""
    for entry in folder.rglob("*"):
        if not entry.is_symlink():
            _follow_umask(entry, directory=entry.is_dir())


def sibling_name(final: Path, suffix: str, random_chars: int = 0) -> str:
    """`.<name><suffix>` for a temporary or lock file beside `final`, cut to fit NAME_MAX (255 bytes).

    A slide id of 240 characters gives a final name that fits but `.<name>.<random>.part` would not; then the
    name is shortened and a hash of the full name keeps two long names apart. `random_chars` are the
    characters `mkstemp` will add.
    """
    name = final.name
    room = NAME_MAX - 1 - len(suffix.encode()) - random_chars
    if len(name.encode()) <= room:
        return f".{name}{suffix}"
    tag = "~" + hashlib.sha256(name.encode()).hexdigest()[:12]
    kept = name.encode()[: room - len(tag)].decode("utf-8", errors="ignore")
    return f".{kept}{tag}{suffix}"


def is_disk_full(error: BaseException, folder: str | os.PathLike[str]) -> bool:
    """True when `error`, raised while writing into `folder`, is the file system running out of space.

    ENOSPC/EDQUOT where the library keeps the errno; otherwise (FAISS "write error", torch's "file write
    failed", safetensors' StorageFull) the free space left in `folder`, checked before the partial file is removed.
    """
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(error, OSError | RuntimeError) and type(error).__name__ not in _WRITER_ERRORS:
        return False  # a usage error (ValueError...) raised in the block, not a failed write
    if "No space left" in str(error) or "StorageFull" in str(error):
        return True
    try:
        return shutil.disk_usage(folder).free < DISK_FULL_MARGIN
    except OSError:
        return False


def disk_full_error(folder: str | os.PathLike[str], what: str) -> OSError:
    """The one message for a full disk: where, how much is free, and that `what` was not written."""
    try:
        usage = shutil.disk_usage(folder)
        size = f" ({usage.free / 1e6:.1f} MB free of {usage.total / 1e9:.3g} GB)"
    except OSError:
        size = ""
    error = OSError(
        f"disk full at {Path(folder).absolute()}{size}: {what} was not written (no part of it is left there); "
        "free space there or write the output elsewhere"
    )
    error.errno = errno.ENOSPC
    return error


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` only if the block succeeds.

    The temporary file lives in the same folder so that the final `os.replace` is atomic on POSIX.
    On any exception the temporary file is removed and the exception propagates.
    """
    final = check_output_file(path)
    make_output_folder(final.parent)
    prefix = sibling_name(final, ".", random_chars=_MKSTEMP_RANDOM + len(".part"))
    fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=".part", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            yield tmp
            if tmp.exists():
                _follow_umask(tmp, directory=tmp.is_dir())
            os.replace(tmp, final)
        except Exception as error:
            if is_disk_full(error, final.parent):
                raise disk_full_error(final.parent, final.name) from error
            raise
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def check_output_file(path: str | os.PathLike[str]) -> Path:
    """Refuse a file output whose path is a folder (commands call it before their work, `atomic_path` again)."""
    final = Path(path)
    if final.is_dir():
        raise IsADirectoryError(f"{path}: is a folder, and this output is a file; name a file inside it or elsewhere")
    return final


def make_output_folder(path: str | os.PathLike[str]) -> Path:
    """Create an output folder (and its parents); a file in its place is refused by name, not a bare Errno 17."""
    folder = Path(path)
    for part in (folder, *folder.parents):
        if part.exists() and not part.is_dir():
            raise NotADirectoryError(f"{part}: exists and is a file, not a folder; choose another output folder")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def foreign_folder_error(
    path: str | os.PathLike[str], entries: list[str], what: str, option: str = "--out"
) -> FileExistsError:
    """The one refusal of a non-empty folder that is not `what` (an index, a `vlm probe` output...)."""
    shown = ", ".join(entries[:5]) + (", …" if len(entries) > 5 else "")
    return FileExistsError(
        f"{path}: exists and is not {what} (it holds {shown}); nothing was written. Choose a new or empty folder "
        f"for {option}"
    )


def _is_heatmap_folder(names: set[str]) -> bool:
    """Per-slide `<id>.png/.geojson/.csv` (and `failures.csv`) only, as `vlm heatmap` wrote before the marker."""
    visible = {name for name in names if not name.startswith(".")} - {"failures.csv"}
    stems = {name[: -len(".geojson")] for name in visible if name.endswith(".geojson")}
    return bool(stems) and all(Path(name).stem in stems and Path(name).suffix in (".png", ".csv") or
                               name.endswith(".geojson") for name in visible)


def output_kind(path: str | os.PathLike[str]) -> str | None:
    """The kind of run folder `path` is (its marker, else the files an earlier vlm wrote); None if not vlm's."""
    folder = Path(path)
    marker = folder / OUTPUT_MARKER
    if marker.is_file():
        return marker.read_text(encoding="utf-8", errors="replace").strip() or None
    names = {entry.name for entry in folder.iterdir()}
    for kind, (_, signatures) in OUTPUT_KINDS.items():
        if any(signature <= names for signature in signatures):
            return kind
    return "heatmaps" if _is_heatmap_folder(names) else None


def check_output_folder(path: str | os.PathLike[str], kind: str, option: str = "--out") -> None:
    """Refuse, before any work and writing nothing, an output folder that `claim_output_folder` would refuse.

    Fine: a missing or empty folder (`.` included), or one that vlm wrote for the same `kind` (a re-run
    replaces its own outputs). Refused: a file, or a non-empty folder that is not a `kind` output (it may
    hold the user's files, which same-named outputs would replace) — the rule `index build` applies.
    """
    folder = Path(path)
    for part in (folder, *folder.parents):
        if part.exists() and not part.is_dir():
            raise NotADirectoryError(f"{part}: exists and is a file, not a folder; choose another {option}")
    if not folder.exists():
        return
    entries = sorted(entry.name for entry in folder.iterdir() if not entry.name.startswith(INTERNAL_PREFIX))
    found = output_kind(folder)
    if found == kind or not entries and found is None:
        return
    command = OUTPUT_KINDS[kind][0]
    if found is None:
        raise foreign_folder_error(path, entries, f"a `{command}` output folder", option)
    other = OUTPUT_KINDS.get(found, (f"vlm {found}",))[0]
    raise foreign_folder_error(path, entries, f"a `{command}` output folder but one of `{other}`", option)


@contextlib.contextmanager
def claim_output_folder(path: str | os.PathLike[str], kind: str, write: bool = True) -> Iterator[Path]:
    """Check `path` for a `kind` run (`check_output_folder`), create it and mark it as vlm's for the block.

    The marker (`.vlm-output`, holding `kind`) is what lets a re-run reuse the folder and every other run
    refuse it. If the block fails having written nothing, the folder is left as it was (removed when this
    call created it). `write=False` only checks (the other processes of a distributed run).
    """
    folder = Path(path)
    check_output_folder(folder, kind)
    if not write:
        yield folder
        return
    created = not folder.exists()
    make_output_folder(folder)
    marker = folder / OUTPUT_MARKER
    marked = not marker.is_file()
    if marked:
        with atomic_path(marker) as tmp:
            tmp.write_text(kind + "\n", encoding="utf-8")
    try:
        yield folder
    except BaseException:
        if created:
            remove_if_unused(folder)
        elif marked and all(entry.name in (OUTPUT_MARKER, LOCK_NAME) for entry in folder.iterdir()):
            marker.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty staging folder; when the block succeeds, its files become the contents of `path`.

    For outputs that are folders (a model, an index). Crash-safe at every instant, including a kill during
    the swap: the staging folder is renamed to `path/.vlm-commit` in one atomic step (the commit point), and
    its entries are then moved into `path` one by one, replacing the files the previous commit wrote. A
    process killed after the commit point leaves `.vlm-commit` behind, which `recover_dir` (called by every
    reader and by the next writer) finishes moving; killed before it, the old contents stay untouched. Only
    files a previous `atomic_dir` wrote are replaced or removed, never other files of the folder, so
    `path` may be the current folder. Writers hold the folder's lock (`folder_lock`) throughout.
    """
    folder = Path(path).absolute()
    created = not folder.exists()
    make_output_folder(path)
    with folder_lock(folder):
        recover_dir(folder)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
        try:
            try:
                yield staging
                names = sorted(entry.name for entry in staging.iterdir())
                internal = [name for name in names if name.startswith(INTERNAL_PREFIX)]
                if internal:
                    raise InputError(f"{folder}: output file names {internal} are reserved for vlm's bookkeeping")
                _follow_umask_tree(staging)
                (staging / FILES_NAME).write_text(json.dumps(names) + "\n")
                _fsync_tree(staging)
                os.replace(staging, folder / COMMIT_NAME)  # the commit point
            except BaseException as error:
                full = isinstance(error, Exception) and is_disk_full(error, folder)  # before the staging is freed
                if created:
                    shutil.rmtree(staging, ignore_errors=True)
                    remove_if_unused(folder)
                if full:
                    raise disk_full_error(folder, "the folder's new contents") from error
                raise
            _apply_commit(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def remove_if_unused(folder: Path) -> None:
    """Remove a folder holding nothing but vlm's bookkeeping (e.g. created for an output that then failed)."""
    if folder.is_dir() and all(e.name in (LOCK_NAME, TRASH_NAME, OUTPUT_MARKER) for e in folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)


def recover_dir(path: str | os.PathLike[str]) -> bool:
    """Finish a folder write that a crash interrupted (see `atomic_dir`); True when there was one.

    Leftovers of writes killed before their commit point (staging folders) are removed too. Cheap when there
    is nothing to do (two `stat` calls), so every reader of a folder output calls it first.
    """
    folder = Path(path).absolute()
    if not folder.is_dir():
        return False
    leftovers = [entry for entry in folder.iterdir() if entry.name.startswith((STAGING_PREFIX, TRASH_NAME))]
    if not (folder / COMMIT_NAME).exists() and not leftovers:
        return False
    with folder_lock(folder):  # a writer still at work finishes first
        committed = _apply_commit(folder)
        for entry in folder.iterdir():
            if entry.name.startswith((STAGING_PREFIX, TRASH_NAME)):
                shutil.rmtree(entry, ignore_errors=True)
    if committed:
        log.warning("%s: finished a write that an interrupted run had committed", folder)
    return committed


def _apply_commit(folder: Path) -> bool:
    """Move the entries of `folder/.vlm-commit` into `folder`. Idempotent: a re-run after a kill at any
    step ends in the same state, because the list of the previous commit's files is replaced last."""
    commit = folder / COMMIT_NAME
    if not commit.is_dir():
        return False
    new_list = commit / FILES_NAME
    if not new_list.is_file():  # the list itself was moved: only the empty commit folder is left
        shutil.rmtree(commit)
        return True
    new = json.loads(new_list.read_text())
    old_list = folder / FILES_NAME
    old = json.loads(old_list.read_text()) if old_list.is_file() else []
    trash = folder / TRASH_NAME
    trash.mkdir(exist_ok=True)
    for name in old:
        if name not in new and os.path.lexists(folder / name):
            _move_aside(folder / name, trash)
    for name in new:
        source, target = commit / name, folder / name
        if not os.path.lexists(source):
            continue  # moved before the interruption
        if target.is_dir() and not target.is_symlink():
            _move_aside(target, trash)  # os.replace cannot replace a non-empty folder
        os.replace(source, target)
    os.replace(new_list, old_list)
    commit.rmdir()
    shutil.rmtree(trash, ignore_errors=True)
    return True


def _move_aside(path: Path, trash: Path) -> None:
    aside = trash / path.name
    if os.path.lexists(aside):
        shutil.rmtree(aside) if aside.is_dir() and not aside.is_symlink() else aside.unlink()
    os.replace(path, aside)


def _fsync_tree(folder: Path) -> None:
    """Flush the staged files to disk before the commit, so that a power cut cannot commit empty files."""
    for entry in folder.rglob("*"):
        if entry.is_file():
            fd = os.open(entry, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


_LOCKS: dict[str, filelock.FileLock] = {}


@contextlib.contextmanager
def file_lock(lock_file: Path, what: str, wait: bool = True, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file` (flock: released by the OS if the holder dies).

    With `wait`, a second process waits for the first (up to `timeout` s); without, it is refused at once.
    Re-entrant within one process (one lock object per file).
    """
    key = str(lock_file.absolute())
    lock = _LOCKS.setdefault(key, filelock.FileLock(key))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        if not wait:
            raise BlockingIOError(
                f"{what} is being written by another vlm process (it holds {lock_file}); wait for it to finish "
                "or write to another place"
            ) from None
        log.warning("waiting for another vlm process that is writing %s (lock %s)", what, lock_file)
        try:
            lock.acquire(timeout=timeout)
        except filelock.Timeout:
            raise TimeoutError(
                f"{what}: another vlm process has held {lock_file} for over {timeout:.0f} s; try again when it "
                "has finished"
            ) from None
    try:
        yield
    finally:
        lock.release()


def folder_lock(
    path: str | os.PathLike[str], wait: bool = True, create: bool = False
) -> contextlib.AbstractContextManager[None]:
    """The lock of a folder output (`path/.vlm.lock`): hold it around read-modify-write of the folder.

    The folder must exist unless `create`.
    """
    folder = Path(path).absolute()
    if create:
        make_output_folder(folder)
    elif not folder.is_dir():
        raise MissingInputError(f"{path}: no such folder")
    return file_lock(folder / LOCK_NAME, str(folder), wait=wait)


def output_lock(path: str | os.PathLike[str], wait: bool = False) -> contextlib.AbstractContextManager[None]:
    """The lock of a file output (`.<name>.lock` beside it); by default a second writer is refused at once."""
    file = Path(path).absolute()
    make_output_folder(file.parent)
    return file_lock(file.with_name(sibling_name(file, ".lock")), str(file), wait=wait)


def cache_folder(kind: str) -> Path:
    """`$VLM_CACHE/<kind>` when VLM_CACHE is set, else `~/.cache/vlm/<kind>` (prompt embeddings, tokens)."""
    root = os.environ.get("VLM_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "vlm") / kind


def slide_id_from_path(path: str | os.PathLike[str]) -> str:
    """The slide id is the file name without its extension (`TCGA-XX.svs` -> `TCGA-XX`).

    A name that leaves no usable id (`...tiff` -> `..`, `..tiff` -> `.`, `.ome.tiff` -> empty) is refused: such an
    id is a path segment, so its output file or viewer link would name the folder above or this one.
    """
    name = Path(path).name
    slide_id = Path(name).stem
    for multi in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(multi):
            slide_id = name[: -len(multi)]
    if slide_id in ("", ".", ".."):
        raise InputError(f"{path}: the file name leaves the slide id {slide_id!r} (the name without its extension), "
                         "which cannot name outputs or links; rename the file")
    return slide_id


def duplicate_ids(ids: Iterable[str]) -> list[str]:
    """The ids that occur more than once, sorted (every input that keys outputs by id must refuse these)."""
    return sorted(i for i, n in collections.Counter(ids).items() if n > 1)


def load_torch_file(path: str | os.PathLike[str], what: str, fix: str = "") -> object:
    """`torch.load(weights_only=True)` of a `what` file (tensors and plain values only, never code).

    A damaged file, or one holding other pickled objects (which unpickling could use to run code), is one
    `ValueError` naming the file (and `fix`, what to do) instead of torch's traceback.
    """
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:  # OSError: a cut-short zip
        if isinstance(error, FileNotFoundError):
            raise
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        reason = next((line for line in lines if "Unsupported global" in line), lines[0])
        raise InputError(
            f"{path}: refused: not a readable {what} of tensors and plain values ({reason}); it is not unpickled "
            f"because that could run code{'; ' + fix if fix else ''}"
        ) from error


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (checkpoints, index files)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
