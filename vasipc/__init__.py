"""vasipc: a model server for video analytics, and its client.

The server is `python -m vasipc.serve`; the wire contract is length-prefixed JSON over a
Unix socket with frames passed by path. This package's top level stays light (no ONNX
Runtime, no compiled core) so that producers and callers can import the client cheaply.
"""

__version__ = "0.1.0"

from vasipc.client import Client, Detection, InferResult, ServerInfo, discover
from vasipc.errors import *  # noqa: F403
from vasipc.errors import ERROR_CLASSES, VasipcError

__all__ = ["ERROR_CLASSES", "Client", "Detection", "InferResult", "ServerInfo", "VasipcError",
           "__version__", "discover"]
