"""One small storage layer for local paths and ``s3://bucket/prefix`` URLs.

S3 goes through boto3, which honours ``AWS_ENDPOINT_URL`` / ``AWS_ACCESS_KEY_ID`` / ... from the
environment; large uploads use boto3's managed multipart transfer. Transient faults (endpoint
unreachable, connection reset, 5xx, throttling) are retried with exponential backoff for a bounded
time (:func:`set_retry_budget`, ``run.storage_retry_s``; botocore's own standard retries inside each
attempt); streaming reads resume with a ranged GET from the byte they reached. Permanent faults
(missing key, access denied) fail at once with the URL and the S3 code. Local writes are atomic
(temporary name + ``os.replace``); S3 objects are atomic by nature (a PUT or a completed multipart
upload is visible whole or not at all).

Shared by ``sharding/`` and the training code; imports neither torch nor ray.
"""
from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import random
import re
import shutil
import tempfile
import threading
import time
from typing import IO, Callable, Dict, Iterator, List, Optional, Tuple, TypeVar

from ssfer_dist.errors import UserError

__all__ = [
    "StorageError",
    "is_s3",
    "parse_s3",
    "join",
    "exists",
    "list_files",
    "get_bytes",
    "put_bytes",
    "put_file",
    "get_file",
    "delete",
    "open_read",
    "check_writable",
    "register_webdataset_s3",
    "list_sizes",
    "delete_tree",
    "set_retry_budget",
    "retry",
    "is_transient",
    "s3_code",
    "TRANSIENT_S3_CODES",
    "PERMANENT_S3_CODES",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRY_ENV = "SSFER_STORAGE_RETRY_S"
DEFAULT_RETRY_S = 120.0

MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNK = 16 * 1024 * 1024



class StorageError(UserError):
    """A storage failure with a one-line message naming the URL (``s3_code``: the S3 error code, if any)."""

    s3_code = None


def set_retry_budget(seconds: float) -> None:
    """How long transient S3 faults are retried (also for processes forked or spawned later)."""
    os.environ[RETRY_ENV] = str(float(seconds))


def _retry_budget() -> float:
    try:
        return float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_S))
    except ValueError:
        return DEFAULT_RETRY_S


# S3 error codes as botocore reports them (``response["Error"]["Code"]``). Arrow's S3 filesystem raises an
# OSError whose text names the same error in the C++ SDK's spelling (``AWS Error SLOW_DOWN``, ``HTTP status 503``);
# :func:`s3_code` reads both, so one table serves boto3, arrowfs and the fault classifier.
TRANSIENT_S3_CODES = frozenset({
    "500", "502", "503", "504", "InternalError", "InternalFailure", "ServiceUnavailable", "SlowDown",
    "RequestTimeout", "RequestTimeTooSkewed", "Throttling", "ThrottlingException", "RequestLimitExceeded",
    "BadGateway", "GatewayTimeout", "NetworkConnection"})
PERMANENT_S3_CODES = frozenset({
    "NoSuchKey", "NoSuchBucket", "404", "NotFound", "AccessDenied", "403", "Forbidden", "InvalidAccessKeyId",
    "SignatureDoesNotMatch", "AllAccessDisabled", "InvalidBucketName", "EntityTooLarge", "QuotaExceeded"})
# connection trouble that arrives as text only (curl's words inside Arrow's OSError)
_TRANSIENT_TEXT = ("curlCode", "Connection reset", "Connection refused", "connection was closed",
                   "Timeout was reached")
_SDK_NAMES = {(f"HTTP status {c}" if c.isdigit() else re.sub(r"(?<!^)(?=[A-Z])", "_", c).upper()): c
              for c in TRANSIENT_S3_CODES | PERMANENT_S3_CODES}
_SDK_RE = re.compile(r"\b(%s)\b" % "|".join(sorted(map(re.escape, _SDK_NAMES), key=len, reverse=True)))
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 8.0


def s3_code(e: BaseException) -> Optional[str]:
    """The S3 error code of ``e`` (botocore's response, a :class:`StorageError`'s ``s3_code``, or the SDK
    error an Arrow ``OSError`` names), else ``None``."""
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        return str(resp.get("Error", {}).get("Code", "")) or None
    code = getattr(e, "s3_code", None)
    if code or not isinstance(e, OSError) or "AWS Error" not in str(e):
        return code
    found = _SDK_RE.findall(str(e))
    permanent = [_SDK_NAMES[f] for f in found if _SDK_NAMES[f] in PERMANENT_S3_CODES]
    return (permanent or [_SDK_NAMES[f] for f in found] or [None])[0]


def _connection_errors() -> Tuple[type, ...]:
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError, IncompleteReadError, ResponseStreamingError
        from urllib3.exceptions import HTTPError as Urllib3Error
    except ImportError:  # pragma: no cover
        return ConnectionError, TimeoutError
    return (BotoConnectionError, HTTPClientError, ResponseStreamingError, IncompleteReadError, Urllib3Error,
            ConnectionError, TimeoutError)


def is_transient(e: BaseException) -> bool:
    """A fault that may go away by itself: connection trouble, timeouts, 5xx, throttling. A missing key,
    denied access or a local file error is permanent."""
    if isinstance(e, (StorageError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    code = s3_code(e)
    if code is not None:
        return code in TRANSIENT_S3_CODES
    if isinstance(e, _connection_errors()):
        return True
    return isinstance(e, OSError) and any(m in str(e) for m in _TRANSIENT_TEXT)


def retry(what: str, fn: Callable[[], T], budget_s: Optional[float] = None, *,
          give_up: Optional[Callable[[Exception, int], Exception]] = None,
          sleep: Callable[[float], None] = time.sleep) -> T:
    """``fn()``, retried while it fails transiently (:func:`is_transient`) and ``budget_s`` lasts (default: the
    storage retry budget, ``run.storage_retry_s``); the backoff doubles from 0.5 s to 8 s, jittered so that
    ranks hitting one endpoint spread out. A failure that ends the retries is raised as ``give_up(error,
    attempts)`` (from the error) when given, else as itself."""
    deadline = time.monotonic() + (_retry_budget() if budget_s is None else budget_s)
    delay, attempt = RETRY_FIRST_S, 1
    while True:
        try:
            return fn()
        except Exception as e:
            if not is_transient(e) or time.monotonic() + delay > deadline:
                err = e if give_up is None else give_up(e, attempt)
                if err is e:
                    if attempt > 1:
                        log.warning("storage: %s failed after %d attempts", what, attempt)
                    raise
                raise err from e
            log.warning("storage: %s failed (%s); retry %d in %.1f s", what, _first_line(e)[:200], attempt, delay)
            sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, RETRY_MAX_S)
            attempt += 1


def _retrying(url: str, fn: Callable[[], T]) -> T:
    """:func:`retry` for one URL: a failure left is raised as a one-line :class:`StorageError` naming ``url``."""
    return retry(url, fn, give_up=lambda e, n: e if isinstance(e, StorageError) else _s3_error(url, e, n))


def is_s3(url: str) -> bool:
    return str(url).startswith("s3://")


def parse_s3(url: str) -> Tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_s3(url):
        raise StorageError(f"not an s3:// URL: {url}")
    rest = url[5:]
    bucket, _, key = rest.partition("/")
    if len(bucket) < 3:
        raise StorageError(f"{url}: bucket name must have at least 3 characters")
    return bucket, key


def join(base: str, *parts: str) -> str:
    """Join URL/path components with ``/`` (works for both s3:// URLs and local paths)."""
    base = str(base)
    if is_s3(base):
        out = base.rstrip("/")
        for p in parts:
            out = out + "/" + str(p).strip("/")
        return out
    return os.path.join(base, *[str(p) for p in parts])


_local = threading.local()


@functools.lru_cache(maxsize=None)
def _client_config():
    from botocore.config import Config

    # a few quick attempts inside each try; the bounded backoff across an outage is _retrying's
    return Config(retries={"max_attempts": 3, "mode": "standard"}, max_pool_connections=32,
                  connect_timeout=5, read_timeout=60)


def s3_client():
    """A boto3 S3 client per thread (boto3 clients are thread-safe but sessions are not) and per
    process: a forked child (the shard builder's workers, DataLoader workers) makes its own rather
    than sharing the parent's pooled connections."""
    cli = getattr(_local, "client", None)
    key = (os.getpid(),) + tuple(os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                                              "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                                                              "AWS_PROFILE"))
    if cli is None or getattr(_local, "client_key", None) != key:
        import boto3

        session = boto3.session.Session()
        cli = session.client("s3", config=_client_config())
        _local.client = cli
        _local.client_key = key
    return cli


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _s3_error(url: str, exc: Exception, attempts: int = 1) -> StorageError:
    msg = _first_line(exc)
    if attempts > 1:
        msg += f" (after {attempts} attempts, run.storage_retry_s={_retry_budget():g})"
    err = StorageError(f"{url}: {msg}")
    err.s3_code = s3_code(exc)
    return err


def exists(url: str) -> bool:
    if is_s3(url):
        from botocore.exceptions import ClientError

        bucket, key = parse_s3(url)

        def head() -> bool:
            try:
                s3_client().head_object(Bucket=bucket, Key=key)
                return True
            except ClientError as e:
                if e.response.get("Error", {}).get("Code", "") in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise

        return _retrying(url, head)   # endpoint unreachable (retried), bad credentials (at once)...
    return os.path.exists(url)


def list_files(url: str) -> List[str]:
    """All object names (relative to ``url``) under a prefix / directory, recursively, sorted."""
    if is_s3(url):
        return sorted(list_sizes(url))
    if not os.path.isdir(url):
        return []
    out = []
    for root, _dirs, files in os.walk(url):
        for f in files:
            out.append(os.path.relpath(os.path.join(root, f), url).replace(os.sep, "/"))
    return sorted(out)


def list_sizes(url: str) -> Dict[str, int]:
    """Every object (relative name → size in bytes) under a prefix / directory, recursively."""
    if is_s3(url):
        bucket, prefix = parse_s3(url)
        if prefix and not prefix.endswith("/"):
            prefix += "/"

        def listing() -> Dict[str, int]:
            out: Dict[str, int] = {}
            paginator = s3_client().get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    out[obj["Key"][len(prefix):]] = int(obj["Size"])
            return out

        return _retrying(url, listing)
    out: Dict[str, int] = {}
    for rel in list_files(url):
        try:
            out[rel] = os.path.getsize(os.path.join(url, rel))
        except FileNotFoundError:
            continue
    return out


def get_bytes(url: str) -> bytes:
    if is_s3(url):
        bucket, key = parse_s3(url)
        return _retrying(url, lambda: s3_client().get_object(Bucket=bucket, Key=key)["Body"].read())
    try:
        with open(url, "rb") as f:
            return f.read()
    except OSError as e:
        raise StorageError(f"{url}: {e.strerror or e}") from e


def open_read(url: str) -> IO[bytes]:
    """A readable binary stream (S3: a streaming body that resumes with a ranged GET after a transient
    fault, within the retry budget)."""
    if is_s3(url):
        return _ResumingS3Stream(url)
    try:
        return open(url, "rb")
    except OSError as e:
        raise StorageError(f"{url}: {e.strerror or e}") from e


def _ensure_bucket(bucket: str, url: str) -> None:
    from botocore.exceptions import ClientError

    def ensure() -> None:
        cli = s3_client()
        try:
            cli.head_bucket(Bucket=bucket)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code", "") not in ("404", "NoSuchBucket", "NotFound"):
                raise
            cli.create_bucket(Bucket=bucket)

    _retrying(url, ensure)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _atomic_local(path: str, durable: bool = True) -> Iterator[IO[bytes]]:
    """Write a local file under a temporary name in the same folder, then ``os.replace`` it into place:
    readers see the old file or the whole new one, never a partial write. ``durable``: fsync before the
    rename (without it a crash may lose the new file, never tear it)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; published files get the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def put_bytes(url: str, data: bytes, durable: bool = True) -> None:
    """Write ``data`` atomically to ``url`` (``durable``: see :func:`_atomic_local`; S3 puts always are)."""
    if is_s3(url):
        if len(data) >= MULTIPART_THRESHOLD:
            put_stream(io.BytesIO(data), url)
            return
        bucket, key = parse_s3(url)
        _retrying(url, lambda: s3_client().put_object(Bucket=bucket, Key=key, Body=data))
        return
    with _atomic_local(url, durable) as f:
        f.write(data)


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNK,
                          use_threads=True, max_concurrency=8)


def put_stream(stream: IO[bytes], url: str) -> None:
    bucket, key = parse_s3(url)
    start = stream.tell() if stream.seekable() else None

    def upload() -> None:
        if start is not None:
            stream.seek(start)
        s3_client().upload_fileobj(stream, bucket, key, Config=_transfer_config())

    if start is None:   # a stream that cannot rewind is sent once
        try:
            upload()
        except Exception as e:
            raise _s3_error(url, e) from e
        return
    _retrying(url, upload)


def put_file(local_path: str, url: str) -> None:
    """Copy a local file to ``url`` atomically (multipart upload for large files on S3)."""
    if is_s3(url):
        bucket, key = parse_s3(url)
        _retrying(url, lambda: s3_client().upload_file(local_path, bucket, key, Config=_transfer_config()))
        return
    with _atomic_local(url) as f, open(local_path, "rb") as src:
        shutil.copyfileobj(src, f, 1 << 20)


def get_file(url: str, local_path: str) -> None:
    """Download ``url`` to ``local_path``."""
    os.makedirs(os.path.dirname(os.path.abspath(local_path)), exist_ok=True)
    if is_s3(url):
        bucket, key = parse_s3(url)
        _retrying(url, lambda: s3_client().download_file(bucket, key, local_path, Config=_transfer_config()))
        return
    shutil.copyfile(url, local_path)


def delete(url: str) -> None:
    if is_s3(url):
        bucket, key = parse_s3(url)
        _retrying(url, lambda: s3_client().delete_object(Bucket=bucket, Key=key))
        return
    if os.path.isdir(url):
        shutil.rmtree(url)
    elif os.path.exists(url):
        os.unlink(url)


def delete_tree(url: str) -> None:
    """Delete a folder / every object under an S3 prefix (the prefix itself, as a folder)."""
    if not is_s3(url):
        delete(url)
        return
    bucket, prefix = parse_s3(url)
    prefix = prefix.rstrip("/") + "/"
    names = list(list_sizes(url))
    for i in range(0, len(names), 1000):
        batch = [{"Key": prefix + n} for n in names[i:i + 1000]]
        _retrying(url, lambda batch=batch: s3_client().delete_objects(Bucket=bucket, Delete={"Objects": batch,
                                                                                            "Quiet": True}))


def ensure_dir(url: str) -> None:
    """Create a local directory, or make sure an S3 bucket exists (created when missing)."""
    if is_s3(url):
        bucket, _ = parse_s3(url)
        _ensure_bucket(bucket, url)
    else:
        os.makedirs(url, exist_ok=True)


def check_writable(url: str) -> None:
    """Fail fast (StorageError naming the URL) when ``url`` cannot be written: unreachable
    endpoint, wrong credentials, unwritable folder. Writes and deletes a small probe object."""
    ensure_dir(url)
    probe = join(url, f".ssfer-probe-{os.getpid()}")
    try:
        put_bytes(probe, b"ok")
        delete(probe)
    except StorageError:
        raise
    except OSError as e:
        raise StorageError(f"{url}: not writable ({e.strerror or e})") from e


def register_webdataset_s3() -> None:
    """Register an ``s3://`` opener with ``webdataset.gopen_schemes`` (boto3 streaming GET).

    webdataset opens s3:// URLs through a ``pipe:`` to the AWS CLI; this opener makes ``WebDataset("s3://b/x.tar")``
    use boto3 instead, with the same credentials, endpoint and retries as the rest of the system. Idempotent.
    """
    import webdataset

    schemes = webdataset.gopen_schemes
    if "s3" in schemes and getattr(schemes["s3"], "_ssfer", False):
        return

    def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
        if mode[0] != "r":
            raise StorageError(f"{url}: s3 opener is read-only")
        return open_read(url)

    gopen_s3._ssfer = True  # type: ignore[attr-defined]
    schemes["s3"] = gopen_s3


class _ResumingS3Stream(io.RawIOBase):
    """A readable S3 object (webdataset calls close()). A transient fault mid-stream (connection reset,
    endpoint gone for a while) reopens the object from the byte reached with a ranged GET, retried for
    the storage retry budget; the reader sees one unbroken stream."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._bucket, self._key = parse_s3(url)
        self._pos = 0
        self._body = None
        _retrying(url, self._open)

    def _open(self) -> None:
        kw = {"Range": f"bytes={self._pos}-"} if self._pos else {}
        self._body = s3_client().get_object(Bucket=self._bucket, Key=self._key, **kw)["Body"]

    def _read(self, n: int) -> bytes:
        """One attempt: (re)open from the byte reached when the last attempt lost the stream, then read."""
        if self._body is None:
            self._open()
        try:
            return self._body.read(n)
        except Exception:
            body, self._body = self._body, None
            with contextlib.suppress(Exception):
                body.close()
            raise

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = _retrying(self.url, lambda: self._read(len(b)))
        n = len(data)
        b[:n] = data
        self._pos += n
        return n

    def close(self) -> None:
        try:
            if self._body is not None:
                self._body.close()
        finally:
            super().close()
