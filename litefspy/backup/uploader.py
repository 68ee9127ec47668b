"""Continuous backup from the lease holder: upload, compact, snapshot, expire.

Runs only while this node is the primary (BackupRunner starts it on
promotion and cancels it on demotion). Every sync interval, for each
database, the LTX files committed since the last upload are merged into one
object (level 0) and uploaded with put-if-absent; the commit path never waits
for any of it. Local retention keeps every file not uploaded yet
(Store.keep_from). Every 5 minutes level-0 objects are merged into level 1,
every hour level 1 into level 2; a full snapshot goes up every
snapshot interval (and whenever the local history cannot continue the
backup's); objects no restore point inside the retention window needs are
deleted.

A new primary first finds where its own history meets the backup's (object
names carry each object's last TXID and post-apply checksum) and writes its
epoch marker there: whatever an older primary uploaded past that point is a
branch from then on (layout.is_branch), listed and never restored.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from litefspy.backup.layout import (
    COMPACTION,
    SNAPSHOTS,
    Listing,
    Piece,
    epoch_key,
    parse_listing,
    piece_key,
    plan_compaction,
    plan_retention,
    split_branches,
)
from litefspy.backup.target import Target
from litefspy.backup.worker import merge_to_file
from litefspy.errors import BackupError, LitefspyError, LTXError
from litefspy.logs import kv
from litefspy.ltx.decoder import verify_file
from litefspy.ltx.encoder import Encoder
from litefspy.ltx.format import CHECKSUM_FLAG, FLAG_COMPRESS, Header, Trailer
from litefspy.ltx.peek import read_header, read_trailer
from litefspy.store.database import Database
from litefspy.store.store import Store
from litefspy.store.types import CommitInfo, Position

log = logging.getLogger(__name__)

Clock = Callable[[], float]
# Merges LTX files into one verified file (backup/worker.py; blocking).
Merge = Callable[[list[Path], Path, Path], tuple[Header, Trailer]]


@dataclass
class DatabaseBackup:
    """What the uploader knows about one database's backup."""

    uploaded: Position | None = None  # newest position in the store (None: not loaded)
    uploaded_ms: int = 0  # when that upload finished (wall clock)
    marked_epoch: int = 0  # epoch whose marker this node wrote
    last_snapshot_ms: int = 0
    last_snapshot_txid: int = 0
    pending_since_ms: int = 0  # when the oldest not-uploaded commit was first seen
    last_error: str = ""
    last_error_ms: int = 0


@dataclass(frozen=True)
class BackupProgress:
    """An object reached the store, or an upload failed (the `backup` event)."""

    db: str
    txid: int  # the object's newest TXID; on an error, the newest one in the store
    checksum: int = 0
    level: str = ""  # l0, l1, l2, snapshots ("" on an error)
    key: str = ""
    bytes: int = 0
    committed_ms: int = 0  # commit time of `txid`
    uploaded_ms: int = 0  # when the object was durable in the store
    deleted: bool = False
    error: str = ""
    lag_txids: int = 0


# How many bytes of changed pages the uploader holds per database between
# uploads (the pages commits captured, newest version of each). Past it, that
# interval's upload reads the LTX files back instead.
HELD_BYTES_MAX = 16 << 20


@dataclass
class _Held:
    """The commits of one database since the last upload, as captured (newest page wins).

    Built from the commit feed, so that the upload of a sync interval is one
    encode of the pages that changed, not a decode and re-encode of every
    file it covers (the upload then costs about as much CPU whatever the
    commit rate: the node's commit path keeps the cores).
    """

    first: Header  # the first commit's header (min TXID, pre-apply checksum)
    last: Header
    post_apply_checksum: int
    pages: dict[int, bytes]
    nbytes: int

    def covers(self, after: Position, upto: Position) -> bool:
        """Is this exactly the commits after `after` up to `upto`?"""
        return (
            self.first.min_txid == after.txid + 1
            and self.first.pre_apply_checksum == after.checksum
            and after.txid > 0
            and self.last.max_txid == upto.txid
            and self.post_apply_checksum == upto.checksum
        )


def _encode_held(held: _Held, out: Path) -> tuple[Header, Trailer]:
    """Write the merge of the held commits to `out` and verify it (worker thread)."""
    header = Header(
        flags=FLAG_COMPRESS,
        page_size=held.last.page_size,
        commit=held.last.commit,
        min_txid=held.first.min_txid,
        max_txid=held.last.max_txid,
        timestamp=held.last.timestamp,
        pre_apply_checksum=held.first.pre_apply_checksum,
        wal_offset=0,
        wal_size=0,
        wal_salt1=0,
        wal_salt2=0,
        node_id=held.last.node_id,
    )
    try:
        with open(out, "wb") as f:
            enc = Encoder(f, header)
            for pgno in sorted(p for p in held.pages if p <= header.commit):
                enc.write_page(pgno, held.pages[pgno])
            trailer = enc.finish(held.post_apply_checksum)
        verify_file(out)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return header, trailer


@dataclass
class BackupTotals:
    bytes_uploaded: int = 0
    objects_uploaded: int = 0
    errors: int = 0
    last_compaction_ms: int = 0
    per_db: dict[str, DatabaseBackup] = field(default_factory=dict)


def _commit_time(store: Store, name: str, snapshot: Header) -> int:
    """When the snapshot's last transaction committed (its LTX file's timestamp)."""
    db = store.get_if_online(name)
    if db is not None:
        try:
            return read_header(db.ltx_path(snapshot.max_txid, snapshot.max_txid)).timestamp
        except (OSError, LTXError):
            pass  # retention took it, or it was a snapshot itself
    return snapshot.timestamp


def _pending_files(db: Database, after: int, upto: int) -> list[tuple[int, int, Path]]:
    """(min, max, path) of the LTX files of TXIDs after..upto, oldest first (worker thread).

    A primary writes one file per transaction, so they are named, not listed:
    the directory holds `data.retention` worth of files (hundreds of thousands
    at a high commit rate), and listing and parsing all their names every sync
    interval took more CPU than the upload itself. Listed only when a name is
    missing (a snapshot or a merged range took their place).
    """
    out = []
    for txid in range(after + 1, upto + 1):
        path = db.ltx_path(txid, txid)
        if not os.path.exists(path):
            return [f for f in db.ltx_files() if after < f[1] <= upto]
        out.append((txid, txid, path))
    return out


def _write_deletion(
    out: Path, after: Position, deleted: Position, when_ms: int
) -> tuple[Header, Trailer]:
    """An LTX file of TXIDs after.txid+1..deleted.txid that deletes the database."""
    header = Header(
        flags=0,
        page_size=4096,  # no page follows; any valid size
        commit=0,
        min_txid=after.txid + 1,
        max_txid=deleted.txid,
        timestamp=when_ms,
        pre_apply_checksum=after.checksum,
        wal_offset=0,
        wal_size=0,
        wal_salt1=0,
        wal_salt2=0,
        node_id=0,
    )
    with open(out, "wb") as f:
        trailer = Encoder(f, header).finish(CHECKSUM_FLAG)
    return header, trailer


_NOTHING = object()  # no commit held yet for a database


class Uploader:
    """The primary's backup work for every database of `store` (see module doc)."""

    def __init__(
        self,
        store: Store,
        target: Target,
        *,
        epoch: Callable[[], int],
        sync_interval: float = 1.0,
        snapshot_interval: float = 86400.0,
        retention: float = 259200.0,
        clock: Clock = time.time,
        totals: BackupTotals | None = None,
        merge: Merge = merge_to_file,
        notify: Callable[[BackupProgress], None] | None = None,
    ) -> None:
        self.store = store
        self.target = target
        self.epoch = epoch
        self.sync_interval = sync_interval
        self.snapshot_interval = snapshot_interval
        self.retention = retention
        self.clock = clock
        self.totals = totals if totals is not None else BackupTotals()
        self.merge = merge
        self.notify = notify
        self._next_compaction = {level: 0.0 for level in COMPACTION}
        self._next_retention = 0.0
        # Per database, the commits since its last upload (None: not usable
        # until the next upload: a gap, a commit not captured here, too big).
        self._held: dict[str, _Held | None] = {}

    def _on_commit(self, info: CommitInfo) -> None:
        """Feed subscriber (inside the commit's handler): hold the captured pages."""
        held = self._held.get(info.name, _NOTHING)
        if held is None:
            return
        captured = info.captured
        if captured is None:
            self._held[info.name] = None
            return
        header = captured.header
        if held is _NOTHING:
            size = sum(len(d) for _, d in captured.pages)
            pages = dict(captured.pages)
            self._held[info.name] = _Held(header, header, captured.post_apply_checksum, pages, size)
            return
        assert isinstance(held, _Held)
        if (
            header.min_txid != held.last.max_txid + 1
            or header.pre_apply_checksum != held.post_apply_checksum
            or header.page_size != held.last.page_size
        ):
            self._held[info.name] = None
            return
        pages = held.pages
        for pgno, data in captured.pages:
            old = pages.get(pgno)
            held.nbytes += len(data) - (len(old) if old is not None else 0)
            pages[pgno] = data
        if header.commit < held.last.commit:
            for pgno in [p for p in pages if p > header.commit]:
                held.nbytes -= len(pages.pop(pgno))
        held.last = header
        held.post_apply_checksum = captured.post_apply_checksum
        if held.nbytes > HELD_BYTES_MAX:
            self._held[info.name] = None

    def _state(self, name: str) -> DatabaseBackup:
        return self.totals.per_db.setdefault(name, DatabaseBackup())

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    # ------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Upload every sync interval until cancelled (demotion, shutdown)."""
        for state in self.totals.per_db.values():
            state.uploaded = None  # reload: another primary may have uploaded meanwhile
            state.marked_epoch = 0
        # A fixed cadence (start to start): a commit waits at most one interval
        # plus one upload, however long the previous pass took.
        tick = trio.current_time()
        self._held.clear()
        unsubscribe = self.store.feed.subscribe(self._on_commit)
        try:
            while True:
                await self.sync_all()
                await self.maintain()
                tick = max(tick + self.sync_interval, trio.current_time())
                await trio.sleep_until(tick)
        finally:
            unsubscribe()
            self._held.clear()

    async def sync_all(self) -> None:
        """One upload pass over every database; errors are recorded, never raised."""
        for db in self.store.databases():
            state = self._state(db.name)
            try:
                await self.sync_database(db.name)
                state.last_error = ""
            except (BackupError, LTXError, OSError, LitefspyError) as exc:
                self._failed(db.name, state, exc)

    def _failed(self, name: str, state: DatabaseBackup, exc: BaseException) -> None:
        self.totals.errors += 1
        message = str(exc)
        if message != state.last_error:
            log.warning("backup failed; will retry %s: %s", kv(db=name), message)
            uploaded = state.uploaded.txid if state.uploaded else 0
            self._notify(
                BackupProgress(db=name, txid=uploaded, error=message, lag_txids=self._lag(name))
            )
        state.last_error = message
        state.last_error_ms = self._now_ms()

    def _notify(self, progress: BackupProgress) -> None:
        if self.notify is not None:
            self.notify(progress)

    def _lag(self, name: str) -> int:
        db = self.store.get_if_online(name)
        state = self._state(name)
        if db is None:
            return 0
        return max(db.pos.txid - (state.uploaded.txid if state.uploaded else 0), 0)

    async def sync_database(self, name: str) -> None:
        db = self.store.get_if_online(name)
        if db is None or db.pos.txid == 0:
            return
        state = self._state(name)
        if state.uploaded is None or state.marked_epoch != self.epoch():
            await self._adopt(name, state)
        assert state.uploaded is not None
        # Taken together (no await between): commits from here on are held for
        # the next upload.
        held = self._held.pop(name, None)
        pos = db.pos
        if pos == state.uploaded:
            state.pending_since_ms = 0
            self.store.keep_from[name] = pos.txid
            return
        if not state.pending_since_ms:
            state.pending_since_ms = self._now_ms()
        due = self._now_ms() - state.last_snapshot_ms >= self.snapshot_interval * 1000
        if held is not None and not due and not db.is_deleted and held.covers(state.uploaded, pos):
            await self._upload_held(name, state, held)
            state.pending_since_ms = 0 if state.uploaded == db.pos else self._now_ms()
            return
        files = await trio.to_thread.run_sync(_pending_files, db, state.uploaded.txid, pos.txid)
        if db.is_deleted:
            await self._upload_deletion(name, state, files, pos)
        elif due or not self._continues(files, state.uploaded):
            await self._upload_snapshot(name, state)
        else:
            await self._upload_range(name, state, [p for _, _, p in files])
        state.pending_since_ms = 0 if state.uploaded == db.pos else self._now_ms()

    async def _upload_deletion(
        self, name: str, state: DatabaseBackup, files: list[tuple[int, int, Path]], pos: Position
    ) -> None:
        """The database was deleted (its newest LTX file has commit 0): record it.

        What committed before the deletion goes up first, as usual, then the
        deletion as an object of its own, so that every restore point up to the
        deletion stays restorable and the listing shows when it happened.
        """
        assert state.uploaded is not None
        if state.uploaded.txid == 0:
            # Created and deleted before anything reached the backup: nothing to keep.
            self._uploaded(name, state, pos)
            return
        if self._continues(files, state.uploaded):
            if len(files) > 1:
                await self._upload_range(name, state, [p for _, _, p in files[:-1]])
            await self._upload_range(name, state, [files[-1][2]])
            return
        # The local history does not reach back to the backup's end (a new primary
        # whose history forked earlier): a deletion drops everything before it, so
        # one commit-0 object from the backup's end to it says the same.
        when = self._now_ms()
        if files and files[-1][1] == pos.txid:
            when = (await trio.to_thread.run_sync(read_header, files[-1][2])).timestamp or when
        tmp = self.store.tmp_dir / f"backup-{name}-{secrets.token_hex(4)}.ltx"
        header, trailer = await trio.to_thread.run_sync(
            _write_deletion, tmp, state.uploaded, pos, when
        )
        key = self._key(name, "l0", header, trailer)
        try:
            size = await self._put(key, tmp)
        finally:
            tmp.unlink(missing_ok=True)
        self._uploaded(name, state, pos, level="l0", key=key, size=size, committed_ms=when)

    @staticmethod
    def _continues(files: list[tuple[int, int, Path]], uploaded: Position) -> bool:
        if not files or files[0][0] != uploaded.txid + 1:
            return False
        for (_, hi, _), (lo, _, _) in itertools.pairwise(files):
            if lo != hi + 1:
                return False
        header = read_header(files[0][2])
        return not header.is_snapshot and header.pre_apply_checksum == uploaded.checksum

    # ------------------------------------------------------ adopting a backup

    async def _adopt(self, name: str, state: DatabaseBackup) -> None:
        """Load where the backup of `name` stands; mark this primary's epoch there."""
        listing = await self._listing(name)
        main, _ = split_branches(listing)
        epoch = self.epoch()
        ends = {p.max_txid: p.checksum for p in main}
        fork = self._fork_point(name, ends)
        if not any(m.epoch == epoch for m in listing.marks):
            await trio.to_thread.run_sync(
                self.target.put_new, epoch_key(name, epoch, fork.txid, fork.checksum), b""
            )
            listing = await self._listing(name)
            main, _ = split_branches(listing)
        on_history = [p for p in main if p.max_txid <= fork.txid]
        newest = max(on_history, key=lambda p: (p.max_txid, p.epoch), default=None)
        state.uploaded = Position(newest.max_txid, newest.checksum) if newest else Position(0, 0)
        snaps = [p for p in on_history if p.is_snapshot]
        last_snap = max(snaps, key=lambda p: p.timestamp_ms, default=None)
        state.last_snapshot_ms = last_snap.timestamp_ms if last_snap else 0
        state.last_snapshot_txid = last_snap.max_txid if last_snap else 0
        state.marked_epoch = epoch
        log.info(
            "backup of database continues %s",
            kv(db=name, uploaded=f"{state.uploaded.txid:016x}", epoch=epoch),
        )

    def _fork_point(self, name: str, ends: dict[int, int]) -> Position:
        """The newest position both this node's history and the backup have."""
        db = self.store.get_if_online(name)
        assert db is not None
        if not ends:
            return Position(0, 0)  # an empty backup: this history is all there is
        if ends.get(db.pos.txid) == db.pos.checksum:
            return db.pos
        for _, hi, path in reversed(db.ltx_files()):
            if hi in ends:
                try:
                    if read_trailer(path).post_apply_checksum == ends[hi]:
                        return Position(hi, ends[hi])
                except (OSError, LTXError):
                    continue
        # Nothing in common that can be shown: fork here; a snapshot follows.
        return db.pos

    async def _listing(self, name: str) -> Listing:
        objects = await trio.to_thread.run_sync(self.target.objects, f"{name}/")
        return parse_listing(name, objects)

    # ---------------------------------------------------------- uploading

    async def _upload_range(self, name: str, state: DatabaseBackup, files: list[Path]) -> None:
        """The LTX files of a sync interval, merged (in the merge worker) into one l0 object."""
        await self._upload_l0(name, state, lambda out: self.merge(files, out, self.store.tmp_dir))

    async def _upload_held(self, name: str, state: DatabaseBackup, held: _Held) -> None:
        """A sync interval's commits as captured, encoded as one l0 object."""
        await self._upload_l0(name, state, lambda out: _encode_held(held, out))

    async def _upload_l0(
        self, name: str, state: DatabaseBackup, write: Callable[[Path], tuple[Header, Trailer]]
    ) -> None:
        tmp = self.store.tmp_dir / f"backup-{name}-{secrets.token_hex(4)}.ltx"
        header, trailer = await trio.to_thread.run_sync(write, tmp)
        try:
            key = self._key(name, "l0", header, trailer)
            size = await self._put(key, tmp)
        finally:
            tmp.unlink(missing_ok=True)
        pos = Position(header.max_txid, trailer.post_apply_checksum)
        self._uploaded(
            name, state, pos, level="l0", key=key, size=size, committed_ms=header.timestamp
        )

    async def _upload_snapshot(self, name: str, state: DatabaseBackup) -> None:
        path = await self.store.snapshot(name)
        try:
            header = await trio.to_thread.run_sync(read_header, path)
            trailer = await trio.to_thread.run_sync(read_trailer, path)
            # Named by when its last transaction committed, not by when it was
            # taken (later): a restore by time right after that commit finds it.
            committed = await trio.to_thread.run_sync(_commit_time, self.store, name, header)
            key = piece_key(
                name,
                SNAPSHOTS,
                lo=1,
                hi=header.max_txid,
                epoch=self.epoch(),
                ts=committed or self._now_ms(),
                post=trailer.post_apply_checksum,
            )
            size = await self._put(key, path)
        finally:
            path.unlink(missing_ok=True)
        state.last_snapshot_ms = self._now_ms()
        state.last_snapshot_txid = header.max_txid
        pos = Position(header.max_txid, trailer.post_apply_checksum)
        self._uploaded(
            name, state, pos, level=SNAPSHOTS, key=key, size=size, committed_ms=committed
        )
        log.info("backup snapshot uploaded %s", kv(db=name, txid=f"{header.max_txid:016x}"))

    def _key(self, name: str, level: str, header: Header, trailer: Trailer) -> str:
        """The object name of an LTX file uploaded by this primary at `level`."""
        return piece_key(
            name,
            level,
            lo=header.min_txid,
            hi=header.max_txid,
            epoch=self.epoch(),
            ts=header.timestamp,
            post=trailer.post_apply_checksum,
        )

    async def _put(self, key: str, path: Path) -> int:
        """Upload `path` as `key` (if absent); its size."""

        def put() -> tuple[bool, int]:
            return self.target.put_new(key, path), path.stat().st_size

        created, size = await trio.to_thread.run_sync(put)
        if created:
            self.totals.bytes_uploaded += size
            self.totals.objects_uploaded += 1
        return size

    def _uploaded(
        self,
        name: str,
        state: DatabaseBackup,
        pos: Position,
        *,
        level: str = "",
        key: str = "",
        size: int = 0,
        committed_ms: int = 0,
    ) -> None:
        state.uploaded = pos
        state.uploaded_ms = self._now_ms()
        # Local retention may now let go of the files up to here.
        self.store.keep_from[name] = pos.txid
        if key:
            self._notify(
                self._progress(name, pos, level, key=key, size=size, committed_ms=committed_ms)
            )

    def _progress(
        self, name: str, pos: Position, level: str, *, key: str, size: int, committed_ms: int
    ) -> BackupProgress:
        return BackupProgress(
            db=name,
            txid=pos.txid,
            checksum=pos.checksum,
            level=level,
            key=key,
            bytes=size,
            committed_ms=committed_ms,
            uploaded_ms=self._now_ms(),
            deleted=pos.checksum == CHECKSUM_FLAG and level != SNAPSHOTS,
            lag_txids=self._lag(name),
        )

    # ---------------------------------------------- compaction and retention

    async def maintain(self) -> None:
        """Compact and expire when due (errors recorded per database, never raised)."""
        now = self.clock()
        due_levels = [lv for lv, at in self._next_compaction.items() if now >= at]
        expire = now >= self._next_retention
        if not due_levels and not expire:
            return
        for level in due_levels:
            self._next_compaction[level] = now + COMPACTION[level][1]
        if expire:
            self._next_retention = now + COMPACTION["l1"][1]
        for db in self.store.databases():
            state = self._state(db.name)
            try:
                for level in due_levels:
                    await self.compact(db.name, level)
                if expire:
                    await self.expire(db.name)
            except (BackupError, LTXError, OSError) as exc:
                self._failed(db.name, state, exc)
        self.totals.last_compaction_ms = self._now_ms()

    async def compact(self, name: str, level: str) -> Piece | None:
        """Merge the pending run of lower-level pieces of `name` into one `level` piece."""
        main, _ = split_branches(await self._listing(name))
        run = plan_compaction(main, level)
        if not run:
            return None
        work = self.store.tmp_dir / f"compact-{name}-{secrets.token_hex(4)}"
        work.mkdir(parents=True)
        try:
            paths = []
            for i, piece in enumerate(run):
                local = work / f"{i:06d}.ltx"
                await trio.to_thread.run_sync(self.target.get_to, piece.key, local)
                paths.append(local)
            out = work / "merged.ltx"
            header, trailer = await trio.to_thread.run_sync(self.merge, paths, out, work)
            key = self._key(name, level, header, trailer)
            size = await self._put(key, out)
        finally:
            for p in work.iterdir():
                p.unlink()
            work.rmdir()
        span = f"{run[0].min_txid:x}-{run[-1].max_txid:x}"
        log.info("backup compacted %s", kv(db=name, level=level, pieces=len(run), txids=span))
        pos = Position(header.max_txid, trailer.post_apply_checksum)
        self._notify(
            self._progress(name, pos, level, key=key, size=size, committed_ms=header.timestamp)
        )
        return Piece(
            header.min_txid,
            header.max_txid,
            level,
            self.epoch(),
            header.timestamp,
            trailer.post_apply_checksum,
            key,
        )

    async def expire(self, name: str) -> int:
        """Delete what no restore point inside the retention window needs."""
        listing = await self._listing(name)
        doomed = plan_retention(listing, self._now_ms(), int(self.retention * 1000))
        if doomed:
            await trio.to_thread.run_sync(self.target.delete, [p.key for p in doomed])
            log.info("backup retention removed objects %s", kv(db=name, count=len(doomed)))
        return len(doomed)

    # --------------------------------------------------------------- status

    def status(self) -> dict[str, dict[str, int | str]]:
        """Per database: uploaded TXID, lag (ms and TXIDs), last error and its age."""
        now = self._now_ms()
        out: dict[str, dict[str, int | str]] = {}
        for db in self.store.databases():
            state = self._state(db.name)
            uploaded = state.uploaded.txid if state.uploaded else 0
            behind = max(db.pos.txid - uploaded, 0) if state.uploaded else db.pos.txid
            out[db.name] = {
                "uploaded_txid": f"{uploaded:016x}",
                "lag_txids": behind,
                "lag_ms": now - state.pending_since_ms if behind and state.pending_since_ms else 0,
                "last_error": state.last_error,
                "last_error_age_ms": now - state.last_error_ms if state.last_error else 0,
            }
        return out
