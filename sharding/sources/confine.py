"""Paths that a label file names, and links met while listing, must stay inside ``--input``.

A label file (AffectNet CSV, RAF-DB list, ...) is data, not configuration: a row ``../../etc/passwd`` or
``/home/me/photo.jpg`` must not pull a file from outside the dataset into shards, and neither may a symlink
in an image folder. Such samples are skipped with a reason (counted in ``report.json``) unless the user
passes ``--allow-outside`` (e.g. a dataset whose image folder is a link to another disk).

Reasons: ``absolute_path`` (a label file names an absolute path), ``outside_input`` (the path, after
``..`` and links, resolves outside ``--input``), ``symlink_loop`` (a folder link already followed).
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

__all__ = ["InputRoot", "ALLOW_HINT"]

ALLOW_HINT = "pass --allow-outside to read it anyway"


class InputRoot:
    """The resolved ``--input`` folder and whether paths may leave it. Picklable (sent to listing workers)."""

    def __init__(self, root: str, allow_outside: bool = False):
        root = root if os.path.isdir(root) else os.path.dirname(os.path.abspath(root))
        self.real = os.path.realpath(root)
        self.allow_outside = bool(allow_outside)
        self._dirs: Dict[str, str] = {}

    def __getstate__(self):
        return {"real": self.real, "allow_outside": self.allow_outside, "_dirs": {}}

    def inside(self, real_path: str) -> bool:
        r = self.real
        return real_path == r or real_path.startswith(r if r.endswith(os.sep) else r + os.sep)

    def _realpath(self, path: str) -> str:
        """``os.path.realpath`` with the folder part cached (one ``lstat`` per file, not one per component)."""
        d, name = os.path.split(os.path.abspath(path))
        rd = self._dirs.get(d)
        if rd is None:
            rd = self._dirs[d] = os.path.realpath(d)
        full = os.path.join(rd, name)
        return os.path.realpath(full) if os.path.islink(full) else full

    def check_named(self, named: str, path: str) -> Optional[Tuple[str, str]]:
        """``(reason, detail)`` when the file ``path``, made from the label-file entry ``named``, may not be
        read; ``None`` when it may."""
        if self.allow_outside:
            return None
        drive = len(named) > 2 and named[1] == ":" and named[2] in "/\\"   # C:\\x on a Windows-made list
        if os.path.isabs(named) or named.startswith(("/", "\\")) or drive:
            return "absolute_path", f"{named!r} is absolute; {ALLOW_HINT}"
        real = self._realpath(path)
        if not self.inside(real):
            return "outside_input", f"{named!r} resolves to {real}, outside {self.real}; {ALLOW_HINT}"
        return None

    def check_link(self, path: str) -> Optional[Tuple[str, str]]:
        """For a symlink met while listing: ``(reason, detail)`` when its target is outside the input."""
        if self.allow_outside:
            return None
        real = os.path.realpath(path)
        if not self.inside(real):
            return "outside_input", f"link to {real}, outside {self.real}; {ALLOW_HINT}"
        return None
