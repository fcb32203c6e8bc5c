"""One error root for the project; leaves also inherit the builtin they resemble."""

import errno


class CropChipsError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(CropChipsError, ValueError):
    """A setting or input file is wrong; the message says what to change."""


class InputDataError(CropChipsError, ValueError):
    """An input dataset (GeoPackage, STAC items, COG) cannot be used as given."""


class SceneSearchError(CropChipsError, OSError):
    """The STAC search failed (unreachable API, bad response)."""


class MessageError(CropChipsError, ValueError):
    """A Kafka message is not valid JSON, has an unknown schema version or bad fields."""


class BrokerError(CropChipsError, OSError):
    """The Kafka broker could not be reached or refused an operation."""


class TaskError(CropChipsError):
    """A task could not be processed; the result carries the message."""


class RetryableError(CropChipsError, OSError):
    """A transient failure (HTTP 5xx, timeout, reset) worth retrying."""


#: errno values of failures of the machine around a task, not of the task: full or failing disks,
#: stale NFS handles, a network that is down. Worth waiting out.
TRANSIENT_ERRNOS = frozenset(getattr(errno, name) for name in (
    "EIO", "EAGAIN", "ENOSPC", "EROFS", "EPIPE", "ECONNRESET", "ETIMEDOUT", "ECONNREFUSED", "EHOSTDOWN",
    "EHOSTUNREACH", "ENETUNREACH", "ENETDOWN", "ESTALE", "EDQUOT") if hasattr(errno, name))


def is_transient(exc: BaseException) -> bool:
    """True for a failure of the infrastructure (storage, network, a server) rather than of the
    task's input: retrying later may succeed, so the task must not be dead-lettered."""
    if isinstance(exc, RetryableError):
        return True
    if isinstance(exc, CropChipsError):
        return False  # our own errors say what they are: bad input, bad configuration
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return True
    # botocore (through s3fs) reports throttling and 5xx answers with these names.
    name = type(exc).__name__
    return name in {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                    "SlowDown", "ServiceUnavailable", "InternalError", "ThrottlingException"}
