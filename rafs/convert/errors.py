"""Errors of the image converter (all under :class:`rafs.errors.RafsError`)."""

from __future__ import annotations

from rafs.errors import RafsError


class ConvertError(RafsError):
    """Base of every error raised by :mod:`rafs.convert`."""


class InvalidReference(ConvertError, ValueError):
    """An image reference or source spec cannot be parsed."""


class SourceError(ConvertError):
    """The source image is malformed, unsupported or unreachable."""


class PushError(ConvertError):
    """The target registry refused or failed an upload."""


class CheckError(ConvertError):
    """``nydusify check`` found a difference or a malformed nydus image."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        shown = "; ".join(problems[:20])
        more = f" (+{len(problems) - 20} more)" if len(problems) > 20 else ""
        super().__init__(f"{len(problems)} problem(s): {shown}{more}")

