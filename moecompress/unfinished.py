"""The marker of an unfinished output folder, shared by the writers (`io.output`) and every reader.

`io.output.atomic_output_dir` builds each output in a hidden temporary sibling that holds
`MOECOMPRESS_INCOMPLETE` from its creation until just before it is renamed into place. A run
killed outright leaves that folder behind with the marker in it; `refuse_unfinished` turns an
attempt to open it as a checkpoint (or as statistics) into a one-line error.
"""

from __future__ import annotations

from pathlib import Path

from moecompress.errors import MoecompressError

INCOMPLETE_MARKER = "MOECOMPRESS_INCOMPLETE"


def refuse_unfinished(folder: str | Path) -> None:
    """A one-line error when `folder` is the temporary folder of a run that was killed before it finished."""
    if (Path(folder) / INCOMPLETE_MARKER).exists():
        raise MoecompressError(f"{str(folder)!r} is an unfinished moecompress output (its run was killed before it "
                               "finished); delete it and run the command again")
