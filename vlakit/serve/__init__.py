"""Serving a policy to robots: openpi's websocket protocol, batching of concurrent robots,
real-time chunking over the wire, and the robot-side executor.

- [PolicyServer][vlakit.serve.PolicyServer]: the server (``vlakit serve BUNDLE_DIR`` or
  ``python -m vlakit.serve BUNDLE_DIR`` run it); the unmodified ``openpi-client`` connects.
- [ChunkExecutor][vlakit.serve.ChunkExecutor]: a control loop on the robot side that
  executes the current chunk while the next is inferred, measures the delay and sends it
  with the unexecuted actions (real-time chunking).
- [packb][vlakit.serve.packb] / [unpackb][vlakit.serve.unpackb]: openpi's msgpack-numpy
  codec, without pickle.

Needs the ``serve`` extra (``pip install "vlakit-blocks[serve]"``: websockets, msgpack).
"""

from vlakit.serve.codec import CodecError, packb, unpackb
from vlakit.serve.executor import ChunkExecutor, WebsocketPolicy
from vlakit.serve.server import API_KEY_ENV, ObservationError, PolicyServer

__all__ = [
    "PolicyServer",
    "ObservationError",
    "ChunkExecutor",
    "WebsocketPolicy",
    "packb",
    "unpackb",
    "CodecError",
    "API_KEY_ENV",
]
