"""The config system's one error type (a leaf of dinocell.config, so that every section module can raise it)."""

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the field and where it came from."""
