"""The filesystem Ray Train writes the run folder through, with our storage retries.

Ray Train's controller writes its own files to the run's storage (the checkpoint-manager snapshot after
every reported checkpoint, the run state) through the ``pyarrow.fs`` filesystem in ``RunConfig``. The
AWS SDK's retry strategy inside ``pyarrow.fs.S3FileSystem`` does not cover every transient fault: an
endpoint that refuses connections fails ``CreateMultipartUpload`` at once ("curlCode: 7 … after 0 ms"),
and a controller error ends the run however large ``failure.max_failures`` is. So the S3 filesystem
handed to Ray is wrapped here: every call goes through :func:`ssfer_dist.storage.retry` (the same transient
faults, backoff and ``run.storage_retry_s`` budget as every other storage call), and
written files are buffered and uploaded whole on ``close()``, so a retry re-sends the complete object
(S3 objects appear whole or not at all). Permanent faults (missing key, access denied) are raised at once.

The wrapper pickles (Ray ships the filesystem to its controller and workers) and holds no credential:
the inner ``S3FileSystem`` reads them from each process's environment.
"""
from __future__ import annotations

import io
import tempfile
from typing import Any, Callable, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs

from ssfer_dist.storage import retry

T = TypeVar("T")

SPOOL_BYTES = 64 * 1024 * 1024      # written files above this spill from memory to a temporary file


class _UploadOnClose(io.RawIOBase):
    """A write-only file that keeps what is written (memory, then a temporary file past ``SPOOL_BYTES``)
    and uploads it whole, with retries, when closed."""

    def __init__(self, handler: "RetryingHandler", path: str, metadata: Any) -> None:
        self._h, self._path, self._metadata = handler, path, metadata
        self._buf = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
        self._done = False

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        return self._buf.write(b)

    def close(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            def upload() -> None:
                self._buf.seek(0)
                with self._h.inner.open_output_stream(self._path, metadata=self._metadata) as out:
                    while True:
                        chunk = self._buf.read(8 * 1024 * 1024)
                        if not chunk:
                            break
                        out.write(chunk)

            retry(f"write {self._path}", upload, self._h.retry_s)
        finally:
            self._buf.close()
            super().close()


class RetryingHandler(pafs.FileSystemHandler):
    """A ``pyarrow.fs`` handler that delegates to ``inner`` and retries its transient faults."""

    def __init__(self, inner: pafs.FileSystem, retry_s: float) -> None:
        self.inner = inner
        self.retry_s = float(retry_s)

    def __reduce__(self):
        return (RetryingHandler, (self.inner, self.retry_s))

    def __eq__(self, other) -> bool:
        return isinstance(other, RetryingHandler) and self.inner.equals(other.inner)

    def __ne__(self, other) -> bool:
        return not self.__eq__(other)

    def _r(self, what: str, fn: Callable[[], T]) -> T:
        return retry(what, fn, self.retry_s)

    def get_type_name(self) -> str:
        return "ssfer-retrying-" + self.inner.type_name

    def normalize_path(self, path):
        return self.inner.normalize_path(path)

    def get_file_info(self, paths):
        return self._r(f"stat {paths[:3]}", lambda: self.inner.get_file_info(paths))

    def get_file_info_selector(self, selector):
        return self._r(f"list {selector.base_dir}", lambda: self.inner.get_file_info(selector))

    def create_dir(self, path, recursive):
        return self._r(f"mkdir {path}", lambda: self.inner.create_dir(path, recursive=recursive))

    def delete_dir(self, path):
        return self._r(f"delete {path}", lambda: self.inner.delete_dir(path))

    def delete_dir_contents(self, path, missing_dir_ok=False):
        return self._r(f"delete {path}/*",
                       lambda: self.inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self):
        return self._r("delete /*", lambda: self.inner.delete_dir_contents("/", accept_root_dir=True))

    def delete_file(self, path):
        return self._r(f"delete {path}", lambda: self.inner.delete_file(path))

    def move(self, src, dest):
        return self._r(f"move {src}", lambda: self.inner.move(src, dest))

    def copy_file(self, src, dest):
        return self._r(f"copy {src}", lambda: self.inner.copy_file(src, dest))

    def open_input_stream(self, path):
        return self._r(f"open {path}", lambda: self.inner.open_input_stream(path))

    def open_input_file(self, path):
        return self._r(f"open {path}", lambda: self.inner.open_input_file(path))

    def open_output_stream(self, path, metadata):
        return pa.PythonFile(_UploadOnClose(self, path, metadata), mode="w")

    def open_append_stream(self, path, metadata):
        return self._r(f"append {path}", lambda: self.inner.open_append_stream(path, metadata=metadata))


def retrying(fs: pafs.FileSystem, retry_s: float) -> pafs.FileSystem:
    return pafs.PyFileSystem(RetryingHandler(fs, retry_s))
