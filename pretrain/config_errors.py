"""The one exception type for bad configuration, so callers can catch it and print it plainly."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value, key or combination that cannot work; the message names the key.

    The message is always one line (line breaks, e.g. from a YAML parser's report, become
    spaces): the entry points print it as one ``config error: ...`` line per process.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))

    @classmethod
    def from_problems(cls, header: str, problems: list[str]) -> ConfigError:
        """One error listing every problem: ``header: first; second; ...``."""
        return cls(f"{header}: " + "; ".join(problems))
