"""The Attamba family: its config section (``config.py``), attention, block and ``FAMILY``
(``family.py``, which the registry imports: this package file stays empty so that the config
module can import ``config.py`` without a cycle)."""
