#!/usr/bin/env bash
# Mount the master's NFS export on a worker (Debian/Ubuntu).
#
#   sudo ./mount_worker_nfs.sh --persist    # 192.168.128.236:/export/mimmo on /mnt/mimmo, also at boot
#   sudo ./mount_worker_nfs.sh --dry-run    # show what would happen, change nothing
#   ./mount_worker_nfs.sh --help
#
# Idempotent: a second run changes nothing. Environment twins of the flags:
# MASTER_IP, EXPORT_DIR, MOUNT_DIR, MOUNT_OPTIONS; ROOT (default /) prefixes every
# path the script reads or writes (for tests); SKIP_SYSTEM=1 skips apt, mount and
# systemctl but still edits the files under ROOT.
set -euo pipefail

readonly PACKAGE="nfs-common"

MASTER_IP="${MASTER_IP:-192.168.128.236}"
EXPORT_DIR="${EXPORT_DIR:-/export/mimmo}"
MOUNT_DIR="${MOUNT_DIR:-/mnt/mimmo}"
# hard: I/O waits for the server to come back instead of failing (no half-written chips);
# timeo=600 (60 s) and retrans=3 are the NFS-over-TCP defaults, spelled out; NFSv4.2.
# nosuid,nodev: every worker can write to the share, so a set-uid program or a device node
# put there must not work on the machines that mount it (always added, see validate).
MOUNT_OPTIONS="${MOUNT_OPTIONS:-hard,timeo=600,retrans=3,nfsvers=4.2,nosuid,nodev}"
ROOT="${ROOT:-/}"
SKIP_SYSTEM="${SKIP_SYSTEM:-0}"
DRY_RUN=0
PERSIST=0
PROG="$(basename "$0")"

usage() {
    cat <<EOF
Usage: sudo $PROG [options]

Mount the master's NFS export on this worker (Debian/Ubuntu).

Options:
  --master-ip IP      the master's IPv4 address (env MASTER_IP; default 192.168.128.236)
  --export-dir DIR    folder the master exports (env EXPORT_DIR; default /export/mimmo)
  --mount-dir DIR     where to mount it here, created if missing (env MOUNT_DIR; default /mnt/mimmo)
  --persist           also mount it at boot: a line in /etc/fstab (with _netdev),
                      replacing any line for the same mount point
  --dry-run           print the commands and file changes, change nothing
  -h, --help          show this help

Mount options (env MOUNT_OPTIONS): $MOUNT_OPTIONS
/etc/fstab line written by --persist:
  IP:EXPORT_DIR MOUNT_DIR nfs $MOUNT_OPTIONS,_netdev 0 0

Environment: ROOT=/path prefixes every path read or written (default /);
SKIP_SYSTEM=1 skips apt, mount and systemctl, editing only files under ROOT.

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

parse_args() {
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --master-ip) need_value "$@"; MASTER_IP="$2"; shift 2 ;;
            --master-ip=*) MASTER_IP="${1#*=}"; shift ;;
            --export-dir) need_value "$@"; EXPORT_DIR="$2"; shift 2 ;;
            --export-dir=*) EXPORT_DIR="${1#*=}"; shift ;;
            --mount-dir) need_value "$@"; MOUNT_DIR="$2"; shift 2 ;;
            --mount-dir=*) MOUNT_DIR="${1#*=}"; shift ;;
            --persist) PERSIST=1; shift ;;
            --dry-run) DRY_RUN=1; shift ;;
            -h|--help) usage; exit 0 ;;
            *) usage_error "unknown option '$1'" ;;
        esac
    done
}

validate() {
    is_ipv4 "$MASTER_IP" || usage_error "--master-ip must be an IPv4 address such as 192.168.128.236, got '$MASTER_IP'"
    EXPORT_DIR="$(normalise_dir "$EXPORT_DIR" "--export-dir")"
    MOUNT_DIR="$(normalise_dir "$MOUNT_DIR" "--mount-dir")"
    [[ $MOUNT_OPTIONS =~ ^[A-Za-z0-9_.=,-]+$ ]] || usage_error "MOUNT_OPTIONS must be a comma-separated option list, got '$MOUNT_OPTIONS'"
    local opt
    for opt in suid dev defaults; do
        [[ ,$MOUNT_OPTIONS, != *,$opt,* ]] || usage_error "MOUNT_OPTIONS must not contain '$opt' (it allows set-uid programs or device nodes on the share), got '$MOUNT_OPTIONS'"
    done
    for opt in nosuid nodev; do
        if [[ ,$MOUNT_OPTIONS, != *,$opt,* ]]; then
            MOUNT_OPTIONS+=",$opt"
            info "note: added $opt to MOUNT_OPTIONS (the share is writable by every worker)"
        fi
    done
    [[ $SKIP_SYSTEM == 0 || $SKIP_SYSTEM == 1 ]] || usage_error "SKIP_SYSTEM must be 0 or 1, got '$SKIP_SYSTEM'"
    [[ $ROOT == /* ]] || usage_error "ROOT must be an absolute path, got '$ROOT'"
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

make_mount_dir() {
    local dir
    dir="$(rootpath "$MOUNT_DIR")"
    if [[ -d $dir ]]; then
        info "ok: $dir exists"
    else
        run mkdir -p "$dir"
    fi
}

# Mount SOURCE on MOUNT_DIR unless it already is; fail if something else is mounted there.
mount_share() {
    local source="$1" dir current
    dir="$(rootpath "$MOUNT_DIR")"
    if [[ $SKIP_SYSTEM == 1 && $DRY_RUN -eq 0 ]]; then
        info "skipped (SKIP_SYSTEM=1): mount $source on $dir"
        return 0
    fi
    if [[ -d $dir ]] && mountpoint -q "$dir"; then
        current="$(findmnt -n -o SOURCE --mountpoint "$dir" 2>/dev/null || true)"
        if [[ $current == "$source" ]]; then
            info "unchanged: $source is already mounted on $dir"
            return 0
        fi
        die "$dir already has '${current:-something}' mounted, not $source: unmount it first (umount $dir)"
    fi
    if ! run mount -t nfs -o "$MOUNT_OPTIONS" "$source" "$dir"; then
        die "mounting $source failed: check that the master ran setup_master_nfs.sh, that this machine is in its --subnet, and that TCP 2049 on $MASTER_IP is reachable (nc -zv $MASTER_IP 2049)"
    fi
}

verify_mount() {
    local dir
    dir="$(rootpath "$MOUNT_DIR")"
    if [[ $DRY_RUN -eq 1 || $SKIP_SYSTEM == 1 ]]; then
        run_system mountpoint "$dir"
        return 0
    fi
    mountpoint "$dir" || die "$dir is not a mount point after mounting"
    findmnt --mountpoint "$dir" || true
}

main() {
    parse_args "$@"
    validate
    check_os
    check_root "$@"

    local source fstab fstab_line boot
    source="$MASTER_IP:$EXPORT_DIR"
    fstab="$(rootpath /etc/fstab)"
    fstab_line="$source $MOUNT_DIR nfs $MOUNT_OPTIONS,_netdev 0 0"
    if [[ $DRY_RUN -eq 1 ]]; then info "dry run: nothing will be changed"; fi

    install_package
    make_mount_dir
    FILE_CHANGED=0
    boot="no (rerun with --persist to add it to /etc/fstab)"
    if [[ $PERSIST -eq 1 ]]; then
        edit_table "$fstab" 2 "$MOUNT_DIR" "$fstab_line"
        boot="yes, $fstab"
        if [[ $FILE_CHANGED -eq 1 ]]; then
            # systemd turns fstab into mount units: make it read the new line.
            if [[ $DRY_RUN -eq 1 || $SKIP_SYSTEM == 1 ]] || command -v systemctl >/dev/null 2>&1; then
                run_system systemctl daemon-reload
            fi
        else
            boot+=" (unchanged)"
        fi
    fi
    mount_share "$source"
    verify_mount

    cat <<EOF

Summary$([[ $DRY_RUN -eq 1 ]] && printf ' (dry run, nothing changed)'):
  mount:     $source on $MOUNT_DIR (nfs, $MOUNT_OPTIONS)
  at boot:   $boot
Next, start a worker against the master's broker, as the user that owns the export:
  python worker.py 1 --bootstrap-servers $MASTER_IP:9092 --output-dir $MOUNT_DIR
Files are written with that user's uid (root is squashed to nobody on the master).
EOF
}

main "$@"
