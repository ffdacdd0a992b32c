"""The snapshotter package's error hierarchy; ``service.py`` maps these to gRPC codes."""

from __future__ import annotations


class SnapshotterError(Exception):
    """Base of every error raised by :mod:`snapshotter`."""


class NotFound(SnapshotterError):
    """gRPC NOT_FOUND."""


class AlreadyExists(SnapshotterError):
    """gRPC ALREADY_EXISTS."""


class FailedPrecondition(SnapshotterError):
    """gRPC FAILED_PRECONDITION."""


class InvalidArgument(SnapshotterError):
    """gRPC INVALID_ARGUMENT."""


class ConfigError(SnapshotterError):
    """The configuration file is invalid (unknown key, wrong type)."""


class Unavailable(SnapshotterError):
    """gRPC UNAVAILABLE: a RAFS instance cannot be started (daemon failed, registry unreachable)."""


class BootstrapError(InvalidArgument):
    """A nydus bootstrap layer does not hold a valid RAFS bootstrap."""
