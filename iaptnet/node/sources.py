"""Reading a node's table from where the Trust keeps it: a CSV or Parquet file, or a database.

This module only gets the rows into a DataFrame with trimmed column names and a version digest;
what the values mean is `validate`'s job. CSV is read as text throughout so that codes such as
"01" survive exactly as written. Errors name the source and what was expected, never a value.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..protocol.errors import DataError

#: Cell texts that mean "no value". The CSV reader matches them exactly; validation matches them
#: again after trimming, for every source.
NA_TOKENS = ("", "NA", "NaN", "null", "NULL")

CSV_SUFFIXES = (".csv", ".csv.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")

_INDEX_HEADER = re.compile(r"(Unnamed: \d+)?")
_PARQUET_MAGIC = b"PAR1"


@dataclass(frozen=True)
class Table:
    """A raw table as read: CSV columns are text with missing as NA; other sources keep their
    native types (validation converts both)."""

    frame: pd.DataFrame
    source: str  # how to name the source to a person (a path, or a URL without its password)
    version: str  # sha256 hex of the file bytes, or of the query result for a database


def is_sql_url(source: str | Path) -> bool:
    """True for an SQLAlchemy URL such as `postgresql+psycopg://host/db` or `sqlite:///x.db`."""
    return isinstance(source, str) and "://" in source


def read_table(source: str | Path, *, table: str | None = None, query: str | None = None) -> Table:
    """Read a table from a file path (by its suffix) or an SQLAlchemy URL (with table or query)."""
    if is_sql_url(source):
        return read_sql(str(source), table=table, query=query)
    if table is not None or query is not None:
        raise DataError(f"{source}: 'table' and 'query' apply only to a database URL, not a file.")
    path = Path(source)
    name = path.name.lower()
    if name.endswith(CSV_SUFFIXES):
        return read_csv(path)
    if name.endswith(PARQUET_SUFFIXES):
        return read_parquet(path)
    raise DataError(
        f"{path}: unknown data format; expected a file ending in .csv, .csv.gz, .parquet or .pq, or a database URL."
    )


def read_csv(path: Path) -> Table:
    """Every column as text: no type guessing, so identifiers and codes are never altered.

    Parser messages are not passed on: pyarrow's quote the offending line.
    """
    version = _file_digest(path)
    head = _head(path)
    if head.startswith(_PARQUET_MAGIC):
        raise DataError(f"{path}: is a Parquet file, not CSV text; give it a .parquet name.")
    if b"\x00" in head:
        raise DataError(f"{path}: contains NUL bytes (binary data or UTF-16 text); expected CSV text saved as UTF-8.")
    options = dict(dtype=str, keep_default_na=False, na_values=list(NA_TOKENS), encoding="utf-8-sig")
    try:
        header = pd.read_csv(path, header=None, nrows=1, **options)
        frame = pd.read_csv(path, engine="pyarrow", **options)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; expected a CSV file saved as UTF-8.") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty; expected a CSV file with a header row.") from None
    except pd.errors.ParserError:
        raise DataError(f"{path}: {_csv_structure_problem(path, options)}.") from None
    except (OSError, EOFError):
        raise DataError(f"{path}: the compressed data is damaged or truncated.") from None
    _check_unique(path, ["" if pd.isna(n) else str(n) for n in header.iloc[0].tolist()])
    return Table(_tidy_columns(frame), str(path), version)


def read_parquet(path: Path) -> Table:
    """Parquet keeps its stored types; `validate` converts them like CSV text."""
    version = _file_digest(path)
    if not _head(path, 4).startswith(_PARQUET_MAGIC):
        raise DataError(
            f"{path}: not a Parquet file (no Parquet signature); expected Parquet, or name a CSV file .csv."
        )
    try:
        frame = pd.read_parquet(path)
    except (ValueError, OSError, TypeError):  # pyarrow.ArrowInvalid is a ValueError
        raise DataError(f"{path}: the Parquet file is damaged or uses types pandas cannot read.") from None
    frame = frame.reset_index(drop=True)  # a stored pandas index is not a column of the table
    _check_unique(path, [str(c) for c in frame.columns])
    return Table(_tidy_columns(frame), str(path), version)


def read_sql(url: str, *, table: str | None = None, query: str | None = None) -> Table:
    """A database table or query through SQLAlchemy; the version digests the rows returned.

    Driver messages are not repeated in errors: they can quote a value (e.g. a failed cast).
    """
    import sqlalchemy as sa

    try:
        shown = sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        raise DataError("data: not a valid database URL; expected e.g. postgresql+psycopg://host/db.") from None
    if (table is None) == (query is None):
        raise DataError(f"{shown}: give exactly one of 'table' (a table name) or 'query' (a SELECT).")
    what = f"table '{table}'" if table is not None else "the query"
    try:
        engine = sa.create_engine(url)
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError) as exc:
        raise DataError(
            f"{shown}: cannot use this database URL ({type(exc).__name__}); "
            "check the dialect and that its driver is installed."
        ) from None
    try:
        with engine.connect() as conn:
            if table is not None:
                frame = pd.read_sql_table(table, conn)
            else:
                frame = pd.read_sql_query(sa.text(query), conn)
    except ValueError:  # pandas: table not found
        raise DataError(f"{shown}: {what} was not found in the database.") from None
    except (sa.exc.SQLAlchemyError, pd.errors.DatabaseError) as exc:  # pandas wraps a failed query
        raise DataError(f"{shown}: could not read {what} ({type(exc).__name__}).") from None
    finally:
        engine.dispose()
    _check_unique(shown, [str(c) for c in frame.columns])
    frame = _tidy_columns(frame)
    digest = hashlib.sha256(frame.to_csv(index=False).encode()).hexdigest()
    return Table(frame, shown, digest)


def _tidy_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """Trim header white space and drop leading unnamed index columns written by tools."""
    frame = frame.rename(columns=lambda c: str(c).strip())
    lead = 0
    for name in frame.columns:
        if not _INDEX_HEADER.fullmatch(name):
            break
        lead += 1
    return frame.iloc[:, lead:]


def _check_unique(source, names: list[str]) -> None:
    seen: set[str] = set()
    for name in (n.strip() for n in names):
        if name and name in seen:
            raise DataError(f"{source}: column '{name}' appears twice in the header; expected each column name once.")
        seen.add(name)


def _file_digest(path: Path) -> str:
    try:
        with path.open("rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except FileNotFoundError:
        raise DataError(f"{path}: data file not found.") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory; expected a data file.") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror}).") from None


def _head(path: Path, size: int = 65536) -> bytes:
    """The first bytes of the content, decompressed for .gz, to recognise the format."""
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                return fh.read(size)
        with path.open("rb") as fh:
            return fh.read(size)
    except (gzip.BadGzipFile, EOFError, zlib.error):
        raise DataError(f"{path}: not gzip-compressed data; expected a .gz file made by gzip.") from None


def _csv_structure_problem(path: Path, options: dict) -> str:
    """Where a CSV's structure breaks, from the C parser, whose messages hold no cell text."""
    try:
        pd.read_csv(path, engine="c", **options)
    except pd.errors.ParserError as exc:
        found = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(exc))
        if found:
            want, line, saw = found.groups()
            return f"line {line} has {saw} fields but the header has {want}; expected one field per column"
    except (ValueError, OSError):
        pass
    return "not a well-formed CSV file; check its quoting and the number of fields on each line"
