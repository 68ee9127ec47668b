"""LTX v1 codec (LiteFS-compatible): pure code, no FUSE, trio or gRPC.

Modules: format (header, trailer, names), checksum (CRC-64 page and database
checksums), encoder, decoder, apply (apply to / snapshot from a database file).
"""

from litefspy.ltx.apply import apply_files, apply_ltx, encode_database
from litefspy.ltx.checksum import PageChecksums, checksum_database_file, crc64, page_checksum
from litefspy.ltx.decoder import Decoder, verify_file
from litefspy.ltx.encoder import Encoder, write_ltx_file
from litefspy.ltx.format import (
    CHECKSUM_FLAG,
    FLAG_COMPRESS,
    HEADER_SIZE,
    MAGIC,
    TRAILER_SIZE,
    Header,
    Trailer,
    format_filename,
    format_pos,
    lock_pgno,
    parse_filename,
    parse_pos,
)
from litefspy.sqlite.header import PENDING_BYTE

__all__ = [
    "CHECKSUM_FLAG",
    "FLAG_COMPRESS",
    "HEADER_SIZE",
    "MAGIC",
    "PENDING_BYTE",
    "TRAILER_SIZE",
    "Decoder",
    "Encoder",
    "Header",
    "PageChecksums",
    "Trailer",
    "apply_files",
    "apply_ltx",
    "checksum_database_file",
    "crc64",
    "encode_database",
    "format_filename",
    "format_pos",
    "lock_pgno",
    "page_checksum",
    "parse_filename",
    "parse_pos",
    "verify_file",
    "write_ltx_file",
]
