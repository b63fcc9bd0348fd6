"""recserve: retrieve-then-rank recommendations served by NVIDIA Triton."""

from recserve.errors import ArtifactError, ClientError, DataError, RecserveError, ServerError, UnknownUserError

__all__ = ["RecserveError", "DataError", "ArtifactError", "ServerError", "ClientError", "UnknownUserError"]
__version__ = "0.1.0"
