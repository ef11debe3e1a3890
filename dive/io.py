"""Writing files so that a reader never sees a half-written one."""
import os
from pathlib import Path
from typing import Callable


def atomic_write(path, write: Callable[[str], None]) -> None:
    """Calls `write(tmp)` to write the file at the temporary path `tmp` beside `path`, then
    renames it onto `path`: a kill or an error mid-write leaves `path` as it was (and an error
    removes the temporary file). The name holds the process id, so ranks writing beside one
    another never share a temporary file."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(os.fspath(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
