"""Access to the C core (kemari_agent._native, built by `make build`)."""

from .errors import KemariError

try:
    from ._native import ffi, lib
except ImportError as exc:  # pragma: no cover - depends on the build
    raise KemariError(
        "Kemari's native module is not built: run `make build` in the source tree"
    ) from exc


def last_error() -> str:
    """The C core's message for its last failure."""
    return ffi.string(lib.kvmm_error()).decode(errors="replace")


__all__ = ["ffi", "lib", "last_error"]
