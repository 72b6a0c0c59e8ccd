"""Local directory helpers shared by checkouts, the cache and the chroma integration."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

from chroma_snapshots.engine.apart import CACHE_MARKER
from chroma_snapshots.engine.beneath import FolderId
from chroma_snapshots.engine.cleanup import Handoff, clean_up, finish_by, interrupts_held
from chroma_snapshots.engine.deadline import Deadline, call_off_if_interrupt
from chroma_snapshots.engine.folders import folder_id, landed, remove_mine
from chroma_snapshots.engine.placer import local_io, raise_local
from chroma_snapshots.engine.scratch import discard_scratch, make_scratch
from chroma_snapshots.engine.treewalk import is_mount_root, walk
from chroma_snapshots.engine.validation import path_text
from chroma_snapshots.engine.workdir import work_dir
from chroma_snapshots.errors import InvalidInputError, StorageTimeoutError, shown


def check_dest(dest: str | Path) -> str | Path:
    """``dest`` unless it is not a path (bytes, a NUL), or empty (``Path("")`` is the
    working directory)."""
    path = path_text(dest)
    if path is None or "\0" in path:
        raise InvalidInputError(f"checkout destination {shown(dest)} is not a path")
    if not path.strip():
        raise InvalidInputError("checkout destination is empty: name a folder")
    if Path(path).name == "..":  # "new/.." would name the folder that holds "new"
        raise InvalidInputError(
            f"checkout destination {path!r} ends in '..': name the folder itself"
        )
    return dest


def prepare_dest(final: Path | None) -> tuple[Path, list[Path]]:
    """The checkout destination ``final`` (absolute, as :func:`check_dest` let it pass; None:
    one in a new temporary folder), checked absent or an empty directory and outside any
    cache's folders, its parent created; and the folders made for it, deepest first."""
    if final is None:  # held until released; a killed process's goes with the next one
        temporary = make_scratch(TEMPORARY, "making a folder for the checkout")
        return temporary / "snapshot", [temporary]
    # never below a cache's folder (its marker): its repairs and sweeps would take the
    # checkout for files of their own and remove it
    for folder in Path(os.path.realpath(final)).parents:  # through links too
        if (folder / CACHE_MARKER).exists():
            raise InvalidInputError(
                f"checkout destination {str(final)!r} is inside the cache folder {folder}, "
                "whose clean-ups would remove it: choose a folder outside the cache"
            )
    if final.is_symlink():  # the rename into place would replace the link, not fill its target
        raise InvalidInputError(
            f"checkout destination {str(final)!r} is a symbolic link: name the folder itself"
        )
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise InvalidInputError(f"checkout destination {str(final)!r} exists and is not empty")
    if final.is_dir() and _is_cwd(final):
        raise InvalidInputError(
            f"checkout destination {str(final)!r} is the working directory, which the "
            "checkout would replace under this process: name a new folder inside it"
        )
    if final.is_dir() and _is_mount_point(final):
        raise InvalidInputError(
            f"checkout destination {str(final)!r} is a mount point: a checkout is built "
            "beside it and renamed into place, so name a new folder inside it"
        )
    made = [p for p in final.parents if not p.exists()]  # before mkdir: what it adds
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a file where a folder must be
        raise InvalidInputError(
            f"checkout destination {str(final)!r}: a file is in the way of its folder"
        ) from None
    return final, made


T = TypeVar("T")
TEMPORARY = "chroma-snapshot-"  # the folders of checkouts without a dest


def _is_mount_point(path: Path) -> bool:
    """The folder at ``path`` is a mount's root (treewalk.is_mount_root): a same-device bind
    mount passed os.path.ismount, and the rename into place failed with EBUSY once
    everything had downloaded."""
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return is_mount_root(fd)
    finally:
        os.close(fd)


def _is_cwd(folder: Path) -> bool:
    try:
        return os.path.samestat(os.stat(folder), os.stat("."))
    except OSError:  # no working directory (deleted): it cannot be this one
        return False


def build_at(
    dest: str | Path | None,
    build: Callable[[Path, FolderId], object],
    what: str,
    deadline: Deadline | None,
    then: Callable[[Path], T],
) -> T:
    """``then(final)`` for a tree at ``final``, ``dest`` (None: a new temporary folder),
    that the caller owns, written by ``build`` into a work folder beside it
    (:func:`work_dir`: locked, swept after a kill) and renamed into place unless
    ``deadline`` has passed by then (a tree finished after it is removed, not delivered
    late). On failure, ``then``'s or a Ctrl-C's after the tree landed included, nothing
    is left at ``dest`` (nor the temporary folder), and a raw OSError is the documented
    error (``what`` failed). With a deadline, the work runs on a thread of its own
    (engine/cleanup.py), so that a destination on a slow or hung disk costs the caller
    its deadline, not the disk's time: what is left then is removed in the background. A
    relative ``dest`` while the working directory is deleted is LocalDiskError naming it."""
    at = None
    if dest is not None:
        given = Path(check_dest(dest))
        # a relative dest is resolved against the working directory, which may be gone
        with local_io(given, f"{what}: resolving it against the working directory"):
            at = given.absolute()
    handoff = Handoff()
    try:
        if deadline is None:
            return then(_build_at(at, build, what, None, handoff))
        return then(_build_by(at, build, what, deadline, handoff))
    except BaseException:  # e.g. a Ctrl-C as the tree landed: the caller never had it
        handoff.take_back()
        raise


def _build_by(
    at: Path | None,
    build: Callable[[Path, FolderId], object],
    what: str,
    deadline: Deadline,
    handoff: Handoff,
) -> Path:
    """:func:`build_at`'s work on a thread of its own, waited for until ``deadline``."""
    work = partial(_build_at, at, build, what, deadline, handoff)
    try:
        return finish_by(work, deadline, what, None if at is None else str(at))
    except StorageTimeoutError:
        if handoff.give_up():  # a tree renamed into place from now on is taken back
            raise
        return handoff.final  # kept just as the time ran out: the caller has it
    except BaseException as e:  # interrupted while waiting: the build must not deliver later
        with interrupts_held():
            call_off_if_interrupt(deadline, e)  # and stops at its next check
            handoff.give_up()
        raise


def _build_at(
    at: Path | None,
    build: Callable[[Path, FolderId], object],
    what: str,
    deadline: Deadline | None,
    handoff: Handoff,
) -> Path:
    handoff.started = True
    try:
        return _build(at, build, what, deadline, handoff)
    finally:
        handoff.ended.set()


def _build(
    at: Path | None,
    build: Callable[[Path, FolderId], object],
    what: str,
    deadline: Deadline | None,
    handoff: Handoff,
) -> Path:
    try:
        final, made = prepare_dest(at)
    except OSError as e:  # e.g. a read-only parent: LocalDiskError, not a raw OSError
        raise_local(e, Path("the temporary directory") if at is None else at, what)
        raise
    undo = partial(_undo_dest, at is None, made)
    was = _empty_folder_mode(final)  # the user's empty dest, given back if taken back
    place = None if at is None else str(at)
    handed: list[bool] = []  # whether the work folder's removal (and so undo) was handed on

    def dispose(remove: Callable[[], None]) -> None:
        def both() -> None:
            remove()
            undo()  # after: the folders it made hold the work folder

        handed.append(True)
        clean_up(both, 0.0 if deadline is None else deadline.remaining(), place)

    try:  # no work folder yet: the error names dest, not a name it never had
        with local_io(final, what), work_dir(final, dispose) as (work, built):
            try:  # the file that failed if the OS says which (of a copy's two, the target)
                build(work, built)
                if deadline is not None:
                    deadline.check(what)
                move_into_place(work, final)
                landed(final, work, built, lambda: None)
                if not handoff.keep(final, partial(_take_back, final, work, built, undo, was)):
                    # the caller stopped waiting during the rename
                    os.rename(final, work)  # back: removed as a failed build
                    raise StorageTimeoutError(f"deadline exceeded during {what}")
            except OSError as e:
                raise_local(_as_at(e, work, final), final, what)
                raise
    except BaseException:
        if not handed:
            undo()
        raise
    return final


def _take_back(
    final: Path, work: Path, built: FolderId, undo: Callable[[], None], was: int | None
) -> None:
    """Remove a tree that landed at ``final`` for a caller that failed before it had it:
    renamed back to its work folder's name first (a kill then leaves it to the sweeps, not
    half removed at ``final``), and only if it is still the folder built. An empty folder
    the user had made at ``final`` (its mode ``was``), which the tree replaced, is made
    again: the call that failed leaves ``final`` as it found it."""
    if folder_id(final) == built:
        with contextlib.suppress(OSError):  # gone or moved meanwhile: not ours to chase
            os.rename(final, work)
            remove_mine(work, built)
        if was is not None:
            with contextlib.suppress(OSError):  # a folder put there meanwhile is kept
                os.mkdir(final)
                os.chmod(final, was)
    undo()


def _empty_folder_mode(final: Path) -> int | None:
    """The permission bits of the empty folder at ``final`` (prepare_dest let only an
    empty one pass), or None if there is none."""
    try:
        st = os.lstat(final)
    except OSError:
        return None
    return stat.S_IMODE(st.st_mode) if stat.S_ISDIR(st.st_mode) else None


def _undo_dest(temporary: bool, made: list[Path]) -> None:
    """Remove what :func:`prepare_dest` made for a checkout that failed: the temporary
    folder, or the parents made for dest while they are empty (another checkout may share
    them)."""
    if temporary:
        discard_scratch(made[0])
        return
    for folder in made:
        try:
            folder.rmdir()
        except OSError:
            break


def _as_at(err: OSError, work: Path, final: Path) -> OSError:
    """``err`` naming the file where it will be in ``final``, not in the hidden work folder
    the user never named (a full disk: ``dest/f3``, not ``.dest.chroma-...tmp/f3``)."""
    for attr in ("filename", "filename2"):
        name = getattr(err, attr)
        if isinstance(name, str) and Path(name).is_relative_to(work):
            setattr(err, attr, str(final / Path(name).relative_to(work)))
    return err


def move_into_place(work: Path, final: Path) -> None:
    """Rename the finished tree ``work`` to ``final``, which :func:`prepare_dest` found
    absent or empty; if something else filled it since (a second checkout to the same
    dest, finished first), the same InvalidInputError as if it had been there before."""
    try:
        os.replace(work, final)  # dest is absent or an empty dir: atomic
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
        raise InvalidInputError(
            f"checkout destination {str(final)!r} exists and is not empty (written meanwhile)"
        ) from None


def foreign_dir(
    path: Path | str, others: int, *, owners: tuple[int, ...] = (), sticky_ok: bool = False
) -> str | None:
    """Why ``path`` is not a folder only this user controls, or None if it is: a real
    directory (not a link) owned by this user (or one of ``owners``) that no one else has
    ``others`` permission bits on (``0o022``: no one else can write; ``0o077``: nor read),
    unless ``sticky_ok`` and it is sticky (others may add entries, never replace ours)."""
    try:
        st = os.lstat(path)
    except OSError as e:
        return e.strerror or str(e)
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a directory"
    if st.st_uid != os.geteuid() and st.st_uid not in owners:
        return f"it is owned by uid {st.st_uid}, not by this user ({os.geteuid()})"
    if st.st_mode & others and not (sticky_ok and st.st_mode & stat.S_ISVTX):
        return f"others have access (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def foreign_link(path: Path) -> str | None:
    """Why ``path`` may lead where another user chooses, or None: a symbolic link on its
    way (itself or a folder above it) owned by someone who is neither this user nor root.
    Its owner can point it anywhere at any time, even in a sticky folder such as /tmp."""
    for at in (*reversed(path.parents), path):
        try:
            st = os.lstat(at)
        except OSError:
            return None  # not there (yet): made by us below what exists
        if stat.S_ISLNK(st.st_mode) and st.st_uid not in (os.geteuid(), 0):
            return f"{at} is a symbolic link owned by uid {st.st_uid}"
    return None


def copy_tree(src: Path, dst: Path, check: Callable[[], None] = lambda: None) -> None:
    """``shutil.copytree`` without its error collecting: the first OSError (ENOSPC above
    all) is raised as itself. For trees of files and directories (cached versions, a
    chroma database); ``dst`` is new or an empty folder. Files keep their modes and times;
    folders get the caller's umask, not the source's modes (a snapshot has no folder
    modes, and a cache filled under umask 000 must not hand out world-writable folders).
    ``check()`` runs before each file and may raise (a deadline)."""
    for dirpath, _, filenames in walk(src):
        target = dst / Path(dirpath).relative_to(src)
        target.mkdir(exist_ok=target == dst)  # dst may be an empty work folder
        for fn in filenames:
            check()
            shutil.copy2(os.path.join(dirpath, fn), target / fn)  # loops on short writes
