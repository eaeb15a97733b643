"""Where datasets live: local paths and filesystem URIs, through pyarrow filesystems.

    locate("data/hopper")                 local path (relative paths stay relative in messages)
    locate("file:///mnt/efs/hopper")      local path too (pyarrow's file:// scheme)
    locate("s3://bucket/hopper")          pyarrow.fs.FileSystem.from_uri: s3://, gs://, hdfs://, ...
    locate("memory://scratch/ds")         a scheme pyarrow does not know but fsspec does (PyFileSystem over fsspec)
    register_filesystem("mine", fs)       mine://a/b -> path "a/b" inside `fs` (tests, custom stores)

Local datasets keep being handled with the operating system's own calls (rename, flock, memory-mapped reads),
so everything measured about them stays as it was; other filesystems go through pyarrow.fs. `public()` is
what the data layer hands back to callers: a `Path` for a local dataset (as before), the URI string otherwise.

Atomicity on a filesystem without directory rename (object stores): a dataset is written in place and its
metadata file last; readers find a dataset by its metadata file and read only the files it lists, so they
never see a half-written dataset or partition (see convert.py). `Location.create_exclusive` (the model
registry's compare-and-swap) is atomic on local filesystems and best effort on object stores (its docstring).
"""
from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.S)
_REGISTRY: dict[str, Any] = {}
_CACHE: dict[tuple[str, str], Any] = {}
_LOCK = threading.Lock()

__all__ = ["is_uri", "register_filesystem", "locate", "Location", "open_parquet"]


def is_uri(s: Any) -> bool:
    """True for `scheme://...` strings (s3://, gs://, file://, any registered or fsspec scheme); False for plain
    paths, `builtin:NAME` and `minari:ID`."""
    return isinstance(s, str) and _URI.match(s) is not None


def register_filesystem(scheme: str, filesystem: Any | None) -> None:
    """Serve `scheme://PATH` from `filesystem` (a pyarrow.fs.FileSystem; PATH is used as its path). None removes
    the scheme. Registered schemes win over pyarrow's and fsspec's own. The filesystem object travels to Ray
    workers by pickling: an in-memory one is a different, empty filesystem in another process, so datasets on
    it convert in-process only."""
    scheme = scheme.lower()
    with _LOCK:
        if filesystem is None:
            _REGISTRY.pop(scheme, None)
        else:
            _REGISTRY[scheme] = filesystem
        for k in [k for k in _CACHE if k[0] == scheme]:
            del _CACHE[k]


@dataclass(frozen=True)
class Location:
    """A file or directory: `fs` and the path inside it, plus how to name it (`str()`)."""

    fs: Any
    path: str
    """Path inside `fs` (absolute for local files)."""
    shown: str
    """How messages name it: the path as the user gave it for local files, else the URI."""
    local: bool
    query: str = ""
    """A URI's query string (s3://bucket/key?region=...), kept on every file below it."""

    def __str__(self) -> str:
        return self.shown + (f"?{self.query}" if self.query else "")

    def __truediv__(self, name: str) -> "Location":
        if self.local:
            return Location(self.fs, os.path.join(self.path, name), os.path.join(self.shown, name), True)
        return Location(self.fs, f"{self.path.rstrip('/')}/{name}", f"{self.shown.rstrip('/')}/{name}", False,
                        self.query)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> "Location":
        if self.local:
            return Location(self.fs, os.path.dirname(self.path.rstrip("/")) or "/",
                            os.path.dirname(self.shown.rstrip("/")) or ".", True)
        return Location(self.fs, self.path.rstrip("/").rsplit("/", 1)[0], self.shown.rstrip("/").rsplit("/", 1)[0],
                        False, self.query)

    def public(self) -> Path | str:
        """What callers get back: a Path for local files (as before URIs), the URI string otherwise."""
        return Path(self.shown) if self.local else str(self)

    # --- queries -------------------------------------------------------------------------------------------
    def _type(self):
        return self.fs.get_file_info(self.path).type

    def exists(self) -> bool:
        if self.local:
            return os.path.lexists(self.path)
        from pyarrow.fs import FileType
        return self._type() != FileType.NotFound

    def is_dir(self) -> bool:
        if self.local:
            return os.path.isdir(self.path)
        from pyarrow.fs import FileType
        return self._type() == FileType.Directory

    def is_file(self) -> bool:
        if self.local:
            return os.path.isfile(self.path)
        from pyarrow.fs import FileType
        return self._type() == FileType.File

    def files_exist(self, children: list["Location"]) -> list[bool]:
        """Whether each of `children` is a file (one request per file locally, one listing call otherwise)."""
        if self.local:
            return [os.path.isfile(c.path) for c in children]
        from pyarrow.fs import FileType
        infos = self.fs.get_file_info([c.path for c in children])
        return [i.type == FileType.File for i in infos]

    def listdir(self) -> list[str]:
        """Names directly inside this directory ([] if it is not one)."""
        if self.local:
            try:
                return os.listdir(self.path)
            except (FileNotFoundError, NotADirectoryError):
                return []
        from pyarrow.fs import FileSelector
        try:
            infos = self.fs.get_file_info(FileSelector(self.path, allow_not_found=True))
        except (OSError, ValueError):
            return []
        return [i.path.rstrip("/").rsplit("/", 1)[-1] for i in infos]

    def glob_parquet(self, pattern: str = r"part-[^/]*/[^/]*\.parquet") -> list[str]:
        """Paths below this directory, relative to it, matching `pattern` (sorted)."""
        if self.local:
            root = Path(self.path)
            return sorted(str(p.relative_to(root)) for p in root.glob("part-*/*.parquet"))
        from pyarrow.fs import FileSelector
        try:
            infos = self.fs.get_file_info(FileSelector(self.path, recursive=True, allow_not_found=True))
        except (OSError, ValueError):
            return []
        base = self.path.strip("/")
        rel = [i.path.strip("/")[len(base):].lstrip("/") for i in infos if i.is_file]
        return sorted(r for r in rel if re.fullmatch(pattern, r))

    # --- reading --------------------------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        if self.local:
            with open(self.path, "rb") as f:
                return f.read()
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    # --- writing --------------------------------------------------------------------------------------------
    def mkdir(self) -> None:
        if self.local:
            os.makedirs(self.path, exist_ok=True)
        else:
            self.fs.create_dir(self.path, recursive=True)

    def rmtree(self) -> None:
        """Remove this directory and everything in it (no error if it is gone)."""
        if self.local:
            import shutil
            shutil.rmtree(self.path, ignore_errors=True)
            return
        try:
            self.fs.delete_dir(self.path)
        except (OSError, FileNotFoundError):
            pass

    def write_bytes(self, data: bytes) -> None:
        """Write a whole file; on an object store the object appears complete or not at all."""
        if self.local:
            with open(self.path, "wb") as f:
                f.write(data)
            return
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)

    def write_atomic(self, data: bytes) -> None:
        """Write a whole file so that readers see the old content or the new, never part of it: locally a
        temporary file beside it, fsync, rename; on an object store one PUT (objects appear whole)."""
        if not self.local:
            self.write_bytes(data)
            return
        tmp = self._write_temp(data)
        try:
            os.replace(tmp, self.path)
        except BaseException:
            _unlink(tmp)
            raise

    def create_exclusive(self, data: bytes) -> bool:
        """Create this file with `data` only if it does not exist; True if this call created it.

        Local filesystems (and NFS): atomic. The content goes to a finished temporary file that is hard-linked
        under the name (link(2) fails if the name exists), so of several racing callers exactly one wins and
        readers never see a partial file. Where hard links are not supported, O_CREAT|O_EXCL decides the winner
        (still exactly one) and the content follows. Object stores through pyarrow have no conditional write:
        best effort only (check, PUT, read back and compare `data`, which callers make unique): a competitor
        whose PUT lands after this call's read-back is not detected, and then both callers believe they won."""
        if not self.local:
            if self.exists():
                return False
            self.write_bytes(data)
            try:
                return self.read_bytes() == data
            except (OSError, FileNotFoundError):
                return False
        tmp = self._write_temp(data)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links on this filesystem: O_EXCL decides, the content follows
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return True
        finally:
            _unlink(tmp)

    def _write_temp(self, data: bytes) -> str:
        """A finished, fsynced temporary file beside this one (mode as a plain open() would give)."""
        import tempfile
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.path.basename(self.path)}.", dir=os.path.dirname(self.path))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        except BaseException:
            _unlink(tmp)
            raise
        return tmp


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _cached(scheme: str, key: str, make):
    with _LOCK:
        fs = _CACHE.get((scheme, key))
    if fs is None:
        fs = make()
        with _LOCK:
            _CACHE[(scheme, key)] = fs
    return fs


def locate(p: str | os.PathLike | Location) -> Location:
    """A `Location` for a local path or a filesystem URI (module docstring). Raises DataError for a URI whose
    scheme neither pyarrow nor fsspec knows."""
    if isinstance(p, Location):
        return p
    s = os.fspath(p)
    m = _URI.match(s) if isinstance(s, str) else None
    if m is None:
        local = Path(s).expanduser()
        return Location(_local_fs(), str(local.absolute()), str(local), True)
    scheme, rest = m.group(1).lower(), m.group(2)
    rest, _, query = rest.partition("?")
    shown = f"{m.group(1)}://{rest.rstrip('/') or rest}"
    with _LOCK:
        registered = _REGISTRY.get(scheme)
    if registered is not None:
        return Location(registered, rest.rstrip("/") or "/", shown, False, query)
    if scheme == "file":
        from urllib.parse import unquote, urlparse
        path = unquote(urlparse(s).path).rstrip("/") or "/"
        return Location(_local_fs(), path, path, True)
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        if scheme in ("s3", "gs", "gcs"):  # one filesystem per bucket and options (resolving a region is a request)
            path = rest  # bucket/key
            fs = _cached(scheme, path.split("/", 1)[0] + "?" + query, lambda: pafs.FileSystem.from_uri(s)[0])
        else:
            fs, path = pafs.FileSystem.from_uri(s)
    except (pa.ArrowInvalid, ValueError, pa.ArrowNotImplementedError) as e:
        fs, path = _fsspec(scheme, s, e)
    return Location(fs, path.rstrip("/") or "/", shown, False, query)


def _fsspec(scheme: str, uri: str, why: Exception):
    from ..errors import DataError
    try:
        import fsspec
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        cls = fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as e:
        raise DataError(f"{uri}: unknown filesystem scheme {scheme!r} (pyarrow: {why}; fsspec: {e}); use a local "
                        f"path, file://, s3://, gs://, or register a pyarrow filesystem for it "
                        f"(rayoffline.data.register_filesystem)") from None
    fs = _cached(scheme, "", lambda: PyFileSystem(FSSpecHandler(cls())))
    return fs, cls._strip_protocol(uri)


_LOCAL = None


def _local_fs():
    global _LOCAL
    if _LOCAL is None:
        from pyarrow.fs import LocalFileSystem
        _LOCAL = LocalFileSystem()
    return _LOCAL


def open_parquet(f: str | os.PathLike | Location, **kw):
    """pyarrow.parquet.ParquetFile of a local path or URI (keyword arguments as ParquetFile's)."""
    import pyarrow.parquet as pq

    loc = locate(f)
    if loc.local:
        return pq.ParquetFile(loc.path, **kw)
    return pq.ParquetFile(loc.path, filesystem=loc.fs, **kw)


def read_parquet_metadata(f: str | os.PathLike | Location):
    """The footer of a Parquet file (no data read)."""
    import pyarrow.parquet as pq

    loc = locate(f)
    if loc.local:
        return pq.read_metadata(loc.path)
    return pq.read_metadata(loc.path, filesystem=loc.fs)
