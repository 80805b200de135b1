#!/usr/bin/env python3
"""Regenerate chatd/uts39.txt, the Unicode tables behind the name rules (protocol.md section 7).

    python3 scripts/unicode_tables.py > chatd/uts39.txt

Python's ``unicodedata`` has neither scripts, Default_Ignorable_Code_Point nor the
UTS #39 confusables, so chatd ships them as a small text file read at import.  The
data comes from the system's ICU (libicu, loaded with ctypes, nothing compiled):
ICU compiles in Unicode's own files -- Scripts.txt and ScriptExtensions.txt,
DerivedCoreProperties.txt, and UTS #39's confusables.txt -- for the Unicode version it
reports, which the file's header records.  Debian 12's libicu72 gives ICU 72.1, Unicode
15.0.0.  Regenerating with another version changes skeletons: add a store migration
that recomputes the stored ones (chatd/store/sqlite.py, MIGRATIONS).

Sections of the output:
- ``ignorable``: ranges of Default_Ignorable_Code_Point;
- ``scripts``: for every letter, mark and number (and ``_-.``), its Script_Extensions
  as ISO 15924 codes (Zyyy Common, Zinh Inherited), consecutive code points with the
  same value merged into one range;
- ``confusables``: for every code point equal to its own NFD whose UTS #39 skeleton
  differs from itself, the skeleton (section 4: the prototype, in NFD).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import unicodedata
from collections.abc import Iterator

UCHAR_DEFAULT_IGNORABLE_CODE_POINT = 5  # UProperty in uchar.h
# UCharCategory values (uchar.h) of letters, marks and numbers.
_LMN_CATEGORIES = frozenset(range(1, 6)) | frozenset(range(6, 9)) | frozenset(range(9, 12))
_EXTRA_NAME_CHARACTERS = "_-."


class Icu:
    def __init__(self) -> None:
        self.version = self._find_version()
        suffix = f"_{self.version}"
        uc = ctypes.CDLL(f"libicuuc.so.{self.version}")
        i18n = ctypes.CDLL(f"libicui18n.so.{self.version}")
        self.char_type = getattr(uc, "u_charType" + suffix)
        self.char_type.argtypes = [ctypes.c_int32]
        self.char_type.restype = ctypes.c_int8
        self.has_property = getattr(uc, "u_hasBinaryProperty" + suffix)
        self.has_property.argtypes = [ctypes.c_int32, ctypes.c_int]
        self.has_property.restype = ctypes.c_int8
        self.script_extensions = getattr(uc, "uscript_getScriptExtensions" + suffix)
        self.script_extensions.argtypes = [
            ctypes.c_int32,
            ctypes.POINTER(ctypes.c_int),
            ctypes.c_int32,
            ctypes.POINTER(ctypes.c_int),
        ]
        self.script_extensions.restype = ctypes.c_int32
        self.short_name = getattr(uc, "uscript_getShortName" + suffix)
        self.short_name.argtypes = [ctypes.c_int]
        self.short_name.restype = ctypes.c_char_p
        unicode_version = (ctypes.c_uint8 * 4)()
        getattr(uc, "u_getUnicodeVersion" + suffix)(unicode_version)
        self.unicode_version = ".".join(str(part) for part in unicode_version[:3])
        icu_version = (ctypes.c_uint8 * 4)()
        getattr(uc, "u_getVersion" + suffix)(icu_version)
        self.icu_version = ".".join(str(part) for part in icu_version[:2])
        open_checker = getattr(i18n, "uspoof_open" + suffix)
        open_checker.restype = ctypes.c_void_p
        error = ctypes.c_int(0)
        self._checker = open_checker(ctypes.byref(error))
        if error.value > 0:
            raise RuntimeError(f"uspoof_open failed: {error.value}")
        self._skeleton = getattr(i18n, "uspoof_getSkeletonUTF8" + suffix)
        self._skeleton.argtypes = [
            ctypes.c_void_p,
            ctypes.c_uint32,
            ctypes.c_char_p,
            ctypes.c_int32,
            ctypes.c_char_p,
            ctypes.c_int32,
            ctypes.POINTER(ctypes.c_int),
        ]
        self._skeleton.restype = ctypes.c_int32

    @staticmethod
    def _find_version() -> int:
        found = ctypes.util.find_library("icuuc")
        if found is None:
            raise SystemExit("no libicuuc: apt-get install libicu72 (or another version)")
        return int(found.rsplit(".so.", 1)[1].split(".")[0])

    def scripts(self, code_point: int) -> str:
        codes = (ctypes.c_int * 64)()
        error = ctypes.c_int(0)
        count = self.script_extensions(code_point, codes, 64, ctypes.byref(error))
        if error.value > 0:
            raise RuntimeError(f"uscript_getScriptExtensions({code_point:04X}): {error.value}")
        names = sorted(self.short_name(codes[i]).decode() for i in range(count))
        return " ".join(names)

    def skeleton(self, text: str) -> str:
        buffer = ctypes.create_string_buffer(256)
        error = ctypes.c_int(0)
        length = self._skeleton(
            self._checker, 0, text.encode(), -1, buffer, 256, ctypes.byref(error)
        )
        if error.value > 0:
            raise RuntimeError(f"uspoof_getSkeleton({text!r}): {error.value}")
        return buffer.raw[:length].decode()


def _code_points() -> Iterator[int]:
    yield from range(0xD800)
    yield from range(0xE000, 0x110000)


def _ranges(values: dict[int, str]) -> Iterator[tuple[int, int, str]]:
    """Merge consecutive code points with the same value."""
    start = end = -2
    current = ""
    for code_point in sorted(values):
        value = values[code_point]
        if code_point == end + 1 and value == current:
            end = code_point
            continue
        if start >= 0:
            yield start, end, current
        start = end = code_point
        current = value
    if start >= 0:
        yield start, end, current


def _hex(code_points: str) -> str:
    return " ".join(f"{ord(ch):04X}" for ch in code_points)


def main() -> None:
    icu = Icu()
    ignorable: dict[int, str] = {}
    scripts: dict[int, str] = {}
    confusables: list[str] = []
    for code_point in _code_points():
        ch = chr(code_point)
        if icu.has_property(code_point, UCHAR_DEFAULT_IGNORABLE_CODE_POINT):
            ignorable[code_point] = ""
        if icu.char_type(code_point) in _LMN_CATEGORIES or ch in _EXTRA_NAME_CHARACTERS:
            scripts[code_point] = icu.scripts(code_point)
        if unicodedata.normalize("NFD", ch) == ch:
            skeleton = icu.skeleton(ch)
            if skeleton != ch:
                confusables.append(f"{code_point:04X};{_hex(skeleton)}")
    out = sys.stdout
    out.write(
        f"# chatd name tables: Unicode {icu.unicode_version}, from ICU {icu.icu_version}"
        " (Scripts.txt, ScriptExtensions.txt, DerivedCoreProperties.txt, and UTS #39"
        " confusables.txt).\n"
        "# Generated by scripts/unicode_tables.py; do not edit. Unicode data:"
        " Copyright Unicode, Inc., Unicode License v3 (https://www.unicode.org/license.txt).\n"
    )
    out.write(f"@version {icu.unicode_version}\n@ignorable\n")
    for start, end, _ in _ranges(ignorable):
        out.write(f"{start:04X}..{end:04X}\n")
    out.write("@scripts\n")
    for start, end, value in _ranges(scripts):
        out.write(f"{start:04X}..{end:04X};{value}\n")
    out.write("@confusables\n")
    out.write("\n".join(confusables) + "\n")


if __name__ == "__main__":
    main()
