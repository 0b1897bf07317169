"""The user-facing error type: what the CLI prints without a traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad path, bad config, bad file); the message says how."""


class ConfigError(UserError):
    """A configuration file or override that does not match the schema."""


class DatasetError(UserError):
    """A dataset directory or file that is missing, mislaid or inconsistent."""
