"""Progress bars for long commands (`fm corpus build`, `fm eval`): tqdm on stderr, shown only where
someone watches. Log lines stay as they are — they are what CI and redirected runs see.

`enabled`: True / False force the bar on / off (`--quiet` passes False); None (the default) shows it
when stderr is a terminal, or as the environment variable FM_PROGRESS says (1 on, 0 off).
"""
from __future__ import annotations

import contextlib
import os
import sys

ENV = "FM_PROGRESS"


def progress_enabled(enabled: bool | None = None, file=None) -> bool:
    """The decision alone: explicit argument, then FM_PROGRESS, then "is `file` (stderr) a TTY"."""
    if enabled is not None:
        return bool(enabled)
    env = os.environ.get(ENV, "").strip().lower()
    if env:
        return env not in ("0", "false", "no", "off")
    file = file if file is not None else sys.stderr
    return bool(getattr(file, "isatty", lambda: False)())


@contextlib.contextmanager
def progress_bar(total: int, desc: str, unit: str, enabled: bool | None = None, file=None):
    """A tqdm bar (disabled = a no-op one); while it is shown, log records go through tqdm.write so
    that they do not tear the bar."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    file = file if file is not None else sys.stderr
    on = progress_enabled(enabled, file)
    bar = tqdm(total=total, desc=desc, unit=unit, file=file, disable=not on, dynamic_ncols=True,
               mininterval=0.5, smoothing=0.1)
    try:
        if on:  # the root logger holds the console handler (fm.cli's basicConfig); fm's loggers propagate to it
            with logging_redirect_tqdm():
                yield bar
        else:
            yield bar
    finally:
        bar.close()


__all__ = ["ENV", "progress_bar", "progress_enabled"]
