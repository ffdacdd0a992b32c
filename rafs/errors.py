"""The rafs package's error hierarchy."""

from __future__ import annotations


class RafsError(Exception):
    """Base of every error raised by :mod:`rafs`."""


class FormatError(RafsError, ValueError):
    """A bootstrap or blob is malformed; the message names the field and value."""


class UnsupportedError(RafsError, NotImplementedError):
    """A valid but unsupported image feature (e.g. encryption)."""


class NotServed(UnsupportedError):
    """An upstream nydusd API request this daemon does not serve: the API answers 501, as
    upstream answers a request its kind of daemon does not support."""


class StateError(RafsError):
    """A daemon lifecycle request that its current state does not allow (upstream's
    ``UnexpectedEvent``, e.g. ``takeover`` on a daemon that is not waiting in INIT): 400."""


class NotFound(RafsError, FileNotFoundError):
    """No such path or inode in the image."""


class NotADirectory(RafsError, NotADirectoryError):
    """A directory operation on a non-directory inode."""


class BuildError(RafsError):
    """The builder cannot represent the input (bad name, unsupported xattr, ...)."""


class StaleHandle(RafsError):
    """A filesystem request names an inode of an instance that is gone (unmounted)."""


class ReadError(RafsError):
    """Reading file data failed; the message names the instance, inode, range and chunks, and
    the lower-layer error is the ``__cause__``."""


class MountError(RafsError):
    """Mounting or serving a RAFS instance failed."""


class ConfigError(RafsError, ValueError):
    """A nydusd / daemon configuration is malformed; the message names the field."""


class TraceError(RafsError, ValueError):
    """A prefetch trace file is malformed; the message names the line."""
