"""Exceptions with messages meant for the person at the terminal."""


class KemariError(Exception):
    """Base of every error Kemari reports to a user (printed without a traceback)."""


class ConfigError(KemariError):
    """The configuration file is missing, malformed or inconsistent."""


class KvmError(KemariError):
    """A KVM operation failed."""


class GuestCrashed(KemariError):
    """The guest stopped in a way no device asked for (triple fault, bad MMIO...)."""


class SnapshotError(KemariError):
    """A snapshot file is unreadable, corrupt, or does not fit this VM."""
