"""The one exception type for bad configuration, so callers can catch it and print it plainly."""


class ConfigError(ValueError):
    """A configuration value, key or combination that cannot work; the message names the key."""
