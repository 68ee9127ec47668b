"""Domain exceptions. Errno appears only at the FUSE boundary (litefspy.fuse)."""

from __future__ import annotations


class LitefspyError(Exception):
    """Base class: the message is a one-line, user-facing explanation."""


class ConfigError(LitefspyError):
    """The configuration file is invalid (names the file and the key)."""


class LTXError(LitefspyError):
    """An LTX file is malformed, corrupt, truncated or does not apply."""


class LTXChecksumError(LTXError):
    """A checksum inside or across LTX files does not match."""


class SQLiteFormatError(LitefspyError):
    """A file is not a valid SQLite database, journal or WAL."""


class DatabaseError(LitefspyError):
    """A database managed by the store cannot perform the operation."""


class ReadOnlyError(DatabaseError):
    """A write was attempted on a replica (or a database that refuses writes)."""


class NotReplicatedError(ReadOnlyError):
    """A replica that never caught up was asked for a database it has not received."""


class ForwardError(DatabaseError):
    """The primary did not accept a transaction forwarded from this replica."""


class NotFoundError(DatabaseError):
    """No such database or file."""


class RecoveryError(DatabaseError):
    """Startup recovery found state it will not silently repair."""


class LeaseError(LitefspyError):
    """The lease backend failed or refused."""


class ReplicationError(LitefspyError):
    """The replication stream failed or carried invalid data."""


class BackupError(LitefspyError):
    """The backup store failed, refused, or holds something unusable."""
