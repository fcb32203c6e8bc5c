#!/usr/bin/env bash
# Export the shared pipeline folder over NFS from the master (Debian/Ubuntu).
#
#   sudo ./setup_master_nfs.sh                      # /export/mimmo to 192.168.128.0/24
#   sudo ./setup_master_nfs.sh --dry-run            # show what would happen, change nothing
#   ./setup_master_nfs.sh --help
#
# Idempotent: a second run changes nothing. Environment twins of the flags:
# EXPORT_DIR, SUBNET, OWNER; ROOT (default /) prefixes every path the script
# reads or writes (for tests); SKIP_SYSTEM=1 skips apt, chown, exportfs and
# systemctl but still edits the files under ROOT.
set -euo pipefail

# root_squash: a worker's root writes as nobody. nosuid/nodev are not export options on Linux
# (exports(5) has none): mount_worker_nfs.sh mounts with them on every worker.
readonly EXPORT_OPTIONS_SAFE="rw,sync,root_squash,no_subtree_check"
readonly EXPORT_OPTIONS_NO_ROOT_SQUASH="rw,sync,no_root_squash,no_subtree_check"
readonly PACKAGE="nfs-kernel-server"

EXPORT_DIR="${EXPORT_DIR:-/export/mimmo}"
SUBNET="${SUBNET:-192.168.128.0/24}"
OWNER="${OWNER:-${SUDO_USER:-}}"
[[ $OWNER != root ]] || OWNER=""
OWNER_EXPLICIT=0
ROOT="${ROOT:-/}"
SKIP_SYSTEM="${SKIP_SYSTEM:-0}"
DRY_RUN=0
ANY_HOST=0
NO_ROOT_SQUASH=0
PROG="$(basename "$0")"

usage() {
    cat <<EOF
Usage: sudo $PROG [options]

Export a folder over NFS to the workers' subnet (Debian/Ubuntu master).

Options:
  --export-dir DIR            folder to export, created if missing (env EXPORT_DIR; default /export/mimmo)
  --subnet CIDR               clients allowed to mount it (env SUBNET; default 192.168.128.0/24)
  --owner USER[:GROUP]        chown the folder to this owner (env OWNER; default: the sudo user,
                              only when the folder is created). Workers write as their own uid.
  --any-host                  INSECURE: export to every host (*) instead of --subnet
  --insecure-no-root-squash   INSECURE: let root on the workers act as root on the export
  --dry-run                   print the commands and file changes, change nothing
  -h, --help                  show this help

Export line written to /etc/exports (replacing any line for the same folder):
  DIR SUBNET($EXPORT_OPTIONS_SAFE)

Environment: ROOT=/path prefixes every path read or written (default /);
SKIP_SYSTEM=1 skips apt, chown, exportfs and systemctl, editing only files under ROOT.

Exit status: 0 done, 1 failure, 2 bad usage or invalid input.
EOF
}

die() { printf 'ERROR: %s\n' "$1" >&2; exit "${2:-1}"; }
usage_error() { printf 'ERROR: %s\nTry: %s --help\n' "$1" "$PROG" >&2; exit 2; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
info() { printf '%s\n' "$*"; }

# A command line as a shell would need it typed: plain words as they are, others quoted.
show_cmd() {
    local arg out=""
    for arg in "$@"; do
        if [[ $arg =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then out+=" $arg"; else out+=" $(printf '%q' "$arg")"; fi
    done
    printf '%s\n' "${out# }"
}

# Echo a command with a "+ " prefix, then run it unless --dry-run.
run() {
    printf '+ %s' "$(show_cmd "$@")"$'\n'
    if [[ $DRY_RUN -eq 1 ]]; then return 0; fi
    "$@"
}

# Like run, for commands that change the system outside ROOT (skipped with SKIP_SYSTEM=1).
run_system() {
    if [[ $DRY_RUN -eq 0 && $SKIP_SYSTEM == 1 ]]; then
        printf 'skipped (SKIP_SYSTEM=1): %s' "$(show_cmd "$@")"$'\n'
        return 0
    fi
    run "$@"
}

# A path on the target system, under ROOT.
rootpath() {
    if [[ $ROOT == / ]]; then printf '%s' "$1"; else printf '%s%s' "${ROOT%/}" "$1"; fi
}

is_ipv4() {
    local ip="$1" octet
    local -a octets
    [[ $ip =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]] || return 1
    IFS=. read -r -a octets <<<"$ip"
    for octet in "${octets[@]}"; do
        (( 10#$octet <= 255 )) || return 1
    done
}

is_cidr() {
    local cidr="$1" address prefix
    [[ $cidr =~ ^([0-9.]+)/([0-9]{1,2})$ ]] || return 1
    address="${BASH_REMATCH[1]}" prefix="${BASH_REMATCH[2]}"
    is_ipv4 "$address" && (( 10#$prefix <= 32 ))
}

ip_to_int() {
    local a b c d
    IFS=. read -r a b c d <<<"$1"
    printf '%d' $(( (10#$a << 24) | (10#$b << 16) | (10#$c << 8) | 10#$d ))
}

# This machine's address inside SUBNET (the one workers reach), or its first address.
guess_master_ip() {
    local addresses address network prefix mask
    addresses="$(hostname -I 2>/dev/null)" || return 0
    if [[ $ANY_HOST -eq 0 ]]; then
        network="$(ip_to_int "${SUBNET%/*}")"
        prefix="${SUBNET#*/}"
        mask=$(( prefix == 0 ? 0 : (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF ))
        for address in $addresses; do
            if is_ipv4 "$address" && (( ($(ip_to_int "$address") & mask) == (network & mask) )); then
                printf '%s' "$address"
                return 0
            fi
        done
    fi
    for address in $addresses; do
        if is_ipv4 "$address"; then printf '%s' "$address"; return 0; fi
    done
}

# An absolute path without spaces or odd characters, other than "/"; prints it without a trailing slash.
normalise_dir() {
    local dir="$1" what="$2"
    [[ $dir == /* ]] || usage_error "$what must be an absolute path, got '$dir'"
    [[ $dir =~ ^[A-Za-z0-9._/+-]+$ ]] || usage_error "$what may only contain letters, digits and . _ / + -, got '$dir'"
    dir="${dir%/}"
    [[ -n $dir ]] || usage_error "$what must not be /"
    [[ /$dir/ != */../* && /$dir/ != */./* ]] || usage_error "$what must not contain . or .. components, got '$1'"
    printf '%s' "$dir"
}

need_value() { [[ $# -ge 2 && -n $2 ]] || usage_error "$1 needs a value"; }

parse_args() {
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --export-dir) need_value "$@"; EXPORT_DIR="$2"; shift 2 ;;
            --export-dir=*) EXPORT_DIR="${1#*=}"; shift ;;
            --subnet) need_value "$@"; SUBNET="$2"; shift 2 ;;
            --subnet=*) SUBNET="${1#*=}"; shift ;;
            --owner) need_value "$@"; OWNER="$2"; OWNER_EXPLICIT=1; shift 2 ;;
            --owner=*) OWNER="${1#*=}"; OWNER_EXPLICIT=1; shift ;;
            --any-host) ANY_HOST=1; shift ;;
            --insecure-no-root-squash) NO_ROOT_SQUASH=1; shift ;;
            --dry-run) DRY_RUN=1; shift ;;
            -h|--help) usage; exit 0 ;;
            *) usage_error "unknown option '$1'" ;;
        esac
    done
}

validate() {
    EXPORT_DIR="$(normalise_dir "$EXPORT_DIR" "--export-dir")"
    if [[ $ANY_HOST -eq 0 ]]; then
        is_cidr "$SUBNET" || usage_error "--subnet must be an IPv4 CIDR such as 192.168.128.0/24, got '$SUBNET'"
    fi
    if [[ -n $OWNER && ! $OWNER =~ ^[A-Za-z0-9._-]+(:[A-Za-z0-9._-]+)?$ ]]; then
        usage_error "--owner must look like USER or USER:GROUP, got '$OWNER'"
    fi
    [[ $SKIP_SYSTEM == 0 || $SKIP_SYSTEM == 1 ]] || usage_error "SKIP_SYSTEM must be 0 or 1, got '$SKIP_SYSTEM'"
    [[ $ROOT == /* ]] || usage_error "ROOT must be an absolute path, got '$ROOT'"
}

# Debian/Ubuntu (or a derivative) is required; --dry-run and SKIP_SYSTEM=1 only warn.
check_os() {
    local os_release ids
    os_release="$(rootpath /etc/os-release)"
    ids=""
    if [[ -r $os_release ]]; then
        ids="$(sed -n -E 's/^(ID|ID_LIKE)=//p' "$os_release" | tr -d "\"'" | tr '\n' ' ')"
    fi
    case " $ids " in
        *" debian "*|*" ubuntu "*) return 0 ;;
    esac
    local msg="this script supports Debian/Ubuntu (apt); $os_release says ID/ID_LIKE='${ids% }'"
    [[ -r $os_release ]] || msg="this script supports Debian/Ubuntu (apt); cannot read $os_release"
    if [[ $DRY_RUN -eq 1 || $SKIP_SYSTEM == 1 ]]; then warn "$msg"; else die "$msg"; fi
}

check_root() {
    if [[ $DRY_RUN -eq 1 || $SKIP_SYSTEM == 1 ]]; then return 0; fi
    [[ $(id -u) -eq 0 ]] || die "run as root: sudo $PROG $*"
}

package_installed() {
    command -v dpkg-query >/dev/null 2>&1 &&
        dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

install_package() {
    if [[ $SKIP_SYSTEM == 1 && $DRY_RUN -eq 0 ]]; then
        info "skipped (SKIP_SYSTEM=1): install $PACKAGE"
    elif package_installed "$PACKAGE"; then
        info "ok: $PACKAGE is installed"
    else
        run_system apt-get update
        run_system env DEBIAN_FRONTEND=noninteractive apt-get install -y "$PACKAGE"
    fi
}

# Replace the lines whose field number FIELD equals KEY (comments aside) with LINE,
# at the first one's place, or append LINE; report, and write unless --dry-run.
edit_table() {
    local file="$1" field="$2" key="$3" line="$4" old="" new old_lines tmp backup l
    if [[ -e $file ]]; then
        old="$(cat "$file")"
    fi
    new="$(awk -v field="$field" -v key="$key" -v line="$line" '
        /^[[:space:]]*#/ { print; next }
        $field == key { if (!done) print line; done = 1; next }
        { print }
        END { if (!done) print line }
    ' <<<"$old")"
    # An empty file reads as one empty line: drop it rather than keep a blank first line.
    [[ -n $old ]] || new="$line"
    if [[ -e $file && $new == "$old" ]]; then
        info "unchanged: $file already has: $line"
        return 0
    fi
    old_lines="$(awk -v field="$field" -v key="$key" '!/^[[:space:]]*#/ && $field == key' <<<"$old")"
    if [[ $DRY_RUN -eq 1 ]]; then
        info "would write $file: $line"
    else
        mkdir -p "$(dirname "$file")"
        tmp="$(mktemp "$(dirname "$file")/.$(basename "$file").XXXXXX")"
        printf '%s\n' "$new" >"$tmp"
        if [[ -e $file ]]; then
            chmod --reference="$file" "$tmp"
            chown --reference="$file" "$tmp" 2>/dev/null || true
            backup="$file.bak-$(date +%Y%m%d%H%M%S)"
            cp -p "$file" "$backup"
            info "backup: $backup"
        else
            chmod 0644 "$tmp"
        fi
        mv -f "$tmp" "$file"
        info "wrote $file: $line"
    fi
    if [[ -n $old_lines ]]; then
        while IFS= read -r l; do info "  (replacing: $l)"; done <<<"$old_lines"
    fi
    FILE_CHANGED=1
}

make_export_dir() {
    local dir created=0
    dir="$(rootpath "$EXPORT_DIR")"
    if [[ -d $dir ]]; then
        info "ok: $dir exists"
    else
        run mkdir -p "$dir"
        created=1
    fi
    if [[ -n $OWNER && ( $created -eq 1 || $OWNER_EXPLICIT -eq 1 ) ]]; then
        run_system chown "$OWNER" "$dir"
    fi
}

main() {
    parse_args "$@"
    validate
    check_os
    check_root "$@"

    local clients options export_line exports
    if [[ $ANY_HOST -eq 1 ]]; then
        clients="*"
        warn "--any-host: exporting $EXPORT_DIR to EVERY host that can reach this machine, not only $SUBNET"
    else
        clients="$SUBNET"
    fi
    if [[ $NO_ROOT_SQUASH -eq 1 ]]; then
        options="$EXPORT_OPTIONS_NO_ROOT_SQUASH"
        warn "--insecure-no-root-squash: root on any client can read and write every file of $EXPORT_DIR as root"
    else
        options="$EXPORT_OPTIONS_SAFE"
    fi
    export_line="$EXPORT_DIR $clients($options)"
    exports="$(rootpath /etc/exports)"
    if [[ $DRY_RUN -eq 1 ]]; then info "dry run: nothing will be changed"; fi

    install_package
    make_export_dir
    FILE_CHANGED=0
    edit_table "$exports" 1 "$EXPORT_DIR" "$export_line"

    run_system systemctl enable --now nfs-server
    run_system exportfs -ra
    if [[ $DRY_RUN -eq 0 && $SKIP_SYSTEM == 0 ]]; then
        local listed
        listed="$(exportfs -v)"
        printf '%s\n' "$listed"
        grep -qF -- "$EXPORT_DIR" <<<"$listed" || die "exportfs -v does not list $EXPORT_DIR"
    else
        run_system exportfs -v
    fi

    local ip
    ip="$(guess_master_ip)" || true
    cat <<EOF

Summary$([[ $DRY_RUN -eq 1 ]] && printf ' (dry run, nothing changed)'):
  exported:  $export_line
  in:        $exports$([[ $FILE_CHANGED -eq 0 ]] && printf ' (unchanged)')
Next, on each worker (as root; it mounts with nosuid,nodev):
  ./mount_worker_nfs.sh --master-ip ${ip:-<MASTER_IP>} --export-dir $EXPORT_DIR --persist
Then start the broker here: cp .env.example .env (set MASTER_IP), docker compose up -d
Workers write files as their own uid (root is squashed to nobody): give that uid write
access to $EXPORT_DIR (--owner USER), and allow NFS (TCP 2049) from the workers in any firewall.
EOF
}

main "$@"
