"""`litefspy ltx verify|dump|apply|encode-db`: offline tools for LTX files."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path
from typing import Any

from litefspy.errors import LitefspyError, LTXError
from litefspy.ltx.apply import apply_files, encode_database
from litefspy.ltx.checksum import page_checksum
from litefspy.ltx.decoder import Decoder, verify_file
from litefspy.ltx.format import Header, format_pos


def add_parsers(sub: Any) -> None:
    """Register `ltx` and its subcommands on the top-level subparsers."""
    ltx = sub.add_parser("ltx", help="inspect, verify and apply LTX files")
    ltx_sub = ltx.add_subparsers(dest="ltx_command", metavar="SUBCOMMAND")
    ltx_sub.required = True

    verify = ltx_sub.add_parser("verify", help="fully check LTX files (checksums, layout)")
    verify.add_argument("files", nargs="+", metavar="FILE")
    verify.set_defaults(handler=_cmd_verify)

    dump = ltx_sub.add_parser("dump", help="print an LTX file's header, pages and trailer")
    dump.add_argument("file", metavar="FILE")
    dump.set_defaults(handler=_cmd_dump)

    apply = ltx_sub.add_parser("apply", help="apply LTX files, in order, to a database file")
    apply.add_argument("--db", required=True, metavar="DB", help="database file to update")
    apply.add_argument("files", nargs="+", metavar="FILE")
    apply.set_defaults(handler=_cmd_apply)

    encode = ltx_sub.add_parser("encode-db", help="write a database file as an LTX snapshot")
    encode.add_argument("db", metavar="DB")
    encode.add_argument("out", metavar="OUT")
    encode.add_argument(
        "--compress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="LZ4-compress the page block (default: on)",
    )
    encode.add_argument("--txid", type=_txid, default=1, help="max TXID of the snapshot")
    encode.set_defaults(handler=_cmd_encode_db)


def _txid(text: str) -> int:
    value = int(text, 0)
    if value < 1:
        raise argparse.ArgumentTypeError("TXID must be >= 1")
    return value


def _range(header: Header) -> str:
    return f"{header.min_txid:016x}-{header.max_txid:016x}"


def _cmd_verify(args: argparse.Namespace) -> int:
    failed = 0
    for name in args.files:
        try:
            header, trailer = verify_file(name)
        except LTXError as exc:
            # verify_file's messages already name the file.
            sys.stderr.write(f"litefspy: {exc}\n")
            failed += 1
            continue
        except OSError as exc:
            sys.stderr.write(f"litefspy: {name}: {exc.strerror or exc}\n")
            failed += 1
            continue
        pos = format_pos(header.max_txid, trailer.post_apply_checksum)
        print(f"ok {name} {_range(header)} {pos}")
    return 1 if failed else 0


def _timestamp(ms: int) -> str:
    try:
        when = dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)
    except (OverflowError, OSError, ValueError):
        return "out of range"
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _cmd_dump(args: argparse.Namespace) -> int:
    name = args.file
    try:
        with open(name, "rb") as f:
            dec = Decoder(f)
            h = dec.header
            kind = "snapshot" if h.is_snapshot else "incremental"
            flags = "LZ4-compressed" if h.compressed else "uncompressed"
            print(f"file: {name}")
            print("header:")
            print(f"  flags:              0x{h.flags:08x} ({flags})")
            print(f"  page size:          {h.page_size}")
            print(f"  commit:             {h.commit} pages")
            print(f"  min txid:           {h.min_txid:016x} ({kind})")
            print(f"  max txid:           {h.max_txid:016x}")
            print(f"  timestamp:          {h.timestamp} ({_timestamp(h.timestamp)})")
            print(f"  pre-apply checksum: {h.pre_apply_checksum:016x}")
            print(f"  wal offset:         {h.wal_offset}")
            print(f"  wal size:           {h.wal_size}")
            print(f"  wal salt:           {h.wal_salt1:08x} {h.wal_salt2:08x}")
            print(f"  node id:            {h.node_id:016x}")
            print("pages:")
            print(f"  {'pgno':>10}  checksum")
            count = 0
            for pgno, data in dec.pages():
                print(f"  {pgno:>10}  {page_checksum(pgno, data):016x}")
                count += 1
            t = dec.trailer
            print(f"  ({count} pages)")
            print("trailer:")
            print(f"  post-apply checksum: {t.post_apply_checksum:016x}")
            print(f"  file checksum:       {t.file_checksum:016x} (verified)")
    except LTXError as exc:
        sys.stdout.flush()
        raise type(exc)(f"{name}: {exc}") from exc
    return 0


def _cmd_apply(args: argparse.Namespace) -> int:
    txid, checksum = apply_files(args.db, args.files)
    if Path(args.db).exists():
        print(f"{args.db}: {format_pos(txid, checksum)}")
    else:
        print(f"{args.db}: deleted at txid {txid:016x}")
    return 0


def _cmd_encode_db(args: argparse.Namespace) -> int:
    wal = Path(f"{args.db}-wal")
    # Committed pages may still live only in the WAL; encoding the main file
    # alone would silently lose them.
    if wal.exists() and wal.stat().st_size > 0:
        raise LitefspyError(
            f"{args.db}: has a non-empty WAL ({wal}); checkpoint it first "
            "(PRAGMA wal_checkpoint(TRUNCATE)) or close every connection"
        )
    header, trailer = encode_database(args.db, args.out, txid=args.txid, compress=args.compress)
    size = os.stat(args.out).st_size
    pos = format_pos(header.max_txid, trailer.post_apply_checksum)
    print(f"wrote {args.out} {_range(header)} {pos} ({header.commit} pages, {size} bytes)")
    return 0
