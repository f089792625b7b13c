"""The report's tables as files a spreadsheet opens: one CSV each (UTF-8, header row, raw
values at full precision) and one workbook with a sheet per table (openpyxl)."""

from __future__ import annotations

import csv
import os
import re
import tempfile
from pathlib import Path

SHEET_NAME_MAX = 31  # Excel's limit
FORBIDDEN = re.compile(r"[\[\]:*?/\\]")


def flat(value):
    """A cell's raw value as one spreadsheet value: an interval [low, high] as `low to high`."""
    if isinstance(value, list):
        return " to ".join("" if v is None else repr(v) if isinstance(v, float) else str(v) for v in value)
    return value


def write_csv(path: Path, table) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(table.header)
        for row in table.rows:
            writer.writerow(["" if cell.value is None else _csv_value(cell) for cell in row])
    return path


def _csv_value(cell):
    value = flat(cell.value)
    return repr(value) if isinstance(value, float) else value


def file_stems(tables) -> list[str]:
    """One plain, unique file name per table: table names come from study names, which must
    never choose where a file goes (`../x`, `/abs`, control characters, 400 letters)."""
    from ..coordinator.outputs import safe_filename

    stems, seen = [], set()
    for table in tables:
        base = safe_filename(table.name)[:80]
        stem, i = base, 1
        while stem.casefold() in seen:
            stem, i = f"{base}~{i}", i + 1
        seen.add(stem.casefold())
        stems.append(stem)
    return stems


def sheet_names(tables) -> list[str]:
    """Unique sheet names of at most 31 characters, without the characters Excel refuses."""
    names, seen = [], set()
    for table in tables:
        base = FORBIDDEN.sub("_", "".join(ch if ch.isprintable() else "_" for ch in table.name))[:SHEET_NAME_MAX]
        name, i = base, 1
        while name.casefold() in seen:
            suffix = f"~{i}"
            name = base[: SHEET_NAME_MAX - len(suffix)] + suffix
            i += 1
        seen.add(name.casefold())
        names.append(name)
    return names


def _sheet_value(value):
    """A value openpyxl accepts: control characters (which a study's name may hold) dropped."""
    from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

    value = flat(value)
    return ILLEGAL_CHARACTERS_RE.sub("", value) if isinstance(value, str) else value


def write_xlsx(path: Path, tables) -> Path:
    from openpyxl import Workbook
    from openpyxl.styles import Font

    book = Workbook()
    book.remove(book.active)
    contents = book.create_sheet("contents")
    contents.append(["sheet", "table"])
    for name, table in zip(sheet_names(tables), tables):
        contents.append([name, _sheet_value(table.title)])
        sheet = book.create_sheet(name)
        sheet.append([_sheet_value(h) for h in table.header])
        for cell in sheet[1]:
            cell.font = Font(bold=True)
        for row in table.rows:
            sheet.append([_sheet_value(cell.value) for cell in row])
        if table.note:
            sheet.append([])
            sheet.append([_sheet_value(table.note)])
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".xlsx", dir=path.parent)
    os.close(fd)
    try:
        book.save(tmp)
        from . import readable_mode

        os.chmod(tmp, readable_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
