# Shared settings for the Xen lab scripts; sourced, not run.
# Everything large lives under $KEMARI_XEN_CACHE, never in the repository.

KEMARI_XEN_CACHE=${KEMARI_XEN_CACHE:-/var/cache/kemari-test/xen}
LAB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
XEN_TESTS_DIR=$(dirname "$LAB_DIR")
REPO_DIR=$(cd "$XEN_TESTS_DIR/../.." && pwd)
PATCH_DIR=${KEMARI_XEN_PATCHES:-$REPO_DIR/xen-patches}
# Debian bookworm main ships this exact source; the patches are made against it.
XEN_SRC_VERSION=4.17.5+72-g01140da4e8-1

log() { echo "[$(basename "$0") $(date +%T)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# The first mirror of the machine's own apt configuration (never hard-coded).
apt_mirror() {
    local f=/etc/apt/sources.list.d/debian.sources m=""
    [ -r "$f" ] && m=$(awk '/^URIs:/{print $2; exit}' "$f")
    [ -z "$m" ] && [ -r /etc/apt/sources.list ] &&
        m=$(awk '$1=="deb"{for(i=2;i<=NF;i++) if($i ~ /^[a-z]+:\/\//){print $i; exit}}' /etc/apt/sources.list)
    [ -n "$m" ] || die "no apt mirror found in the machine's apt configuration"
    echo "$m"
}

# Install the Debian packages providing the given commands/files if missing.
# Arguments are "test-path:package" pairs.
ensure_pkgs() {
    local need=() pair
    for pair in "$@"; do
        [ -e "${pair%%:*}" ] || need+=("${pair##*:}")
    done
    [ ${#need[@]} -eq 0 ] && return 0
    log "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -o DPkg::Lock::Timeout=600 "${need[@]}" >/dev/null
}

# The Debian 6.1 kernel ABI the lab boots (same for dom0 and domU).
kernel_version() {
    local kv
    kv=$(_kernel_dep)
    [ -n "$kv" ] || { apt-get update -qq >&2; kv=$(_kernel_dep); }
    echo "$kv"
}
_kernel_dep() {
    apt-cache depends linux-image-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/{sub("linux-image-", "", $2); print $2; exit}'
}

# Private apt state with a deb-src entry for the machine's mirror, bookworm main only.
apt_private() {
    local d=$KEMARI_XEN_CACHE/apt
    if [ ! -f "$d/sources/kemari.sources" ] || [ ! -d "$d/lists" ]; then
        mkdir -p "$d/sources" "$d/lists/partial" "$d/cache/archives/partial"
        printf 'Types: deb deb-src\nURIs: %s\nSuites: bookworm\nComponents: main\nSigned-By: %s\n' \
            "$(apt_mirror)" /usr/share/keyrings/debian-archive-keyring.gpg > "$d/sources/kemari.sources"
    fi
    APT_OPTS=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$d/sources"
              -o "Dir::State::Lists=$d/lists" -o "Dir::Cache=$d/cache")
    ls "$d"/lists/*Sources* >/dev/null 2>&1 || apt-get "${APT_OPTS[@]}" update -qq
}

# Hash of the patch series (names and contents, in order): the Xen build key.
series_hash() {
    (cd "$PATCH_DIR" && cat series && grep -v '^#' series | grep . | xargs cat) |
        cat - "$LAB_DIR/build-xen.sh" | sha256sum | cut -c1-16
}
