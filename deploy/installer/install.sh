#!/bin/sh
# layotto node installer: puts the layotto runtime on a Kubernetes node and registers it
# with the node's containerd. deploy/installer/daemonset.yaml runs it as an init container
# with the node's root filesystem mounted at $HOST_ROOT; it also runs by hand on a node
# (HOST_ROOT=/).
#
#   install.sh               install or upgrade; running it again changes nothing
#   install.sh --uninstall   remove the runtime table, the wrapper and the files again
#
# What it does (every path below is a node path, under $HOST_ROOT). It first works out the
# new containerd config (step 3), so that a config it cannot edit stops it before anything
# on the node has changed; then, in this order:
#
# 1. Copies the payload, a Python virtual environment holding layotto (the shim and the node
#    host), from $PAYLOAD to /opt/layotto-<version>, and points the symlink /opt/layotto at
#    it. A version directory is never overwritten: a running node host keeps its files
#    mapped, so new bits go to a new directory and the symlink is switched atomically.
#    That switch is the upgrade: each layotto version runs its own node host, so the next
#    container starts in a host of the new version while the old version's host keeps its
#    running containers and exits when the last of them ends (or when `layotto drain`
#    stops them). Older version directories stay (for a roll back: install the old image
#    again, and the symlink points back) until --uninstall. See docs/node-host.md,
#    "Upgrading a node".
#    A virtual environment is not self-contained: its bin/python is a symlink to the
#    interpreter it was built with (/usr/bin/python3.11 for the installer image, built on
#    Debian 12), and its compiled wheels (wasmtime, grpcio, protobuf) need a matching glibc.
#    The node must therefore have that same interpreter: we target Debian 12 nodes with the
#    python3.11 package. The installer checks the interpreter exists before touching anything.
# 2. Installs /usr/local/bin/containerd-shim-layotto-v1, a small wrapper that execs
#    /opt/layotto/bin/containerd-shim-layotto-v1. containerd 1.6.0-1.6.20 (Debian 12 ships
#    1.6.20) and 1.7.0 ignore the CRI runtime_path setting and look the shim up on their
#    PATH, which for the systemd unit includes /usr/local/bin. A plain symlink would not do:
#    the shim finds its Python next to itself (${0%/*}/python3).
# 3. Adds the `layotto` runtime to containerd's config.toml, between "# BEGIN layotto
#    runtime" and "# END layotto runtime" lines, appended at the end of the file: the CRI
#    table for config version 2 (containerd 1.x), or the io.containerd.cri.v1.runtime one for
#    version 3 (containerd 2.x). A missing file is created with version = 2, which both
#    accept. A config that already defines a layotto runtime the installer did not add is
#    left alone. The result is checked with Python's tomllib before it replaces the file;
#    the file as first found is kept once, as config.toml.layotto-backup.
# 4. Restarts containerd when the config changed (in the node's namespaces, through
#    nsenter into PID 1: the pod needs hostPID and privileged). Running containers survive
#    a containerd restart. If the restart fails the installer fails, and retries the
#    restart on its next run.
# 5. Puts the operator policy /etc/layotto/policy.yaml (mode 0600) when the node has none:
#    the payload's share/layotto/policy.yaml, the node host's built-in rules written out to
#    edit. An existing policy is never overwritten; --uninstall removes it only when it is
#    still the shipped one.
# 6. Writes /etc/layotto/installed (version, paths), the sign that the node is done.
#
# Environment (node paths unless said otherwise):
#   HOST_ROOT          where the node's / is mounted (default /host; / on the node itself)
#   PAYLOAD            the virtual environment to install, a path in this container
#                      (default /opt/layotto)
#   LAYOTTO_VERSION    version to install as (default: what the payload's shim reports)
#   LAYOTTO_PREFIX     the symlink to the installed version (default /opt/layotto)
#   SHIM_DIR           where the shim wrapper goes, a directory on containerd's PATH
#                      (default /usr/local/bin)
#   CONTAINERD_CONFIG  containerd's config (default /etc/containerd/config.toml)
#   CONTAINERD_SERVICE the systemd unit to restart (default containerd)
#   LAYOTTO_STATE_DIR  the installer's own records and the policy (default /etc/layotto)
#   SKIP_RESTART=1     do not restart containerd (restart it yourself); for tests too
#   PYTHON             a Python >= 3.11 in this container, to check the new config
#                      (default python3)
set -eu

SHIM=containerd-shim-layotto-v1
RUNTIME_TYPE=io.containerd.layotto.v1
POD_ANNOTATIONS='["layotto.io/*"]'
BEGIN_MARK='# BEGIN layotto runtime'
END_MARK='# END layotto runtime'
WRAPPER_TAG='# Installed by the layotto node installer.'
VERSION_DIR_TAG=.layotto-node-installer

HOST_ROOT=${HOST_ROOT-/host}
HOST_ROOT=${HOST_ROOT%/}
PAYLOAD=${PAYLOAD:-/opt/layotto}
PREFIX=${LAYOTTO_PREFIX:-/opt/layotto}
PREFIX=${PREFIX%/}
SHIM_DIR=${SHIM_DIR:-/usr/local/bin}
CONFIG=${CONTAINERD_CONFIG:-/etc/containerd/config.toml}
SERVICE=${CONTAINERD_SERVICE:-containerd}
STATE_DIR=${LAYOTTO_STATE_DIR:-/etc/layotto}
SKIP_RESTART=${SKIP_RESTART:-0}
PYTHON=${PYTHON:-python3}

log() { printf 'layotto-node-installer: %s\n' "$*"; }
die() {
  printf 'layotto-node-installer: error: %s\n' "$*" >&2
  exit 1
}

usage() {
  cat <<'EOF'
usage: install.sh [--uninstall]

Installs the layotto runtime on the node whose root is mounted at $HOST_ROOT (default
/host) and registers it with containerd; --uninstall removes it again. See the comment at
the top of this script for the environment variables.
EOF
}

# ------------------------------------------------------------------------------ helpers

# The top-level `version` of a containerd config (empty when it has none).
config_version() {
  awk '
    /^[[:space:]]*\[/ { exit }
    /^[[:space:]]*version[[:space:]]*=/ {
      v = $0
      sub(/^[^=]*=[[:space:]]*/, "", v)
      sub(/[[:space:]]*(#.*)?$/, "", v)
      print v
      exit
    }' "$1"
}

# True when a file has anything but blank lines and comments.
has_content() {
  grep -Eqv '^[[:space:]]*(#.*)?$' "$1"
}

# Prints file $1 without the installer's block and the one blank line the installer put
# before it. Fails (status 3) on a BEGIN line without its END line.
strip_block() {
  awk -v begin="$BEGIN_MARK" -v end="$END_MARK" '
    inblock { if (index($0, end) == 1) inblock = 0; next }
    index($0, begin) == 1 { held = 0; inblock = 1; next }
    {
      if (held) { print ""; held = 0 }
      if ($0 == "") { held = 1; next }
      print
    }
    END {
      if (held) print ""
      if (inblock) exit 3
    }' "$1"
}

# True when a config defines a table for a runtime named layotto.
has_layotto_table() {
  grep -Eq "^[[:space:]]*\\[[^]#]*\\.runtimes\\.[\"']?layotto[\"']?[[:space:]]*\\]" "$1"
}

# The installer's block for config version $1; $2 = 1 adds the `version = 2` line (for a
# config that has nothing else).
render_block() {
  printf '%s (added by the layotto node installer; install.sh --uninstall removes it)\n' "$BEGIN_MARK"
  [ "$2" = 1 ] && printf 'version = 2\n'
  if [ "$1" = 3 ]; then
    printf "[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.layotto]\n"
  else
    printf '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.layotto]\n'
  fi
  printf '  runtime_type = "%s"\n' "$RUNTIME_TYPE"
  printf '  # containerd before 1.6.21 and 1.7.1 ignores runtime_path and runs\n'
  printf '  # %s/%s, a wrapper that execs this same file.\n' "$SHIM_DIR" "$SHIM"
  printf '  runtime_path = "%s/bin/%s"\n' "$PREFIX" "$SHIM"
  printf '  pod_annotations = %s\n' "$POD_ANNOTATIONS"
  printf '%s\n' "$END_MARK"
}

# Checks that file $1 is valid TOML of config version $2 and has the layotto runtime.
validate_config() {
  "$PYTHON" - "$1" "$2" "$RUNTIME_TYPE" <<'EOF'
import sys
import tomllib

path, version, runtime_type = sys.argv[1], int(sys.argv[2]), sys.argv[3]
try:
    with open(path, "rb") as f:
        doc = tomllib.load(f)
except tomllib.TOMLDecodeError as e:
    sys.exit(f"the new config would not be valid TOML: {e}")
plugin = "io.containerd.grpc.v1.cri" if version == 2 else "io.containerd.cri.v1.runtime"
if doc.get("version") != version:
    sys.exit(f"the new config says version = {doc.get('version')!r}, expected {version}")
disabled = doc.get("disabled_plugins", [])
if "cri" in disabled or "io.containerd.grpc.v1.cri" in disabled or plugin in disabled:
    sys.exit("containerd's CRI plugin is disabled (disabled_plugins), so Kubernetes cannot use it")
try:
    runtime = doc["plugins"][plugin]["containerd"]["runtimes"]["layotto"]
except (KeyError, TypeError):
    sys.exit(f"the new config has no plugins.{plugin}.containerd.runtimes.layotto table")
if runtime.get("runtime_type") != runtime_type:
    sys.exit(f"the layotto runtime's runtime_type is {runtime.get('runtime_type')!r}, not {runtime_type!r}")
EOF
}

# Replaces file $2 with the content of $1, atomically, keeping $2's mode and owner.
replace_file() {
  tmp=$2.layotto-new
  if [ -e "$2" ]; then
    cp -p "$2" "$tmp"
    cat "$1" >"$tmp"
  else
    mkdir -p "$(dirname "$2")"
    cp "$1" "$tmp"
    chmod 644 "$tmp"
  fi
  mv -f "$tmp" "$2"
}

# Writes text $2 to file $1 with mode $3, only when it differs.
put_file() {
  printf '%s' "$2" >"$WORK/put"
  if [ -f "$1" ] && cmp -s "$WORK/put" "$1"; then
    return 0
  fi
  mkdir -p "$(dirname "$1")"
  cp "$WORK/put" "$1.layotto-new"
  chmod "$3" "$1.layotto-new"
  mv -f "$1.layotto-new" "$1"
}

restart_containerd() {
  pending=$HOST_ROOT$STATE_DIR/restart-pending
  [ -e "$pending" ] || return 0
  if [ "$SKIP_RESTART" = 1 ]; then
    log "SKIP_RESTART=1: containerd was not restarted; the change takes effect when it is" \
      "(systemctl restart $SERVICE)"
    return 0
  fi
  log "restarting $SERVICE on the node"
  if ! nsenter --target 1 --mount --uts --ipc --net --pid -- systemctl restart "$SERVICE"; then
    die "could not restart $SERVICE on the node with" \
      "'nsenter --target 1 --mount --uts --ipc --net --pid -- systemctl restart $SERVICE'." \
      "The pod needs hostPID: true and a privileged container, and the node must run" \
      "containerd as the systemd unit $SERVICE (CONTAINERD_SERVICE names another)." \
      "$CONFIG is already updated; the next run of the installer tries the restart again."
  fi
  rm -f "$pending"
}

# ------------------------------------------------------------------------------ install

# Everything that can stop the installer on a node it cannot serve, checked before the
# node is changed.
preflight() {
  [ -x "$PAYLOAD/bin/$SHIM" ] || die "no payload: $PAYLOAD/bin/$SHIM is missing (PAYLOAD=$PAYLOAD)"
  [ -f "$PAYLOAD/pyvenv.cfg" ] || die "$PAYLOAD is not a Python virtual environment (no pyvenv.cfg)"
  interpreter=$(sed -n 's/^executable[[:space:]]*=[[:space:]]*//p' "$PAYLOAD/pyvenv.cfg")
  if [ -z "$interpreter" ]; then
    home=$(sed -n 's/^home[[:space:]]*=[[:space:]]*//p' "$PAYLOAD/pyvenv.cfg")
    interpreter=$home/python3
  fi
  if [ ! -x "$HOST_ROOT$interpreter" ] && [ ! -L "$HOST_ROOT$interpreter" ]; then
    die "the node has no $interpreter, the Python the payload's virtual environment was" \
      "built with (its bin/python3 is a symlink to it). Install it on the node (Debian 12:" \
      "apt-get install python3.11), or build the installer image against the node's Python."
  fi
  link=$HOST_ROOT$PREFIX
  if [ -e "$link" ] && [ ! -L "$link" ]; then
    die "$PREFIX exists and is not a symlink: it was not made by this installer; move it away"
  fi
  wrapper=$HOST_ROOT$SHIM_DIR/$SHIM
  if [ -e "$wrapper" ] && ! grep -qxF "$WRAPPER_TAG" "$wrapper"; then
    die "$SHIM_DIR/$SHIM exists and was not installed by this installer; remove it first"
  fi
}

install_payload() {
  target=$PREFIX-$VERSION
  if [ -e "$HOST_ROOT$target" ]; then
    log "$target is already installed"
  else
    partial=$(dirname "$target")/.$(basename "$target").partial
    rm -rf "$HOST_ROOT$partial"
    mkdir -p "$(dirname "$HOST_ROOT$partial")"
    cp -a "$PAYLOAD" "$HOST_ROOT$partial"
    printf 'version=%s\n' "$VERSION" >"$HOST_ROOT$partial/$VERSION_DIR_TAG"
    mv "$HOST_ROOT$partial" "$HOST_ROOT$target"
    log "installed $target"
  fi
  link=$HOST_ROOT$PREFIX
  want=$(basename "$target")
  was=$(readlink "$link" 2>/dev/null || true)
  if [ "$was" != "$want" ]; then
    ln -sfn "$want" "$link.layotto-new"
    mv -fT "$link.layotto-new" "$link"
    log "$PREFIX -> $want"
    case $was in
      "$(basename "$PREFIX")"-*)
        previous=${was#"$(basename "$PREFIX")"-}
        log "switched from layotto $previous: containers running now stay in the $previous" \
          "node host, which exits when the last of them ends; new containers start in a" \
          "$VERSION host. To stop the old ones now: $PREFIX/bin/layotto drain --grace 30"
        ;;
    esac
  fi
}

# The shipped default policy, unless the node already has one (the operator's edits stay).
install_policy() {
  shipped=$PAYLOAD/share/layotto/policy.yaml
  dest=$HOST_ROOT$STATE_DIR/policy.yaml
  if [ -e "$dest" ]; then
    log "$STATE_DIR/policy.yaml exists; leaving it as it is"
    return 0
  fi
  [ -f "$shipped" ] || die "no default policy in the payload ($shipped is missing)"
  mkdir -p "$HOST_ROOT$STATE_DIR"
  (umask 077 && cp "$shipped" "$dest.layotto-new")
  chmod 600 "$dest.layotto-new"
  mv -f "$dest.layotto-new" "$dest"
  log "installed the default policy as $STATE_DIR/policy.yaml"
}

install_wrapper() {
  put_file "$HOST_ROOT$SHIM_DIR/$SHIM" "#!/bin/sh
$WRAPPER_TAG
# containerd finds the shim on its PATH; the real one runs from its own
# directory, where its Python is.
exec '$PREFIX/bin/$SHIM' \"\$@\"
" 755
}

# Works out the new containerd config in $WORK/new; sets CONFIG_CHANGED=1 when it differs
# from the node's. Changes nothing on the node, so a config it cannot handle stops the
# installer before anything is installed.
plan_config() {
  CONFIG_CHANGED=0
  cfg=$HOST_ROOT$CONFIG
  if [ -e "$cfg" ]; then
    strip_block "$cfg" >"$WORK/base" ||
      die "$CONFIG has a '$BEGIN_MARK' line without its '$END_MARK' line; fix it by hand"
  else
    : >"$WORK/base"
  fi
  if has_layotto_table "$WORK/base"; then
    log "$CONFIG already has a layotto runtime that this installer did not add; leaving it as it is"
    return 0
  fi
  if has_content "$WORK/base"; then
    cfg_version=$(config_version "$WORK/base")
    case $cfg_version in
      2 | 3) ;;
      "") die "$CONFIG has no top-level 'version': containerd reads it in the old version 1" \
        "format, which this installer does not edit. Convert it to version 2 (containerd 1.x)" \
        "or 3 ('containerd config migrate' on containerd 2.x) and run the installer again." ;;
      *) die "$CONFIG says version = $cfg_version; this installer knows versions 2" \
        "(containerd 1.x) and 3 (containerd 2.x)" ;;
    esac
    with_version=0
  else
    cfg_version=2
    with_version=1
  fi

  cp "$WORK/base" "$WORK/new"
  if [ -s "$WORK/base" ]; then
    # A file not ending in a newline gets one; then one blank line before the block.
    [ -z "$(tail -c 1 "$WORK/base")" ] || printf '\n' >>"$WORK/new"
    printf '\n' >>"$WORK/new"
  fi
  render_block "$cfg_version" "$with_version" >>"$WORK/new"
  validate_config "$WORK/new" "$cfg_version" || die "not changing $CONFIG (see above)"
  if [ -e "$cfg" ] && cmp -s "$WORK/new" "$cfg"; then
    log "$CONFIG already has the layotto runtime"
  else
    CONFIG_CHANGED=1
  fi
}

apply_config() {
  [ "$CONFIG_CHANGED" = 1 ] || return 0
  cfg=$HOST_ROOT$CONFIG
  if [ -e "$cfg" ] && [ ! -e "$cfg.layotto-backup" ]; then
    cp -p "$cfg" "$cfg.layotto-backup"
    log "kept the previous $CONFIG as $CONFIG.layotto-backup"
  fi
  mkdir -p "$HOST_ROOT$STATE_DIR"
  : >"$HOST_ROOT$STATE_DIR/restart-pending"
  replace_file "$WORK/new" "$cfg"
  log "added the layotto runtime to $CONFIG"
}

install() {
  if [ -n "${LAYOTTO_VERSION:-}" ]; then
    VERSION=$LAYOTTO_VERSION
  else
    [ -x "$PAYLOAD/bin/$SHIM" ] || die "no payload: $PAYLOAD/bin/$SHIM is missing (PAYLOAD=$PAYLOAD)"
    VERSION=$("$PAYLOAD/bin/$SHIM" --version | sed -n 's/^[[:space:]]*Version:[[:space:]]*//p')
    [ -n "$VERSION" ] || die "could not read the version from '$PAYLOAD/bin/$SHIM --version'"
  fi
  case $VERSION in
    *[!A-Za-z0-9._+-]* | "") die "bad version '$VERSION'" ;;
  esac

  preflight
  plan_config
  install_payload
  install_wrapper
  install_policy
  apply_config
  restart_containerd
  put_file "$HOST_ROOT$STATE_DIR/installed" "version=$VERSION
prefix=$PREFIX
shim=$SHIM_DIR/$SHIM
runtime_type=$RUNTIME_TYPE
containerd_config=$CONFIG
" 644
  log "layotto $VERSION is installed; pods with runtimeClassName: layotto can run on this node"
}

# ------------------------------------------------------------------------------ uninstall

uninstall() {
  cfg=$HOST_ROOT$CONFIG
  if [ -e "$cfg" ] && grep -qF "$BEGIN_MARK" "$cfg"; then
    strip_block "$cfg" >"$WORK/base" ||
      die "$CONFIG has a '$BEGIN_MARK' line without its '$END_MARK' line; fix it by hand"
    if ! cmp -s "$WORK/base" "$cfg"; then
      mkdir -p "$HOST_ROOT$STATE_DIR"
      : >"$HOST_ROOT$STATE_DIR/restart-pending"
      if [ -s "$WORK/base" ]; then
        replace_file "$WORK/base" "$cfg"
      else
        rm -f "$cfg" # the installer created it
      fi
      log "removed the layotto runtime from $CONFIG"
    fi
  fi
  restart_containerd

  backup=$cfg.layotto-backup
  if [ -e "$backup" ]; then
    if [ -e "$cfg" ] && cmp -s "$backup" "$cfg"; then
      rm -f "$backup"
    else
      log "kept $CONFIG.layotto-backup: it differs from $CONFIG now"
    fi
  fi

  wrapper=$HOST_ROOT$SHIM_DIR/$SHIM
  if [ -e "$wrapper" ] && grep -qxF "$WRAPPER_TAG" "$wrapper"; then
    rm -f "$wrapper"
  fi
  link=$HOST_ROOT$PREFIX
  if [ -L "$link" ]; then
    rm -f "$link"
  fi
  for dir in "$link"-*; do
    if [ -f "$dir/$VERSION_DIR_TAG" ]; then
      rm -rf "$dir"
      log "removed ${dir#"$HOST_ROOT"}"
    fi
  done
  policy=$HOST_ROOT$STATE_DIR/policy.yaml
  if [ -e "$policy" ]; then
    if cmp -s "$PAYLOAD/share/layotto/policy.yaml" "$policy"; then
      rm -f "$policy"
    else
      log "kept $STATE_DIR/policy.yaml: it was edited"
    fi
  fi
  rm -f "$HOST_ROOT$STATE_DIR/installed" "$HOST_ROOT$STATE_DIR/restart-pending"
  rmdir "$HOST_ROOT$STATE_DIR" 2>/dev/null || true
  log "layotto is uninstalled from this node"
}

# ------------------------------------------------------------------------------ main

action=install
for arg in "$@"; do
  case $arg in
    --uninstall) action=uninstall ;;
    -h | --help)
      usage
      exit 0
      ;;
    *)
      usage >&2
      exit 2
      ;;
  esac
done

[ -d "$HOST_ROOT/etc" ] || die "the node's root is not mounted at HOST_ROOT=${HOST_ROOT:-/} (no etc/ there)"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$action"
