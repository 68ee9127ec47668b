"""The one package that imports grpc (DESIGN.md decision 8).

grpcio speaks threads (and asyncio), litefspy speaks trio; `rpc/` keeps that
seam narrow. `server` runs the node's gRPC server and bridges each call to a
trio handler; `client` holds the one channel helper and the blocking/trio
client calls; `errors` is the one table between litefspy exceptions and gRPC
status codes; `methods` names the RPCs from the service descriptors.

Handlers on the trio side never see grpc types; they raise `RPCRefused` to end
an RPC with a status code and a one-line message.
"""

import os

# grpc's C core logs connection events (GOAWAY, ...) to stderr at INFO unless told
# otherwise; litefspy reports what matters through its own logs. Set before any
# submodule imports grpc.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
