"""Walking and removing folder trees at any depth, never following links, without recursion.

Python 3.11's ``os.walk``, ``Path.rglob`` and ``shutil.rmtree`` recurse once per level: a
consumer that made a chain of 1,000 folders inside a cached version got ``RecursionError``
from every checkout of it, and from every cache opening once it was moved to ``tmp/``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import stat
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path

from chroma_snapshots.engine.deadline import checked

# a folder, opened for listing; a link (even to a folder) is ELOOP, never followed
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
Mount = tuple[int, int]  # (device, mount id): see mount_of
_OCTAL = re.compile(r"\\([0-7]{3})")
_TAKEN = (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR)
_SHORT = threading.local()  # whether a removal on this thread ran out of descriptors


def _noted(e: OSError) -> None:
    """Remember (for :func:`ran_short`) an error that says the process has no descriptor
    left: a removal ignores errors, but that one passes."""
    if e.errno in (errno.EMFILE, errno.ENFILE):
        _SHORT.hit = True


def ran_short() -> bool:
    """True if a removal on this thread ran out of file descriptors (EMFILE, ENFILE) since
    the last call (which forgets it): it is worth trying again once some are free."""
    hit = bool(getattr(_SHORT, "hit", False))
    _SHORT.hit = False
    return hit


def walk(top: Path | str) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk(top)`` (top-down, links to folders listed among the folders but not
    entered; the caller may prune ``dirnames`` in place) with a stack instead of recursion.
    Unreadable folders are skipped, as ``os.walk`` does, and so are folders on another
    file system than ``top`` (a mount inside a cached version is not the cache's)."""
    try:
        dev = os.lstat(top).st_dev
    except OSError:
        return
    stack = [os.fspath(top)]
    while stack:
        path = stack.pop()
        dirs: list[str] = []
        files: list[str] = []
        try:
            with os.scandir(path) as entries:
                for e in entries:
                    try:
                        is_dir = e.is_dir()
                    except OSError:
                        is_dir = False
                    (dirs if is_dir else files).append(e.name)
        except OSError:
            continue
        yield path, dirs, files
        below = (os.path.join(path, d) for d in reversed(dirs))
        stack.extend(p for p in below if _same_device(p, dev))


def remove_dir(path: Path | str, check: Callable[[], None] = lambda: None,
               dir_fd: int | None = None, only: tuple[int, int] | None = None,
               last: str | None = None) -> None:  # fmt: skip
    """Remove the folder ``path`` (relative to the folder ``dir_fd`` if given) and
    everything in it, as far as permissions allow (errors are ignored, as
    ``shutil.rmtree(ignore_errors=True)`` does; folders a consumer made read-only or
    unlistable get their owner's permissions back first). Each subfolder is first moved
    up to be a direct child of ``path``, so nothing recurses and at most two folders are
    open at once; folders are opened with O_NOFOLLOW, so a link swapped in for a folder is
    removed, never followed, and a folder on another file system (a mount, ``path`` itself
    included: a bind mount placed over a folder about to be removed) is left alone with
    everything on it. ``check()`` runs every few entries and may raise (a deadline: a
    consumer can add 300,000 files). ``only``: the (device, inode) the folder must have
    (one swapped in under its name is left alone). ``last``: a file directly in it that is
    removed after everything else, and only if everything else went (a marker that must
    outlive a removal cut short, or one that left something)."""
    top = open_owned(path, dir_fd)
    if top is None:
        return
    try:
        mount, st = mount_of(top), os.fstat(top)
        # the mount's root, not the folder it covers; or not the folder meant
        mine = mount == parent_mount(top) and only in (None, (st.st_dev, st.st_ino))
    except OSError as e:  # out of descriptors to look above it (EMFILE), say: left as it is
        _noted(e)
        mine = False
    if not mine:
        os.close(top)
        return
    try:
        progress, moved = True, [0]
        while progress:
            try:
                names = os.listdir(top)
            except OSError as e:
                _noted(e)
                break
            progress = False
            for name in names:
                if name != last:
                    progress = _remove_child(top, mount, name, moved, check) or progress
        if last is not None:  # only once all else went: a mount point, a descriptor short
            with suppress(OSError):
                if os.listdir(top) == [last]:
                    os.unlink(last, dir_fd=top)
    finally:
        os.close(top)
    with suppress(OSError):
        os.rmdir(path, dir_fd=dir_fd)


def own_at(path: Path | str, dir_fd: int | None = None, mount: Mount | None = None) -> None:
    """Give the real folder ``path`` (relative to ``dir_fd`` if given; on the mount
    ``mount`` if given: :func:`mount_of`) its owner's read, write and search permission
    if a chmod took any away; anything else there (a link above all, or a mount point) is
    left alone. Linux has no lchmod: the entry is opened as a path without following it,
    checked, and changed through its descriptor."""
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as e:
        _noted(e)
        return  # gone meanwhile: what needs it next reports the error
    try:
        st = os.fstat(fd)
        mine = stat.S_ISDIR(st.st_mode) and mount in (None, mount_of(fd))
        if mine and st.st_mode & 0o700 != 0o700:
            os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(st.st_mode) | 0o700)
    except OSError:
        pass  # not ours to change
    finally:
        os.close(fd)


def open_owned(path: Path | str, dir_fd: int | None, mount: Mount | None = None) -> int | None:
    """The folder ``path`` opened for changing what is in it, its owner's permissions
    given back first if a consumer took them away; None if it cannot be (not a folder),
    or if it is not on the mount ``mount`` (a mount point: left alone)."""
    try:
        fd = os.open(path, DIR_FLAGS, dir_fd=dir_fd)
    except PermissionError:
        own_at(path, dir_fd, mount)
        try:
            fd = os.open(path, DIR_FLAGS, dir_fd=dir_fd)
        except OSError as e:
            _noted(e)
            return None
    except OSError as e:
        _noted(e)
        return None
    st = os.fstat(fd)
    if mount is not None and mount_of(fd) != mount:
        os.close(fd)
        return None
    if st.st_mode & 0o700 != 0o700:  # listable but not writable: nothing could be removed
        with suppress(OSError):
            os.fchmod(fd, stat.S_IMODE(st.st_mode) | 0o700)
    return fd


def _remove_child(
    top: int, mount: Mount, name: str, moved: list[int], check: Callable[[], None]
) -> bool:
    """Remove ``name`` in the folder ``top``: a file or link at once; a folder once its
    subfolders are moved up beside it (they come in the next pass) and its files are gone.
    True if anything was removed or moved."""
    check()
    fd = open_owned(name, top, mount)
    if fd is None:  # a file, a link (to a folder too: never followed), or a mount point
        try:
            os.unlink(name, dir_fd=top)  # (unlink never removes a folder)
            return True
        except OSError:
            return False
    try:  # listed first: check() raises StorageTimeoutError, an OSError not to swallow
        with os.scandir(fd) as entries:
            listed = [(e.name, _real_dir(e)) for e in entries]
    except OSError as e:
        _noted(e)
        listed = []
    done = False
    try:
        for entry, is_dir in checked(listed, check):
            if is_dir:
                done = _move_up(fd, entry, top, moved) or done
            else:
                with suppress(OSError):
                    os.unlink(entry, dir_fd=fd)
                    done = True
    finally:
        os.close(fd)
    try:
        os.rmdir(name, dir_fd=top)
        return True
    except OSError:
        return done


def mount_of(fd: int) -> Mount:
    """(device, mount id) of the open ``fd``. A bind mount of a folder of the same file
    system has the device of what it covers but a mount id of its own (from statx, or
    /proc/self/fdinfo where statx has none; 0 where neither says)."""
    dev = os.fstat(fd).st_dev
    found = _statx_mnt_id(fd)
    if found is not None:
        return dev, found
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
            line = re.search(rb"^mnt_id:\s*(\d+)", f.read(), re.MULTILINE)
    except OSError:
        return dev, 0
    return dev, int(line.group(1)) if line else 0


def _statx_mnt_id(fd: int) -> int | None:
    """statx's mount id of ``fd`` (Linux 5.8+): 3 us, where reading fdinfo takes 10-18 us,
    once per file a checkout writes."""
    if _STATX is None:
        return None
    buf = ctypes.create_string_buffer(256)
    if _STATX(fd, b"", _AT_EMPTY_PATH, _STATX_MNT_ID, buf) != 0:
        return None
    mask, mnt_id = struct.unpack_from("=I", buf, 0)[0], struct.unpack_from("=Q", buf, 144)[0]
    return int(mnt_id) if mask & _STATX_MNT_ID else None


def born(path: Path | str | None = None, fd: int = -100) -> int:
    """The birth time (ns) of the folder or file open as ``fd``, or of ``path`` (relative
    to the folder open as ``fd`` if one is given; a link is not followed); 0 where the file
    system keeps none (NFS) or statx is missing. An inode number is handed out again once
    its file is gone; a birth time is not (engine/folders, engine/beneath)."""
    if _STATX is None:
        return 0
    buf = ctypes.create_string_buffer(256)
    name, flags = (b"", _AT_EMPTY_PATH) if path is None else (os.fsencode(path), _AT_NOFOLLOW)
    if _STATX(fd, name, flags, _STATX_BTIME, buf) != 0:
        return 0
    if not struct.unpack_from("=I", buf, 0)[0] & _STATX_BTIME:
        return 0
    sec, nsec = struct.unpack_from("=qI", buf, 80)  # stx_btime
    return int(sec) * 1_000_000_000 + int(nsec)


def _load_statx() -> Callable[[int, bytes, int, int, ctypes.Array[ctypes.c_char]], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).statx
    except (OSError, AttributeError):
        return None  # not glibc 2.28+: fdinfo instead
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


_AT_EMPTY_PATH, _STATX_MNT_ID = 0x1000, 0x1000  # <fcntl.h>, <linux/stat.h>
_AT_NOFOLLOW, _STATX_BTIME = 0x100, 0x800
_STATX = _load_statx()


def rename_new(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` only if nothing is at ``dst`` (FileExistsError): a plain
    rename would replace an empty folder there. ``renameat2(RENAME_NOREPLACE)`` where the
    C library and file system have it; elsewhere (NFS) a check, then the rename."""
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), 1) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):  # (the file system lacks the flag)
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _load_renameat2() -> Callable[[int, bytes, int, bytes, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None  # not glibc 2.28+
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_AT_FDCWD = -100  # <fcntl.h>
_RENAMEAT2 = _load_renameat2()


def is_mount_root(fd: int) -> bool:
    """The open folder ``fd`` is the root of a mount: a bind mount of a folder of the same
    file system included, which has the device of what it covers (os.path.ismount misses
    it) but a mount id of its own."""
    return mount_of(fd) != parent_mount(fd)


def parent_mount(fd: int) -> Mount:
    """The mount of the folder above the open folder ``fd``; differs from ``mount_of(fd)``
    exactly when ``fd`` is the root of a mount (``..`` of a mount's root is the folder
    above the mount point, on the covering file system)."""
    up = os.open("..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
    try:
        return mount_of(up)
    finally:
        os.close(up)


def mounts_within(path: Path | str) -> list[str]:
    """The mount points, as this process sees them (``/proc/self/mountinfo``), at ``path``
    or below it; empty where that cannot be read."""
    top = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().decode("utf-8", "surrogateescape").splitlines()
    except OSError:
        return []
    # the fifth field; space, tab, newline and backslash in it are octal escapes (\040)
    points = [_OCTAL.sub(lambda m: chr(int(m[1], 8)), ln.split(" ")[4]) for ln in lines
              if ln.count(" ") >= 4]  # fmt: skip
    return [p for p in points if p == top or p.startswith(top.rstrip("/") + "/")]


def _same_device(path: str, dev: int) -> bool:
    """A real folder (not a link) on the file system ``dev``."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_dev == dev


def _real_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _move_up(src: int, name: str, top: int, moved: list[int]) -> bool:
    """Rename the folder ``name`` in ``src`` to a fresh name in ``top`` (moving a folder
    needs write permission on it: a consumer's chmod 000 is undone once)."""
    owned = False
    for _ in range(1000):  # names already taken are skipped
        moved[0] += 1
        try:
            os.rename(name, f".removing-{moved[0]}", src_dir_fd=src, dst_dir_fd=top)
            return True
        except PermissionError:
            if owned:
                return False
            own_at(name, src, mount_of(top))
            owned = True
        except OSError as e:
            if e.errno not in _TAKEN:
                return False  # another file system mounted there, say: left alone
    return False
