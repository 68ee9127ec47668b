"""Handoff: the primary hands the lease to a caught-up replica without a gap.

(`Admin.Promote` on the target, `litefspy run --promote`, `lease.promote:
true`): the target asks the primary (`Admin.Handoff`), which stops writes,
waits until the target's stream has carried every transaction, re-points the
lease at the target and sends the token in a Handoff frame (and in the RPC's
reply); the target adopts the lease once it has applied those positions
(`Cluster`'s role loop) and promotes itself.
"""

from __future__ import annotations

import logging

import trio

from litefspy.cluster.roles import Cluster
from litefspy.cluster.state import REPLICA, PendingHandoff
from litefspy.errors import LeaseError, LitefspyError
from litefspy.lease.base import HandoffToken, Lease, PrimaryInfo
from litefspy.logs import kv
from litefspy.replication.server import ReplicaSession, ReplicationServer
from litefspy.rpc import client as rpc_client
from litefspy.rpc.errors import Code, RPCRefused
from litefspy.rpc.methods import HANDOFF_METHOD
from litefspy.store.types import Position
from litefspy.v1 import admin_pb2, replication_pb2

log = logging.getLogger(__name__)

# Handoff: the target must have every transaction within this (primary side).
HANDOFF_SYNC_TIMEOUT = 5.0
# `Admin.Promote` gives up after this unless the request says otherwise.
PROMOTE_TIMEOUT = 15.0
POLL = 0.005


class Handoffs:
    """Both sides of a handoff for one node's `Cluster`."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self._handoff_lock = trio.Lock()
        self._promote_lock = trio.Lock()

    # ------------------------------------------------------------ target side

    def on_handoff_frame(self, handoff: replication_pb2.Handoff) -> None:
        """The primary hands this node the lease (called by the replication client)."""
        try:
            token = HandoffToken.from_json(handoff.token)
        except LeaseError as exc:
            log.error("ignoring an invalid handoff token from the primary: %s", exc)
            return
        positions = {p.name: Position(p.txid, p.checksum) for p in handoff.positions}
        self.offer(token, positions)

    def offer(self, token: HandoffToken, positions: dict[str, Position]) -> PendingHandoff:
        """Give the role loop a token to adopt (once, however many times it arrives)."""
        state = self.cluster.state
        pending = state.pending
        if pending is not None and pending.token.epoch >= token.epoch:
            return pending
        lease = self.cluster.lease
        if lease is not None and lease.epoch >= token.epoch:
            done = PendingHandoff(token, positions)
            done.done.set()
            return done  # adopted already (the frame and the reply both carry it)
        pending = PendingHandoff(token, positions)
        state.offer(pending)
        return pending

    async def promote(self, within: float) -> str:
        """Become primary through a handoff within `within` seconds; the previous primary's name."""
        cluster = self.cluster
        if not cluster.candidate:
            raise RPCRefused(
                Code.FAILED_PRECONDITION,
                f"{cluster.hostname} cannot become primary: lease.candidate is false",
            )
        if cluster.fixed_primary():
            raise RPCRefused(
                Code.FAILED_PRECONDITION,
                "cannot promote: lease.type is static, the primary is fixed by configuration "
                "(use lease.type: etcd for handoff)",
            )
        try:
            with trio.fail_after(within):
                return await self._promote_via_handoff()
        except trio.TooSlowError:
            raise RPCRefused(
                Code.UNAVAILABLE, f"{cluster.hostname} did not become primary within {within:g}s"
            ) from None

    async def _promote_via_handoff(self) -> str:
        """Ask the current primary for the lease; return its hostname once promoted."""
        cluster = self.cluster
        async with self._promote_lock:
            if cluster.is_primary():
                return ""
            client = cluster.client
            await cluster.state.wait_until(
                lambda: cluster.state.role == REPLICA and client.connected and client.caught_up
            )
            assert client.primary is not None
            previous = client.primary.hostname
            url = client.primary_url
            log.info("asking the primary for the lease %s", kv(primary=previous, url=url))
            request = admin_pb2.HandoffRequest(
                target=admin_pb2.NodeInfo(
                    id=cluster.me.node_id,
                    hostname=cluster.hostname,
                    advertise_url=cluster.advertise_url,
                )
            )
            reply = await rpc_client.acall_unary(
                url,
                HANDOFF_METHOD,
                request,
                admin_pb2.HandoffReply,
                deadline=HANDOFF_SYNC_TIMEOUT + 5.0,
            )
            token = HandoffToken.from_json(reply.token)
            positions = {p.name: Position(p.txid, p.checksum) for p in reply.positions}
            pending = self.offer(token, positions)
            await pending.done.wait()
            if pending.error is not None:
                raise LeaseError(f"handoff from {previous} failed: {pending.error}")
            # Adopted: the role loop promotes this node next.
            await cluster.state.wait_until(cluster.is_primary, POLL)
            return previous

    async def auto_promote(self) -> None:
        """`lease.promote: true`: once caught up with a primary, ask it for the lease."""
        cluster = self.cluster
        if cluster.fixed_primary():
            log.warning("lease.promote has no effect with lease.type static")
            return
        await cluster.wait_caught_up()
        if cluster.is_primary():
            return
        try:
            with trio.fail_after(PROMOTE_TIMEOUT):
                previous = await self._promote_via_handoff()
        except (LitefspyError, trio.TooSlowError) as exc:
            log.warning("lease.promote: could not take over the lease: %s", exc or "timed out")
            return
        log.info("lease.promote: took over the lease %s", kv(previous=previous))

    # ----------------------------------------------------------- primary side

    def check_primary(self) -> tuple[Lease, ReplicationServer]:
        """The lease and server of this primary; RPCRefused when it is not the primary."""
        cluster = self.cluster
        lease, server = cluster.lease, cluster.server
        if lease is None or server is None or not cluster.is_primary():
            primary = cluster.primary_hostname()
            raise RPCRefused(
                Code.FAILED_PRECONDITION,
                f"{cluster.hostname} is not the primary"
                + (f" (the primary is {primary})" if primary else ""),
            )
        return lease, server

    async def hand_off(
        self, target_id: int, target: PrimaryInfo
    ) -> tuple[HandoffToken, list[replication_pb2.Position]]:
        """Stop writes, let the target catch up, hand it the lease: (token, final positions)."""
        lease, server = self.check_primary()
        session = server.session_for(target_id)
        if session is None:
            raise RPCRefused(
                Code.FAILED_PRECONDITION,
                f"node {target.hostname} is not replicating from {self.cluster.hostname}: "
                "it must be connected and caught up before it can take over",
            )
        if self._handoff_lock.locked():
            raise RPCRefused(Code.UNAVAILABLE, "a handoff is already in progress")
        async with self._handoff_lock:
            return await self._hand_off(lease, server, session, target)

    async def _hand_off(
        self,
        lease: Lease,
        server: ReplicationServer,
        session: ReplicaSession,
        target: PrimaryInfo,
    ) -> tuple[HandoffToken, list[replication_pb2.Position]]:
        cluster = self.cluster
        started = trio.current_time()
        caught_up = False
        log.info("handing off the lease %s", kv(target=target.hostname, epoch=lease.epoch))
        demoted = cluster.start_demote()
        final = {db.name: db.pos for db in cluster.store.databases() if db.pos.txid > 0}
        with trio.move_on_after(HANDOFF_SYNC_TIMEOUT):
            caught_up = await server.wait_caught_up(session)
        if not caught_up:
            await self._abort_handoff(lease, demoted)
            raise RPCRefused(
                Code.UNAVAILABLE,
                f"handoff to {target.hostname} aborted: it did not receive every "
                f"transaction within {HANDOFF_SYNC_TIMEOUT:g}s; {cluster.hostname} stays primary",
            )
        try:
            token = await lease.handoff(target)
        except LeaseError as exc:
            await self._abort_handoff(lease, demoted)
            raise RPCRefused(Code.UNAVAILABLE, f"handoff failed: {exc}") from None
        positions = [
            replication_pb2.Position(name=name, txid=pos.txid, checksum=pos.checksum)
            for name, pos in sorted(final.items())
        ]
        server.send_handoff(
            session,
            replication_pb2.Handoff(
                target_node_id=session.node_id, token=token.to_json(), positions=positions
            ),
        )
        cluster.no_acquire_until = trio.current_time() + cluster.config.lease.demote_delay
        log.info(
            "lease handed off %s",
            kv(
                target=target.hostname,
                epoch=token.epoch,
                ms=f"{(trio.current_time() - started) * 1000:.1f}",
            ),
        )
        return token, positions

    async def _abort_handoff(self, lease: Lease, demoted: trio.Event) -> None:
        """Resume writes after a failed handoff if the lease is still ours."""
        await demoted.wait()
        if lease.lost.is_set() or trio.current_time() >= lease.deadline():
            return  # the role loop demotes
        self.cluster.demoting = None
        self.cluster.store.promote()
        log.warning("handoff aborted; still the primary, writes resumed")
