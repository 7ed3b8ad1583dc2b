"""The errors a user sees: each ends a command in one line naming what was wrong and what to do (cli.py
prints it with exit code 2, or 130 for Ctrl-C), never a traceback.

This module imports nothing from the package, so any module may raise these without pulling in another.
A defect in one device's message (wire/: PacketError, UploadError) is not here: the server leaves that
device out and the run goes on.
"""


class ConfigError(ValueError):
    """A config value is wrong; the message names the key, the value and what is allowed, e.g.
    config error: [server] lam = -1.0: must be >= 0 (weight of the distillation term)"""


def toml_at(section: str) -> str:
    """Where in the TOML: "[server]", or a device as config.device_at names it ("[[devices]] #2 (id 'ghr')")."""
    return section if section.startswith("[") else f"[{section}]"


def config_fail(section: str, key: str, value, why: str) -> None:
    """Raise the one-line config error every section's validate() gives."""
    raise ConfigError(f"config error: {toml_at(section)} {key} = {value!r}: {why}")


class DeviceUnavailable(ConfigError, RuntimeError):
    """The config names a torch device this machine does not have: a config error where the run starts."""


class DataError(ValueError):
    """A data problem; the message names the file and says what to do."""


class RunDirError(Exception):
    """The run directory cannot be used as asked (taken, locked, or the run stopped): one line, exit code 2."""


class RunInterrupted(RunDirError):
    """Ctrl-C during a run; the message says what was saved and how to resume (exit code 130)."""
