"""Who is primary: lease protocols (`base`) and their backends (`static`, `etcd`).

`node.py` builds one `Leaser` from fuse.yml's `lease.*` keys; the role loop
(`litefspy.cluster.roles`) uses only the protocols in `base` (read its docstring for the rules).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from litefspy.lease.base import HandoffToken, Lease, Leaser, LeaseState, PrimaryInfo
from litefspy.lease.etcd import EtcdLease, EtcdLeaser
from litefspy.lease.static import StaticLease, StaticLeaser

__all__ = [
    "EtcdLease",
    "EtcdLeaser",
    "HandoffToken",
    "Lease",
    "LeaseState",
    "Leaser",
    "PrimaryInfo",
    "StaticLease",
    "StaticLeaser",
]

if TYPE_CHECKING:

    def _backends_satisfy_the_protocols(
        static: StaticLeaser, etcd: EtcdLeaser, static_lease: StaticLease, etcd_lease: EtcdLease
    ) -> tuple[Leaser, Leaser, Lease, Lease]:
        # Never called: mypy fails here if a backend drifts from the protocols.
        return static, etcd, static_lease, etcd_lease
