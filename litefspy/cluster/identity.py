"""This node's cluster identity with the lease engine: one owner for the cluster id checks.

The values live in the data dir (`litefspy.replication.identity`, which the
replication client shares for fencing); this class decides when they are
checked against the lease engine, stored with it, and remembered.
"""

from __future__ import annotations

import logging
from pathlib import Path

import trio

from litefspy.config import Config
from litefspy.errors import LeaseError, LitefspyError
from litefspy.lease.base import Lease, Leaser, PrimaryInfo
from litefspy.logs import kv
from litefspy.replication.client import ReplicationClient
from litefspy.replication.identity import (
    load_last_primary,
    new_cluster_id,
    save_cluster_id,
    save_last_primary,
)

log = logging.getLogger(__name__)


class ClusterMismatchError(LitefspyError):
    """This node's data belongs to another cluster than the lease's."""


class ClusterIdentity:
    """The cluster id checked against (and stored with) the lease; the last primary known."""

    def __init__(self, config: Config, client: ReplicationClient) -> None:
        self._config = config
        # The replication client holds the cluster id (it also learns it from a primary).
        self._client = client
        self.data_dir = Path(config.data.dir)
        self.known_primary = load_last_primary(self.data_dir)
        self._checked = False
        # The lease engine is known to store this node's cluster id.
        self._stored = False

    async def check(self, leaser: Leaser) -> None:
        """Once (again after a failed store): refuse a lease of another cluster."""
        if not self._checked:
            await self._check(leaser)

    async def store(self, leaser: Leaser, lease: Lease) -> None:
        """As a new primary: name the cluster, or check that it belongs to it."""
        if not self._stored:
            await self._store(leaser, lease)

    async def remember_primary(self, primary: PrimaryInfo) -> None:
        """Persist the last primary known, when it changed (for reads while etcd is away)."""
        if primary != self.known_primary:
            self.known_primary = primary
            await trio.to_thread.run_sync(save_last_primary, self.data_dir, primary)

    async def _check(self, leaser: Leaser) -> None:
        """Refuse to join a cluster other than the one this node's data belongs to."""
        stored = await leaser.cluster_id()
        local = self._client.cluster_id
        if stored is not None:
            if not local:
                await trio.to_thread.run_sync(save_cluster_id, self.data_dir, stored)
                self._client.cluster_id = stored
                log.info("joined cluster %s", kv(cluster=stored))
            elif stored != local:
                raise ClusterMismatchError(self._mismatch_message(local, stored))
            self._stored = True
        self._checked = True

    def _mismatch_message(self, local: str, stored: str) -> str:
        lease = self._config.lease
        where = f"etcd key {lease.etcd.key}" if lease.type == "etcd" else "the lease"
        return (
            f"cluster id mismatch: {self.data_dir} belongs to cluster {local}, but {where} "
            f"belongs to cluster {stored}; a node joins one cluster only: move data.dir aside "
            "to join this cluster (or point lease.etcd.key at the node's own cluster)"
        )

    async def _store(self, leaser: Leaser, lease: Lease) -> None:
        """The first primary of a cluster names it; later ones check they belong to it."""
        local = self._client.cluster_id
        try:
            stored = await leaser.set_cluster_id(local or new_cluster_id())
        except LeaseError as exc:
            if not local:
                local = new_cluster_id()
                await trio.to_thread.run_sync(save_cluster_id, self.data_dir, local)
                self._client.cluster_id = local
            log.warning("could not store the cluster id with the lease, will retry: %s", exc)
            self._checked = False
            return
        self._stored = True
        if local and stored != local:
            with trio.CancelScope(shield=True):
                try:
                    await lease.release()
                except LeaseError:
                    pass  # it expires by itself
            raise ClusterMismatchError(self._mismatch_message(local, stored))
        if not local:
            await trio.to_thread.run_sync(save_cluster_id, self.data_dir, stored)
            self._client.cluster_id = stored
            log.info("new cluster %s", kv(cluster=stored))
        self._checked = True
