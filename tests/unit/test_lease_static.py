"""Static lease: the configured primary always holds the role; the value types round-trip."""

from __future__ import annotations

import math

import pytest
import trio

from litefspy.errors import LeaseError
from litefspy.lease.base import HandoffToken, Leaser, PrimaryInfo
from litefspy.lease.static import StaticLeaser

PRIMARY = PrimaryInfo(hostname="db1", advertise_url="http://db1:20202", node_id="n1")
REPLICA = PrimaryInfo(hostname="db2", advertise_url="http://db2:20202", node_id="n2")


async def test_candidate_is_primary_forever_at_epoch_1() -> None:
    leaser: Leaser = StaticLeaser(PRIMARY, is_primary=True)
    lease = await leaser.acquire(PRIMARY)
    assert lease is not None
    assert leaser.type == "static"
    assert lease.epoch == 1
    assert lease.deadline() == math.inf
    assert lease.primary == PRIMARY
    # run() has nothing to renew; it must neither return nor lose the lease by itself.
    with trio.move_on_after(0.2) as scope:
        await lease.run()
    assert scope.cancelled_caught
    assert not lease.lost.is_set()


async def test_release_sets_lost_and_ends_run() -> None:
    lease = await StaticLeaser(PRIMARY, is_primary=True).acquire(PRIMARY)
    assert lease is not None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lease.run)
        await trio.sleep(0.01)
        await lease.release()
    # The nursery exited, so run() returned after release.
    assert lease.lost.is_set()
    assert lease.lost_reason == "released"
    assert lease.deadline() < trio.current_time()


async def test_other_nodes_see_the_configured_primary_and_never_get_the_role() -> None:
    leaser = StaticLeaser(PRIMARY, is_primary=False)
    assert await leaser.acquire(REPLICA) is None
    state = await leaser.current()
    assert state.primary == PRIMARY
    assert state.epoch == 1
    # The role never changes, so watch never returns.
    with trio.move_on_after(0.2) as scope:
        await leaser.watch(state.revision)
    assert scope.cancelled_caught


async def test_handoff_and_adopt_are_refused_with_a_reason() -> None:
    leaser = StaticLeaser(PRIMARY, is_primary=True)
    lease = await leaser.acquire(PRIMARY)
    assert lease is not None
    with pytest.raises(LeaseError, match="static"):
        await lease.handoff(REPLICA)
    assert not lease.lost.is_set(), "a refused handoff must not cost the role"
    token = HandoffToken(lease_id=1, epoch=2, primary=REPLICA)
    with pytest.raises(LeaseError, match="static"):
        await StaticLeaser(PRIMARY, is_primary=False).adopt(token, REPLICA)


async def test_cluster_id_is_set_if_absent_in_memory() -> None:
    async with StaticLeaser(PRIMARY, is_primary=True) as leaser:
        assert await leaser.cluster_id() is None
        assert await leaser.set_cluster_id("abc") == "abc"
        assert await leaser.set_cluster_id("xyz") == "abc"
        assert await leaser.cluster_id() == "abc"


def test_primary_info_round_trips_through_json() -> None:
    text = PRIMARY.to_json()
    assert PrimaryInfo.from_json(text) == PRIMARY
    assert PrimaryInfo.from_json(text.encode()) == PRIMARY


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[1]",
        '{"hostname": "a"}',
        '{"hostname": 1, "advertise_url": "", "node_id": ""}',
    ],
)
def test_primary_info_rejects_other_values_with_lease_error(text: str) -> None:
    with pytest.raises(LeaseError, match="invalid primary record"):
        PrimaryInfo.from_json(text)


def test_handoff_token_round_trips_through_json() -> None:
    token = HandoffToken(lease_id=2**63 - 1, epoch=42, primary=REPLICA)
    assert HandoffToken.from_json(token.to_json()) == token
    with pytest.raises(LeaseError, match="invalid handoff token"):
        HandoffToken.from_json('{"lease_id": "1", "epoch": 2, "primary": {}}')
