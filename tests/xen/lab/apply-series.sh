#!/bin/bash
# Apply the quilt-style series in PATCH_DIR to the source tree SRC, strictly:
# any fuzz, offset or rejected hunk fails (the patches are made against the
# exact Debian source, so either would mean the series went stale).
# Usage: apply-series.sh SRC [PATCH_DIR]
set -euo pipefail
. "$(dirname "$0")/common.sh"
ensure_pkgs /usr/bin/patch:patch

SRC=${1:?usage: apply-series.sh SRC [PATCH_DIR]}
PATCH_DIR=${2:-$PATCH_DIR}
[ -f "$PATCH_DIR/series" ] || die "no series file in $PATCH_DIR"
grep -v '^#' "$PATCH_DIR/series" | grep . | while read -r p; do
    out=$(patch -d "$SRC" -p1 --fuzz=0 --forward --no-backup-if-mismatch -r - \
          < "$PATCH_DIR/$p" 2>&1) || { echo "$out" >&2; die "$p does not apply"; }
    if grep -Eiq 'fuzz|offset|hunk.*(failed|ignored)|reject' <<<"$out"; then
        echo "$out" >&2
        die "$p applies only with fuzz or offsets"
    fi
    echo "APPLIED $p"
done
