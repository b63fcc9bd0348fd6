"""One base exception, specific subclasses; messages name the field and the fix."""


class RecserveError(Exception):
    """Base class for every error recserve raises on purpose."""


class DataError(RecserveError):
    """Input data is missing, malformed or empty. The message names the file and line."""


class ArtifactError(RecserveError):
    """A checkpoint, export or repository is missing, stale or inconsistent."""


class ServerError(RecserveError):
    """The Triton server could not be started, reached, or answered with an error."""


class ClientError(RecserveError):
    """A request was rejected before or by the server (bad user id, bad k, ...)."""


class UnknownUserError(ClientError):
    """The user id is not in the served model's vocabulary."""


class GateError(RecserveError):
    """An optimised artifact failed its accuracy gate."""
