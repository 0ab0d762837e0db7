"""The churnsignal error tree: infrastructure and configuration problems (data problems are results)."""


class ChurnsignalError(Exception):
    """Root of every error churnsignal raises on purpose."""


class ConfigError(ChurnsignalError):
    """A setting is missing or invalid; the message names it."""


class BrokerUnavailable(ChurnsignalError):
    """Kafka did not answer in time, or refused our credentials."""


class SinkUnavailable(ChurnsignalError):
    """ClickHouse cannot take writes right now; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after
