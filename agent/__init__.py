"""The gpucap node agent: config, loop, joins, analytics, exposition, CLI."""

__version__ = "0.1.0"
