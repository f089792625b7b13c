"""Reading the TOML files users hand us (studies, schemas, networks, policies, configurations)
with one sentence for each way it can go wrong, never a traceback."""

from __future__ import annotations

import tomllib
from pathlib import Path

from .errors import SpecError

#: No study, schema, policy or configuration file of ours comes near this.
MAX_TOML_BYTES = 10_000_000


def read_toml(path: str | Path, what: str) -> dict:
    """The parsed file; SpecError naming the file and `what` it should be (e.g. "study file")."""
    path = Path(path)
    if "\x00" in str(path):  # the OS refuses it with a ValueError, not an OSError
        raise SpecError(f"{str(path)!r}: the name of a {what} cannot hold a NUL character.")
    try:
        if path.exists() and not path.is_dir() and not path.is_file():
            # /dev/zero would be read forever, a named pipe blocks on open.
            raise SpecError(f"{path}: the {what} is not a regular file.")
        if path.is_file() and path.stat().st_size > MAX_TOML_BYTES:
            raise SpecError(f"{path}: the {what} is larger than {MAX_TOML_BYTES // 1_000_000} MB.")
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: {what} not found.") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: not a valid TOML file ({exc}).") from None
    except RecursionError:
        # tomllib parses nested arrays and tables recursively: a few hundred levels exhaust
        # Python's stack, and no file of ours nests more than a handful.
        raise SpecError(
            f"{path}: the {what} is nested too deeply (arrays or tables inside each other) to be read."
        ) from None
    except IsADirectoryError:
        raise SpecError(f"{path}: is a folder, not a {what}.") from None
    except OSError as exc:
        raise SpecError(f"{path}: the {what} cannot be read ({exc.strerror}).") from None


def reject_unknown(data: dict, allowed: set[str], where: str, prefix: str = "") -> None:
    """SpecError naming the first field of `data` not in `allowed` (typos must not pass)."""
    unknown = set(data) - allowed
    if unknown:
        raise SpecError(
            f"{where}: unknown field '{prefix}{sorted(unknown)[0]}' (expected {', '.join(sorted(allowed))})."
        )
