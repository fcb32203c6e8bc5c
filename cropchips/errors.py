"""One error root for the project; leaves also inherit the builtin they resemble."""


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
