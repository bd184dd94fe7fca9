"""cffi (API mode) build of kemari_agent._native from native/*.c.

The cdef is generated from the C headers themselves, so the ABI the guest,
the VMM core and the Python backends see is written down exactly once.
`make build` runs this file directly (builds in place); an installed package
gets the same module through setup.py's cffi_modules.
"""

import re
import shutil
from pathlib import Path

from cffi import FFI

NATIVE = Path(__file__).resolve().parent
HEADERS = ["kemari_abi.h", "vmm.h", "codec.h", "frames.h", "fastpath.h", "fastreceive.h"]
SOURCES = ["vmm.c", "codec.c", "page_index.c", "frames.c", "fastpath.c", "fastreceive.c"]


def cdef_from_header(text: str) -> str:
    """Keep declarations and integer #defines.

    Literal values stay literal (array lengths need them); expressions become
    `...` and are filled in by the compiler.
    """
    out = []
    for line in text.splitlines():
        stripped = line.split("/*")[0].strip()
        define = re.match(r"#define\s+([A-Z_][A-Z0-9_]*)\s+(\S+)$", stripped)
        if define:
            name, value = define.groups()
            literal = re.fullmatch(r"(0x[0-9a-fA-F]+|[0-9]+)", value)
            out.append(f"#define {name} {value if literal else '...'}")
        elif not stripped.startswith("#"):
            out.append(line)
    return "\n".join(out)


def builder(native_dir: str) -> FFI:
    ffi = FFI()
    ffi.cdef("\n".join(cdef_from_header((NATIVE / h).read_text()) for h in HEADERS))
    ffi.set_source(
        "kemari_agent._native",
        "\n".join(f'#include "{h}"' for h in HEADERS),
        sources=[f"{native_dir}/{s}" for s in SOURCES],
        include_dirs=[native_dir],
        extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-std=gnu11"],
        libraries=["pthread", "crypto"],     # crypto: OpenSSL, for frames.c
    )
    return ffi


# setuptools wants paths relative to the project root (setup.py's directory).
ffibuilder = builder("native")

if __name__ == "__main__":
    root = NATIVE.parent
    tmp = root / "build" / "cffi"
    built = Path(builder(str(NATIVE)).compile(tmpdir=str(tmp)))
    for old in (root / "kemari_agent").glob("_native*.so"):
        old.unlink()
    shutil.copy2(built, root / "kemari_agent" / built.name)
    print(f"built kemari_agent/{built.name}")
