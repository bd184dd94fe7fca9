"""The settings both nodes of a pair must agree on, as sent in the HELLO
(stream version 2): a mismatch is refused at connect time, naming the field,
instead of replicating into a VM that cannot run the primary's guest."""

from __future__ import annotations

import hashlib

from ..config import VmConfig
from ..errors import KemariError
from ..images import image_path


def pair_settings(config: VmConfig) -> dict[str, str]:
    """Text key -> text value; memory size travels in the HELLO itself."""
    disk = config.disk
    return {"image": _image_identity(config.image),
            "disk_mode": disk.mode if disk is not None else "none",
            "disk_size_mib": str(disk.size_mib) if disk is not None else "0"}


def _image_identity(image: str) -> str:
    """By content, not path: the two nodes may keep the image in different places."""
    try:
        data = image_path(image).read_bytes()
    except (OSError, KemariError):
        return f"unreadable:{image}"
    return "sha256:" + hashlib.sha256(data).hexdigest()[:16]
