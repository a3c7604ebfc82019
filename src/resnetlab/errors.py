"""Errors a user can act on. The CLI prints their message on one line and exits with code 2."""


class ResNetLabError(Exception):
    """Base class: the message says what went wrong and what to do."""


class ConfigError(ResNetLabError, ValueError):
    """A wrong option, value or depth."""


class UnknownModelError(ConfigError, KeyError):
    """A model name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class WeightsError(ResNetLabError):
    """A weights directory that is missing, corrupted or does not match the architecture."""
