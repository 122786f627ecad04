"""User-facing errors: each message names what is wrong and how to fix it."""


class CodedistillError(Exception):
    """Base class; the CLI prints these without a traceback."""


class DataError(CodedistillError):
    """A missing or malformed dataset or samples file."""


class ConfigError(CodedistillError):
    """Bad configuration or flags (unknown model alias, value out of range, ...)."""
