"""Exception types shared by every layer. User mistakes raise LongcpmError subclasses so the CLI and
server can show one clear line instead of a traceback."""


class LongcpmError(Exception):
    """Base class for errors caused by user input (bad files, bad arguments, bad requests)."""


class ConfigError(LongcpmError, ValueError):
    """A config.json (or sparse_config) field is missing, mistyped or inconsistent."""


class CheckpointError(LongcpmError):
    """Weights are missing, unexpected, wrongly shaped, corrupt or in a refused format."""


class TokenizerError(LongcpmError):
    """Tokenizer files are missing or unreadable."""


class RequestError(LongcpmError, ValueError):
    """A generation request cannot be served (prompt too long, bad sampling parameters, ...)."""
