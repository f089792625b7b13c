"""Reading the TOML files users hand us (studies, schemas, networks, policies, configurations)
with one sentence for each way it can go wrong, never a traceback."""

from __future__ import annotations

import tomllib
from pathlib import Path

from .errors import SpecError


def read_toml(path: str | Path, what: str) -> dict:
    """The parsed file; SpecError naming the file and `what` it should be (e.g. "study file")."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: {what} not found.") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: not a valid TOML file ({exc}).") from None
    except RecursionError:
        # tomllib parses nested arrays and tables recursively: a few hundred levels exhaust
        # Python's stack, and no file of ours nests more than a handful.
        raise SpecError(f"{path}: the {what} is nested too deeply (arrays or tables inside each other) to be read.") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: is a folder, not a {what}.") from None
    except OSError as exc:
        raise SpecError(f"{path}: the {what} cannot be read ({exc.strerror}).") from None


def reject_unknown(data: dict, allowed: set[str], where: str, prefix: str = "") -> None:
    """SpecError naming the first field of `data` not in `allowed` (typos must not pass)."""
    unknown = set(data) - allowed
    if unknown:
        raise SpecError(f"{where}: unknown field '{prefix}{sorted(unknown)[0]}' (expected {', '.join(sorted(allowed))}).")
