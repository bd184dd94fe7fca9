"""Guest images: the built-in ones (built by `make build`) or a file."""

from __future__ import annotations

from pathlib import Path

from .errors import KemariError

IMAGE_DIR = Path(__file__).resolve().parent / "images"


def image_path(image: str) -> Path:
    if "/" not in image:
        path = IMAGE_DIR / f"{image}.bin"
        if not path.is_file():
            raise KemariError(f"built-in image {image!r} is missing ({path}): run `make build`")
        return path
    return Path(image)


def load_image_bytes(image: str) -> bytes:
    path = image_path(image)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KemariError(f"image {path}: {exc.strerror}") from exc
