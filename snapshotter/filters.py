"""containerd's filter syntax for ``List`` (``github.com/containerd/containerd/filters``).

Grammar (containerd 1.6)::

    selectors := selector ("," selector)*          all must match
    selector  := fieldpath (operator value)?       no operator = "field is present"
    fieldpath := field ("." field)*
    field     := quoted | [A-Za-z_][A-Za-z0-9_]*
    operator  := "==" | "!=" | "~="
    value     := quoted | [^\\s,]+
    quoted    := a Go-style "..." or '...' string (`...`, /.../ and |...| also after "~=")

Several filter strings are OR-ed. Snapshot fields: ``kind`` (active/view/committed), ``name``,
``parent`` and ``labels.<key>`` (the rest of the path joined with ".").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

from snapshotter.errors import InvalidArgument
from snapshotter.metastore import Info, Kind

_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_VALUE = re.compile(r"[^\s,]+")
_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
            "\\": "\\", "'": "'", '"': '"', "/": "/", "|": "|", "`": "`"}


@dataclass(frozen=True, slots=True)
class Selector:
    """One ``fieldpath op value`` term; ``op`` is ``""`` for a presence test."""

    fieldpath: tuple[str, ...]
    op: str = ""
    value: str = ""


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, msg: str) -> InvalidArgument:
        return InvalidArgument(f"filters: parse error: [{self.text}] at {self.pos}: {msg}")

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_ws()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def quoted(self, alt: bool) -> str:
        quote = self.text[self.pos]
        allowed = "\"'" + ("`/|" if alt else "")
        if quote not in allowed:
            raise self.error("invalid quote encountered")
        self.pos += 1
        out: list[str] = []
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            self.pos += 1
            if ch == quote:
                return "".join(out)
            if ch == "\\" and quote != "`":
                if self.pos >= len(self.text):
                    break
                esc = self.text[self.pos]
                self.pos += 1
                if esc in _ESCAPES:
                    out.append(_ESCAPES[esc])
                elif esc in "xuU":
                    width = {"x": 2, "u": 4, "U": 8}[esc]
                    digits = self.text[self.pos:self.pos + width]
                    if len(digits) != width or not all(c in "0123456789abcdefABCDEF" for c in digits):
                        raise self.error("unquoting failed: invalid escape")
                    out.append(chr(int(digits, 16)))
                    self.pos += width
                else:
                    raise self.error(f"unquoting failed: invalid escape \\{esc}")
                continue
            out.append(ch)
        raise self.error("quoted string not terminated")

    def field(self) -> str:
        ch = self.peek()
        if ch and ch in "\"'":
            return self.quoted(alt=False)
        m = _FIELD.match(self.text, self.pos)
        if not m:
            raise self.error("expected field or quoted")
        self.pos = m.end()
        return m.group(0)

    def selector(self) -> Selector:
        path = [self.field()]
        while self.peek() == ".":
            self.pos += 1
            path.append(self.field())
        if self.peek() in ("", ","):
            return Selector(tuple(path))
        op = self.text[self.pos:self.pos + 2]
        if op not in ("==", "!=", "~="):
            raise self.error('expected an operator ("=="|"!="|"~=")')
        self.pos += 2
        ch = self.peek()
        if ch == "":
            raise self.error("unexpected end of input, expected value")
        if ch in "\"'" or (op == "~=" and ch in "`/|"):
            value = self.quoted(alt=op == "~=")
        else:
            m = _VALUE.match(self.text, self.pos)
            assert m is not None
            value = m.group(0)
            self.pos = m.end()
        if op == "~=":
            try:
                re.compile(value)
            except re.error as exc:
                raise self.error(f"invalid regular expression {value!r}: {exc}") from exc
        return Selector(tuple(path), op, value)

    def parse(self) -> list[Selector]:
        selectors = [self.selector()]
        while True:
            ch = self.peek()
            if ch == "":
                return selectors
            if ch != ",":
                raise self.error(f"unexpected input: {ch}")
            self.pos += 1
            selectors.append(self.selector())


def parse(text: str) -> list[Selector]:
    """The selectors of one filter string (empty string = match everything)."""
    if text == "":
        return []
    return _Parser(text).parse()


_KIND_NAMES = {Kind.ACTIVE: "active", Kind.VIEW: "view", Kind.COMMITTED: "committed"}


def snapshot_field(info: Info, fieldpath: Sequence[str]) -> tuple[str, bool]:
    """containerd's snapshot adaptor: ``(value, present)`` of a field path."""
    if not fieldpath:
        return "", False
    head = fieldpath[0]
    if head == "kind":
        name = _KIND_NAMES.get(info.kind)
        return (name, True) if name else ("", False)
    if head == "name":
        return info.name, True
    if head == "parent":
        return info.parent, True
    if head == "labels":
        if not info.labels:
            return "", False
        key = ".".join(fieldpath[1:])
        if key in info.labels:
            return info.labels[key], True
        return "", False
    return "", False


def _match(sel: Selector, info: Info) -> bool:
    value, present = snapshot_field(info, sel.fieldpath)
    if sel.op == "":
        return present
    if sel.op == "==":
        return present and value == sel.value
    if sel.op == "!=":
        return value != sel.value
    return present and re.search(sel.value, value) is not None


def compile_filters(filters: Sequence[str]) -> Callable[[Info], bool]:
    """A predicate for ``List``: any filter string matches (each = all of its selectors)."""
    parsed = [parse(f) for f in filters]
    if not parsed:
        return lambda info: True

    def match(info: Info) -> bool:
        return any(all(_match(s, info) for s in sels) for sels in parsed)

    return match
