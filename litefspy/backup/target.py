"""Where backups go: a backup URL turned into an object store, with one-line errors.

`file:///path` (a directory; the embedded default that needs nothing else)
and `s3://bucket/prefix` for any S3-compatible store. On the command line an
S3 URL carries what fuse.yml would say as query parameters
(`?endpoint=http://host:port&region=R&force-path-style=true`); credentials
come from the usual AWS_* environment. The object store client is obstore
(object_store underneath): signing, retries and conditional puts are its
business, never hand-written here.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import obstore
from obstore.store import LocalStore, S3Store

from litefspy.config import TargetSpec
from litefspy.errors import BackupError

T = TypeVar("T")

# A store that does not answer must not stall the primary's uploader (or a
# restore) for minutes: obstore's default retries for up to 3 minutes.
_RETRY = {"max_retries": 2, "retry_timeout": timedelta(seconds=10)}
_CLIENT = {"connect_timeout": "3s", "timeout": "30s"}


def first_line(exc: BaseException) -> str:
    """obstore's errors carry a debug dump after their first line."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class Target:
    """The object store behind a backup URL: put-if-absent, get, list, delete.

    Every method blocks (call it from a worker thread) and raises BackupError
    with one line naming the store on any failure.
    """

    def __init__(self, spec: TargetSpec) -> None:
        self.spec = spec
        self._store: Any = None

    @property
    def store(self) -> Any:
        if self._store is None:
            self._store = self._open()
        return self._store

    def _open(self) -> Any:
        spec = self.spec
        try:
            if spec.scheme == "file":
                return LocalStore(prefix=spec.path, mkdir=True)
            config: dict[str, Any] = {}
            if spec.endpoint:
                config["endpoint"] = spec.endpoint
            if spec.region:
                config["region"] = spec.region
            if spec.force_path_style:
                config["virtual_hosted_style_request"] = False
            client: dict[str, Any] = dict(_CLIENT)
            if spec.endpoint.startswith("http://"):
                client["allow_http"] = True
            return S3Store(
                spec.bucket,
                prefix=spec.prefix or None,
                config=config,  # type: ignore[arg-type]
                client_options=client,  # type: ignore[arg-type]
                retry_config=_RETRY,  # type: ignore[arg-type]
            )
        except Exception as exc:
            raise BackupError(f"backup store {spec.display}: {first_line(exc)}") from None

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except BackupError:
            raise
        except Exception as exc:
            raise BackupError(
                f"backup store {self.spec.display}: {what} failed: {first_line(exc)}"
            ) from None

    def put_new(self, key: str, data: bytes | Path) -> bool:
        """Store `data` under `key` unless an object is there already (then False)."""
        body: Any = data if isinstance(data, bytes) else Path(data)

        def put() -> bool:
            try:
                obstore.put(self.store, key, body, mode="create")
            except obstore.exceptions.AlreadyExistsError:
                return False
            return True

        return self._call(f"upload of {key}", put)

    def get(self, key: str) -> bytes:
        return self._call(f"download of {key}", lambda: bytes(obstore.get(self.store, key).bytes()))

    def stream(self, key: str, prefetch: int = 16) -> Iterator[bytes]:
        """An object's bytes as they download (errors: BackupError, even mid-stream).

        A thread keeps downloading up to `prefetch` MiB ahead of the consumer,
        so the download (GIL released in obstore) overlaps decoding.
        """
        what = f"download of {key}"
        chunks = self._call(
            what, lambda: iter(obstore.get(self.store, key).stream(min_chunk_size=1 << 20))
        )
        ahead: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=prefetch)
        stop = threading.Event()

        def fetch() -> None:
            try:
                for chunk in chunks:
                    if stop.is_set():
                        return
                    ahead.put(bytes(chunk))
                ahead.put(None)
            except Exception as exc:
                ahead.put(exc)

        worker = threading.Thread(target=fetch, daemon=True, name=f"download {key}")
        worker.start()
        try:
            while (item := ahead.get()) is not None:
                if isinstance(item, BaseException):
                    raise BackupError(
                        f"backup store {self.spec.display}: {what} failed: {first_line(item)}"
                    )
                yield item
        finally:
            stop.set()
            while worker.is_alive():  # unblock a put() so the thread can end
                try:
                    ahead.get_nowait()
                except queue.Empty:
                    worker.join(0.01)

    def get_to(self, key: str, out: Path, progress: Callable[[int], None] | None = None) -> int:
        """Stream an object into a file; returns its size."""

        def fetch() -> int:
            total = 0
            with open(out, "wb") as f:
                for chunk in obstore.get(self.store, key).stream(min_chunk_size=1 << 20):
                    f.write(chunk)
                    total += len(chunk)
                    if progress is not None:
                        progress(len(chunk))
            return total

        return self._call(f"download of {key}", fetch)

    def objects(self, prefix: str = "") -> list[tuple[str, int]]:
        """(key, size) of every object under `prefix`, keys relative to the target."""

        def walk() -> list[tuple[str, int]]:
            out: list[tuple[str, int]] = []
            for batch in obstore.list(self.store, prefix or None, chunk_size=1000):
                out.extend((meta["path"], int(meta["size"])) for meta in batch)
            return out

        return self._call("listing", walk)

    def delete(self, keys: list[str]) -> None:
        for chunk in _chunks(keys, 500):
            self._call("delete", partial(obstore.delete, self.store, chunk))


def _chunks(items: list[str], n: int) -> Iterator[list[str]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]
