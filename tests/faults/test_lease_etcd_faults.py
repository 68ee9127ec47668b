"""etcd lease when etcd hangs, dies and comes back: the holder demotes by its deadline."""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import trio

from litefspy.errors import LeaseError
from litefspy.lease.base import PrimaryInfo
from litefspy.lease.etcd import EtcdLease, EtcdLeaser
from tests.support.etcd_server import EtcdServer, etcd_private_fixture  # noqa: F401

pytestmark = pytest.mark.slow

TTL = 2.0
MARGIN = 0.4
A = PrimaryInfo(hostname="node-a", advertise_url="http://node-a:20202", node_id="a")
B = PrimaryInfo(hostname="node-b", advertise_url="http://node-b:20202", node_id="b")

MakeLeaser = Callable[..., EtcdLeaser]


@pytest.fixture
async def make_leaser(etcd_private: EtcdServer) -> AsyncIterator[MakeLeaser]:
    """Leasers on this test's own etcd, all on one key; closed afterwards."""
    key = f"test/{uuid.uuid4().hex}/primary"
    made: list[EtcdLeaser] = []

    def make(**kwargs: float) -> EtcdLeaser:
        leaser = EtcdLeaser([etcd_private.url], key, TTL, margin=MARGIN, **kwargs)
        made.append(leaser)
        return leaser

    yield make
    for leaser in made:
        await leaser.aclose()


async def assert_lost_by_deadline(lease: EtcdLease, etcd_failed_at: float) -> None:
    """`lost` is set at the deadline, before etcd's TTL can run out, whatever hangs."""
    with trio.fail_after(TTL + 1):
        await lease.lost.wait()
    lost_at = trio.current_time()
    last_renewal = lease.expires_at - TTL  # send time of the last renewal etcd confirmed
    deadline = last_renewal + TTL - MARGIN
    assert last_renewal <= etcd_failed_at, "no renewal can succeed after etcd failed"
    assert deadline <= lost_at < last_renewal + TTL
    assert lease.deadline() == -math.inf
    assert lease.lost_reason is not None and "no renewal confirmed" in lease.lost_reason


async def acquire_eventually(leaser: EtcdLeaser, me: PrimaryInfo, within: float) -> EtcdLease:
    """Retry acquire until the old holder's lease has expired in etcd."""
    with trio.fail_after(within):
        while True:
            lease = await leaser.acquire(me)
            if lease is not None:
                return lease
            await trio.sleep(0.1)


async def test_holder_demotes_by_deadline_while_etcd_hangs(
    etcd_private: EtcdServer, make_leaser: MakeLeaser
) -> None:
    a, b = make_leaser(), make_leaser(watch_refresh=0.5)
    lease_a = await a.acquire(A)
    assert lease_a is not None
    state = await b.current()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lease_a.run)
        watch_error: list[LeaseError] = []

        async def watcher() -> None:
            with pytest.raises(LeaseError) as info:
                await b.watch(state.revision)
            watch_error.append(info.value)

        nursery.start_soon(watcher)
        await trio.sleep(1.0)  # a few renewals go through
        assert not lease_a.lost.is_set()

        # SIGSTOP: the kernel still accepts connections, nobody answers.
        etcd_private.pause()
        paused_at = trio.current_time()
        try:
            await assert_lost_by_deadline(lease_a, paused_at)
            # Every call gives up with a LeaseError instead of hanging.
            with trio.fail_after(2), pytest.raises(LeaseError, match="no answer within"):
                await b.acquire(B)
            # The watcher notices at its next stream reopen.
            with trio.fail_after(2):
                while not watch_error:
                    await trio.sleep(0.05)
            assert "unreachable" in str(watch_error[0])
        finally:
            etcd_private.resume()
    # run() returned (the nursery closed) although its renewal request was hanging.

    # etcd notices the TTL ran out while it was paused and deletes the key.
    lease_b = await acquire_eventually(b, B, within=TTL + 3)
    assert lease_b.epoch > lease_a.epoch
    assert (await b.current()).primary == B
    await lease_b.release()


async def test_holder_demotes_when_etcd_dies_and_acquire_works_after_restart(
    etcd_private: EtcdServer, make_leaser: MakeLeaser
) -> None:
    a, b = make_leaser(), make_leaser()
    lease_a = await a.acquire(A)
    assert lease_a is not None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lease_a.run)
        await trio.sleep(0.8)
        etcd_private.kill()  # kill -9: every renewal now gets "connection refused"
        killed_at = trio.current_time()
        await assert_lost_by_deadline(lease_a, killed_at)

    with pytest.raises(LeaseError) as info:
        await b.acquire(B)
    assert str(info.value) == f"etcd at {etcd_private.url} unreachable: connection refused"
    # Releasing cannot reach etcd either: said so, and the lease will expire alone.
    with pytest.raises(LeaseError, match=r"unreachable.*expires within 2s"):
        await lease_a.release()

    # Same ports, same data dir. etcd restores the old lease with a fresh TTL,
    # so B gets the key once that runs out; revisions (and so epochs) persist.
    await trio.to_thread.run_sync(etcd_private.start)
    lease_b = await acquire_eventually(b, B, within=TTL + 5)
    assert lease_b.epoch > lease_a.epoch
    state = await a.current()
    assert state.primary == B
    await lease_b.release()
