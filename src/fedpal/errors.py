"""Errors a user can fix; the CLI prints their message as one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user: config, file, dataset not installed, impossible partition."""


class ConfigError(UserError):
    """A config key or value that fails validation."""


class DatasetNotInstalled(UserError):
    """A dataset whose package files are not on this machine."""
