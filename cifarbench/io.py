"""Safe writes: a result or checkpoint is either the old file or the complete new one, never half of it, never a
file the user made, and no temporary outlives the process that made it.

- ``atomic_path`` writes beside the target under a name holding the writer's pid (``.NAME.PID.RAND.tmp``), flushes
  it to disk, gives it the one mode every output gets (0666 & ~umask), renames it over the target and flushes the
  folder. The temporary is removed on any exit the process sees (an exception, Ctrl-C, SIGTERM through the CLI's
  handler); one left by a killed process (``kill -9``, power loss) is swept by the next write into that folder.
- ``scratch_dir`` is the same for a temporary folder.
- ``output_folder`` guards a command's ``--out``: a file there may be replaced only if it is absent or is a
  previous cifarbench output (its bytes' sha256 is recorded in the folder's ``.cifarbench-outputs.jsonl``).
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)
#: the mode of every file cifarbench writes (results, figures, checkpoints, artifacts): what open() would give
FILE_MODE = 0o666 & ~_UMASK

# .NAME.PID.RAND.tmp; RAND is hex from secrets.token_hex, so a user's own ``.a.1.b.tmp`` is not ours unless it has
# this exact shape
_TMP_RE = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{12}\.tmp$")
_swept: set[str] = set()  # folders already swept by this process: one listing per folder, not one per write


def pid_alive(pid: int) -> bool:
    """True when a process ``pid`` exists (ours, or another user's); False only when it surely does not."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists but belongs to someone else
        return True
    return True


def _remove(path: str | Path) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


def sweep_stale(folder: str | Path, pattern: re.Pattern = _TMP_RE) -> list[str]:
    """Remove entries of ``folder`` whose name matches ``pattern`` (group 1: the writer's pid) and whose writer is
    gone; return their names. Errors (a folder we cannot list or write) are ignored: sweeping is housekeeping."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = pattern.match(name)
        if m and not pid_alive(int(m.group(1))):
            try:
                _remove(os.path.join(folder, name))
                removed.append(name)
            except OSError:
                pass
    return removed


def _sweep_once(folder: str | Path) -> None:
    key = os.path.abspath(folder)
    if key not in _swept and os.path.isdir(key):
        _swept.add(key)
        sweep_stale(key)


def _fsync_dir(folder: str | Path) -> None:
    """Make a rename in ``folder`` durable; file systems that cannot fsync a folder are left as they are."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_folder(folder: Path) -> None:
    """mkdir -p, where a regular file in the way is reported as that file: ``a.txt: Not a directory``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        base = _nearest_existing(folder)
        if base.is_dir():
            raise
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(base)) from None


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; when the block ends normally the temporary is flushed to disk,
    given ``FILE_MODE`` and renamed over ``path`` (then the folder is flushed). The writer may create the
    temporary itself (safetensors, torch.save, onnx.save all do). On any exception it is removed and ``path`` is
    untouched. Inside a guarded ``output_folder`` the target must be ours to replace (see ``output_folder``)."""
    path = Path(path)
    guard = _guard_for(path)
    if guard is not None:
        guard.check(path)
    folder = path.parent
    _make_folder(folder)
    _sweep_once(folder)
    tmp = folder / f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    os.close(fd)
    try:
        try:
            yield tmp
        except Exception as exc:
            _raise_as_os_error(exc, path, folder, tmp)
            raise
        try:
            # the writer may have made the file anew (safetensors does, with mode 0600): one mode for all outputs
            os.chmod(tmp, FILE_MODE)
            _fsync_file(tmp)  # data on disk before the rename makes it visible: no empty file after a power loss
            if guard is not None:
                guard.record(path, tmp)
            os.replace(tmp, path)
        except OSError as exc:
            _raise_as_os_error(exc, path, folder, tmp)
            raise
        _fsync_dir(folder)
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)


def _raise_as_os_error(exc: Exception, path: Path, folder: Path, tmp: Path) -> None:
    """Re-raise a writer's failure that is a file-system error as an ``OSError`` naming ``path`` (not the
    temporary), so the CLI prints one line. safetensors says ``... (os error 28)``; torch.save only "unexpected
    pos" when the disk fills, so a full file system (checked while the temporary still takes its space) is
    the cause then. Anything else, and an OSError about another file, is left alone."""
    if isinstance(exc, OSError):
        if exc.errno and (exc.filename is None or str(exc.filename).startswith(str(tmp))):
            raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path)) from exc
        return
    m = re.search(r"os error (\d+)", str(exc))
    if m:
        code = int(m.group(1))
        raise OSError(code, os.strerror(code), str(path)) from exc
    try:
        full = os.statvfs(folder).f_bavail == 0
    except (OSError, AttributeError):
        full = False
    if full:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc


@contextmanager
def scratch_dir(parent: str | Path, prefix: str):
    """A fresh empty folder ``PARENT/PREFIX<pid>.<rand>`` for temporary files, removed with its contents when the
    block ends (normally, by an exception, Ctrl-C or SIGTERM through the CLI). On entry, folders of the same
    prefix left by processes that no longer run (``kill -9``) are removed."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(parent, re.compile(rf"^{re.escape(prefix)}(\d+)\.[A-Za-z0-9_]{{8}}$"))
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}.", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(_strict(obj), indent=2, allow_nan=False) + "\n")


def _strict(obj):
    """``obj`` as standard JSON values: arrays and tensors as lists, paths as strings, and a NaN or infinite float
    as ``null`` (JSON has neither; Python's ``NaN`` tokens are refused by strict parsers such as browsers' and
    jq's)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return _strict(_jsonable(obj))


def _jsonable(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def to_json(obj) -> str:
    return json.dumps(_strict(obj), allow_nan=False)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ guarded outputs
MANIFEST = ".cifarbench-outputs.jsonl"
_guards: list["_Guard"] = []  # the output folders of the command running now (a stack: nested commands in tests)


def _nearest_existing(path: Path) -> Path:
    p = path
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def check_out_path(path: str | Path, option: str = "--out", folder: bool = True) -> Path:
    """Fail now, in one line, if ``path`` cannot be the output ``folder`` (or file) a command would write later:
    it is a file (a folder is wanted) or a folder (a file is wanted), it lies under a regular file, or the place
    it would be made in is not writable. Creates nothing."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise UserError(f"{option} {path}: is a file, not a folder; choose another {option}")
    if not folder and path.is_dir():
        raise UserError(f"{option} {path}: is a folder; give a file name")
    base = _nearest_existing(path if folder else path.parent)
    if not base.is_dir():
        raise UserError(f"{option} {path}: {base} is a file, not a folder; choose another {option}")
    if not os.access(base, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if _read_only_fs(base) else "is not writable"
        raise UserError(f"{option} {path}: {base} {why}; choose another {option}")
    return path


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


class _Guard:
    """One guarded output folder: its manifest (an append-only log of ``{"name", "sha256"}`` lines, one per file
    cifarbench wrote there) and the sub-folders it covers."""

    def __init__(self, root: Path, subdirs: tuple[str, ...], option: str, files: tuple[str, ...] | None = None):
        self.root, self.option = root, option
        self.dirs = {os.path.abspath(root / d) for d in ("", *subdirs)}
        self.files = files  # when set: only these names (a single-file --out such as export's)
        self.known: dict[str, set[str]] | None = None

    def covers(self, path: Path) -> bool:
        if os.path.abspath(path.parent) not in self.dirs:
            return False
        return self.files is None or self._name(path) in self.files

    def _name(self, path: Path) -> str:
        return os.path.relpath(os.path.abspath(path), os.path.abspath(self.root)).replace(os.sep, "/")

    def _load(self) -> dict[str, set[str]]:
        if self.known is None:
            self.known = {}
            try:
                with open(self.root / MANIFEST, encoding="utf-8") as f:
                    for line in f:
                        try:
                            entry = json.loads(line)
                            self.known.setdefault(str(entry["name"]), set()).add(str(entry["sha256"]))
                        except (ValueError, KeyError, TypeError):
                            continue  # a line torn by a crash: the entries around it still count
            except FileNotFoundError:
                pass
            except (OSError, UnicodeDecodeError):
                pass  # unreadable manifest: nothing is known to be ours, so nothing existing is replaced
        return self.known

    def check(self, path: Path) -> None:
        """Raise unless ``path`` may be written: absent, or bytes any cifarbench run recorded under that name."""
        if not os.path.lexists(path):
            return
        name = self._name(path)
        if os.path.isdir(path) or os.path.islink(path):
            ours = False
        else:
            hashes = self._load().get(name)
            ours = bool(hashes) and file_sha256(path) in hashes
        if not ours:
            raise UserError(f"{path} already exists and is not a cifarbench output; nothing was written: "
                            f"move it or choose another {self.option}")

    def record(self, path: Path, tmp: Path) -> None:
        """Log the new bytes' hash before they replace ``path``, so a crash between the two leaves a file whose
        bytes are logged either way (the old hash stays in the log too)."""
        name, digest = self._name(path), file_sha256(tmp)
        known = self._load()
        if digest in known.get(name, ()):
            return
        self.root.mkdir(parents=True, exist_ok=True)
        manifest = self.root / MANIFEST
        fd = os.open(manifest, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
        try:
            os.write(fd, (json.dumps({"name": name, "sha256": digest}) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        known.setdefault(name, set()).add(digest)

    def compact(self) -> None:
        """Rewrite a long manifest keeping only the hashes of the files as they are now (never drops the hash of
        a file that still holds it)."""
        known = self._load()
        lines = sum(len(v) for v in known.values())
        if lines < 256 or lines < 4 * len(known):
            return
        kept = {}
        for name, hashes in known.items():
            p = self.root / name
            if p.is_file():
                digest = file_sha256(p)
                if digest in hashes:
                    kept[name] = {digest}
        text = "".join(json.dumps({"name": n, "sha256": h}) + "\n" for n, hs in sorted(kept.items()) for h in hs)
        tmp = self.root / f".{MANIFEST}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, FILE_MODE)
            os.replace(tmp, self.root / MANIFEST)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)
        self.known = kept


def _guard_for(path: Path) -> _Guard | None:
    for guard in reversed(_guards):
        if guard.covers(path):
            return guard
    return None


@contextmanager
def output_folder(path: str | Path, names=(), subdirs: tuple[str, ...] = (), option: str = "--out",
                  adopt=()):
    """Guard the output folder ``path`` for the block: every ``atomic_path`` write into it (or into ``subdirs``)
    must target a file that is absent or a previous cifarbench output, and is logged in its manifest.

    Checks now, before any work: ``path`` can be a writable folder, and each of ``names`` known up front is ours
    to write. ``adopt``: names of files already there that the caller has verified as cifarbench's own (a run
    being resumed, perhaps written before manifests existed): logged as ours first. Yields ``path``; the folder
    itself is made by the first write. ``path`` None (no ``--out``) guards nothing and yields None."""
    if path is None:
        yield None
        return
    path = check_out_path(path, option)
    guard = _Guard(path, tuple(subdirs), option)
    for folder in guard.dirs:  # temporaries of a killed earlier run go now, even if this run writes nothing
        _sweep_once(folder)
    for name in adopt:
        if (path / name).is_file() and not (path / name).is_symlink():
            guard.record(path / name, path / name)
    for name in names:
        guard.check(path / name)
    _guards.append(guard)
    try:
        yield path
    finally:
        _guards.remove(guard)
        if path.is_dir():
            try:
                guard.compact()
            except OSError:
                pass


def active_guards() -> list[tuple]:
    """The guarded output folders of the running command, as picklable specs for :func:`guarded`: a process
    that writes into them on this command's behalf (the figure worker) checks and logs its files the same way."""
    return [(str(g.root), tuple(sorted(os.path.relpath(d, os.path.abspath(g.root)) for d in g.dirs)), g.option,
             g.files) for g in _guards]


@contextmanager
def guarded(specs: list[tuple]):
    """Guard the folders of :func:`active_guards` ``specs`` for the block, in this process: writes into them are
    checked and logged in their manifests as in the command itself (appends: safe beside the command's own)."""
    made = [_Guard(Path(root), subdirs, option, files) for root, subdirs, option, files in specs]
    _guards.extend(made)
    try:
        yield
    finally:
        for guard in made:
            _guards.remove(guard)


def reload_manifests() -> None:
    """Forget what the active guards read of their manifests: another process (the figure worker) logged files
    there, which the next check, and ``compact`` at the end, must see."""
    for guard in _guards:
        guard.known = None


def check_outputs(paths) -> None:
    """Check, before the work that makes them, files whose names become known inside an ``output_folder`` block
    (mine's per-filter figures): each must be ours to write. Paths outside every guarded folder pass."""
    for p in paths:
        guard = _guard_for(Path(p))
        if guard is not None:
            guard.check(Path(p))


@contextmanager
def output_file(path: str | Path, option: str = "--out"):
    """Like ``output_folder`` for a single output file (export's and bench's ``--out FILE``): it must be absent or
    a previous cifarbench output; its hash is logged in its folder's manifest. ``path`` None guards nothing."""
    if path is None:
        yield None
        return
    path = check_out_path(path, option, folder=False)
    guard = _Guard(path.parent, (), option, files=(path.name,))
    _sweep_once(path.parent)
    guard.check(path)
    _guards.append(guard)
    try:
        yield path
    finally:
        _guards.remove(guard)


def describe_os_error(exc: OSError) -> str:
    """One line for a file-system error: the path and what went wrong, e.g. ``/ro/x.csv: Read-only file system``."""
    what = exc.strerror or (errno.errorcode.get(exc.errno, "") if exc.errno else "") or str(exc) or type(exc).__name__
    names = [n for n in (exc.filename, exc.filename2) if n]
    if not names:
        return what
    return f"{' -> '.join(str(n) for n in names)}: {what}"
