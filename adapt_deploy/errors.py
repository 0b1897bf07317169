"""The user-facing error type: what the CLI prints without a traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad path, bad config, bad file); the message says how."""


class ConfigError(UserError):
    """A configuration file or override that does not match the schema."""


class DatasetError(UserError):
    """A dataset directory or file that is missing, mislaid or inconsistent."""


def worker_message(text: str) -> str:
    """The one-line message of an error PyTorch re-raised from a DataLoader worker process.

    PyTorch rebuilds the error in the main process around the worker's whole traceback
    ("Caught DatasetError in DataLoader worker process 0. Original Traceback ..."); its last line
    is "module.Class: message". Other text is returned unchanged.
    """
    if not text.startswith("Caught ") or "Original Traceback" not in text:
        return text
    last = next((line for line in reversed(text.splitlines()) if line.strip()), text)
    name, sep, message = last.partition(": ")
    return message if sep and name.replace(".", "").replace("_", "").isalnum() else last
