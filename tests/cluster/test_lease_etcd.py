"""etcd lease against a real etcd: election, renewal, release, watch, handoff, cluster id."""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
import trio

from litefspy.errors import LeaseError
from litefspy.lease.base import HandoffToken, LeaseState, PrimaryInfo
from litefspy.lease.etcd import EtcdLease, EtcdLeaser
from tests.support.etcd_server import EtcdServer, dead_endpoint, etcd_shared_fixture  # noqa: F401

TTL = 2.0
A = PrimaryInfo(hostname="node-a", advertise_url="http://node-a:20202", node_id="a")
B = PrimaryInfo(hostname="node-b", advertise_url="http://node-b:20202", node_id="b")

MakeLeaser = Callable[..., EtcdLeaser]


@pytest.fixture
async def make_leaser(etcd_shared: EtcdServer) -> AsyncIterator[MakeLeaser]:
    """Leasers on the shared etcd, all on one key unique to the test; closed afterwards."""
    key = f"test/{uuid.uuid4().hex}/primary"
    made: list[EtcdLeaser] = []

    def make(**kwargs: object) -> EtcdLeaser:
        endpoints = kwargs.pop("endpoints", [etcd_shared.url])
        leaser = EtcdLeaser(endpoints, key, TTL, **kwargs)  # type: ignore[arg-type]
        made.append(leaser)
        return leaser

    yield make
    for leaser in made:
        await leaser.aclose()


async def etcd_call(server: EtcdServer, path: str, body: dict[str, object]) -> None:
    """A raw gateway call, for what a test does behind the library's back."""
    async with httpx.AsyncClient(trust_env=False) as client:
        resp = await client.post(f"{server.url}/v3/{path}", json=body, timeout=5)
        resp.raise_for_status()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def test_one_of_two_acquires_the_other_sees_the_holder(make_leaser: MakeLeaser) -> None:
    a, b = make_leaser(), make_leaser()
    lease_a = await a.acquire(A)
    assert lease_a is not None
    assert a.type == "etcd"
    assert await b.acquire(B) is None
    state = await b.current()
    assert state.primary == A
    assert state.epoch == lease_a.epoch > 0
    assert state.revision >= state.epoch

    await lease_a.release()
    assert lease_a.lost.is_set()
    assert lease_a.deadline() < trio.current_time(), "a released lease fails closed"
    lease_b = await b.acquire(B)
    assert lease_b is not None, "release must let a successor in at once"
    assert lease_b.epoch > lease_a.epoch
    assert (await a.current()).primary == B
    await lease_b.release()
    assert (await a.current()).primary is None


@pytest.mark.slow
async def test_renewals_keep_the_lease_past_several_ttls(make_leaser: MakeLeaser) -> None:
    a, b = make_leaser(), make_leaser()
    lease = await a.acquire(A)
    assert lease is not None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lease.run)
        await trio.sleep(3.2 * TTL)
        assert not lease.lost.is_set(), lease.lost_reason
        assert lease.deadline() > trio.current_time() + TTL / 3
        assert await b.acquire(B) is None
        assert (await b.current()).epoch == lease.epoch, "renewing must not change the epoch"
        await lease.release()
    lease_b = await b.acquire(B)
    assert lease_b is not None
    await lease_b.release()


async def watch_in_background(
    nursery: trio.Nursery, leaser: EtcdLeaser, after: int
) -> Callable[[], LeaseState | None]:
    """Start leaser.watch(after); return a getter for its result (None while waiting)."""
    box: list[LeaseState] = []

    async def watcher() -> None:
        box.append(await leaser.watch(after))

    nursery.start_soon(watcher)
    await trio.sleep(0.2)  # let the watch stream open before the change
    return lambda: box[0] if box else None


async def wait_for(get: Callable[[], LeaseState | None], within: float) -> LeaseState:
    with trio.fail_after(within):
        while (state := get()) is None:
            await trio.sleep(0.01)
    return state


@pytest.mark.slow
async def test_watch_wakes_on_acquire_release_and_expiry(make_leaser: MakeLeaser) -> None:
    # watch_refresh < TTL, so waiting for the expiry crosses several stream reopens.
    a, b = make_leaser(), make_leaser(watch_refresh=0.5)
    state = await b.current()
    async with trio.open_nursery() as nursery:
        get = await watch_in_background(nursery, b, state.revision)
        assert get() is None
        lease = await a.acquire(A)
        assert lease is not None
        state = await wait_for(get, within=1)
        assert state.primary == A
        assert state.epoch == lease.epoch

        get = await watch_in_background(nursery, b, state.revision)
        assert get() is None
        await lease.release()
        state = await wait_for(get, within=1)
        assert state.primary is None

        # Acquire and never renew: etcd expires the key after the TTL.
        lease = await a.acquire(A)
        assert lease is not None
        state = await b.current()
        assert state.primary == A
        started = trio.current_time()
        get = await watch_in_background(nursery, b, state.revision)
        state = await wait_for(get, within=TTL + 2)
        assert state.primary is None
        assert trio.current_time() - started >= TTL - 0.5
    assert (await b.current()).primary is None


async def test_watch_from_compacted_revision_returns_current_state(
    make_leaser: MakeLeaser, etcd_shared: EtcdServer
) -> None:
    a = make_leaser()
    lease = await a.acquire(A)
    assert lease is not None
    old = await a.current()
    await etcd_call(etcd_shared, "kv/put", {"key": b64(f"{a.key}-noise"), "value": b64("x")})
    now = await a.current()
    await etcd_call(etcd_shared, "kv/compaction", {"revision": str(now.revision)})
    with trio.fail_after(2):
        state = await a.watch(old.revision - 1)
    assert state.primary == A
    assert state.epoch == lease.epoch
    await lease.release()


async def test_handoff_moves_the_key_to_the_target(make_leaser: MakeLeaser) -> None:
    a, b = make_leaser(), make_leaser()
    lease_a = await a.acquire(A)
    assert lease_a is not None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lease_a.run)
        await trio.sleep(0.1)
        token = await lease_a.handoff(B)
        # The old holder stops at once, and its run() returns.
        assert lease_a.lost.is_set()
        assert lease_a.lost_reason is not None and "handed off" in lease_a.lost_reason
    assert token.epoch > lease_a.epoch
    assert token.primary == B

    with pytest.raises(LeaseError, match="not this node"):
        await a.adopt(token, A)
    stale = HandoffToken(lease_id=token.lease_id, epoch=lease_a.epoch, primary=B)
    with pytest.raises(LeaseError, match="rewritten"):
        await b.adopt(stale, B)

    # The token travels over the wire as JSON.
    lease_b = await b.adopt(HandoffToken.from_json(token.to_json()), B)
    assert isinstance(lease_b, EtcdLease)
    assert lease_b.epoch == token.epoch
    assert lease_b.lease_id == lease_a.lease_id
    state = await a.current()
    assert state.primary == B
    assert state.epoch == token.epoch

    # The old lease object is dead: it cannot hand off again, and releasing it
    # must not revoke the etcd lease the target now renews.
    with pytest.raises(LeaseError, match="already lost"):
        await lease_a.handoff(A)
    await lease_a.release()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lease_b.run)
        await trio.sleep(TTL + 0.5)  # past the TTL: the target's renewals work
        assert not lease_b.lost.is_set(), lease_b.lost_reason
        assert (await a.current()).primary == B
        await lease_b.release()
    assert (await a.current()).primary is None


async def test_key_deleted_behind_the_holders_back_loses_the_lease(
    make_leaser: MakeLeaser, etcd_shared: EtcdServer
) -> None:
    a = make_leaser()
    lease = await a.acquire(A)
    assert lease is not None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lease.run)
        await etcd_call(etcd_shared, "kv/deleterange", {"key": b64(a.key)})
        with trio.fail_after(TTL):
            await lease.lost.wait()
    assert lease.lost_reason is not None and "deleted" in lease.lost_reason
    await lease.release()  # lease still exists in etcd: revoke it, no error


async def test_cluster_id_is_set_if_absent(make_leaser: MakeLeaser) -> None:
    a, b = make_leaser(), make_leaser()
    assert await a.cluster_id() is None
    assert await a.set_cluster_id("LFSC0001") == "LFSC0001"
    assert await b.set_cluster_id("LFSC0002") == "LFSC0001"
    assert await b.cluster_id() == "LFSC0001"
    # Stored apart from the lease key: holding or releasing the lease leaves it alone.
    lease = await a.acquire(A)
    assert lease is not None
    await lease.release()
    assert await a.cluster_id() == "LFSC0001"


async def test_unreachable_etcd_is_a_clear_lease_error(make_leaser: MakeLeaser) -> None:
    dead = dead_endpoint()
    leaser = make_leaser(endpoints=[dead])
    message = f"etcd at {dead} unreachable: connection refused"
    with pytest.raises(LeaseError) as info:
        await leaser.acquire(A)
    assert str(info.value) == message
    with pytest.raises(LeaseError, match=re.escape(message)):
        await leaser.current()
    with pytest.raises(LeaseError, match=re.escape(message)):
        await leaser.watch(0)
    with pytest.raises(LeaseError, match=re.escape(message)):
        await leaser.set_cluster_id("x")


async def test_next_endpoint_is_tried_when_one_is_down(
    make_leaser: MakeLeaser, etcd_shared: EtcdServer
) -> None:
    leaser = make_leaser(endpoints=[dead_endpoint(), etcd_shared.url])
    lease = await leaser.acquire(A)
    assert lease is not None
    state = await leaser.current()
    assert state.primary == A
    await lease.release()
