# shellcheck shell=bash
# What scripts/faults-broker and scripts/cluster-broker share: a private RabbitMQ node on
# loopback beside the machine's main node, with its own data, logs and configuration, run as the
# rabbitmq user (whose Erlang cookie lets root's rabbitmqctl reach it). Sourced, not run; the
# caller defines `die`.

# True when something at HOST:PORT answers the AMQP 0-9-1 protocol header with a frame
# (connection.start), i.e. a broker, not just an open port.
private_node_answers() {
  # shellcheck disable=SC2016 # expanded by the inner shell, from its arguments
  timeout 3 bash -c '
    exec 3<>"/dev/tcp/$1/$2" || exit 1
    printf "AMQP\x00\x00\x09\x01" >&3
    frame_type=$(head -c 1 <&3 | od -An -tu1 | tr -d " ")
    [ "$frame_type" = "1" ]
  ' _ "$1" "$2" 2>/dev/null
}

# Fails clearly unless RabbitMQ is installed and this runs as root or as rabbitmq.
private_node_check_tools() {
  if ! command -v rabbitmq-server >/dev/null 2>&1 || ! command -v rabbitmqctl >/dev/null 2>&1; then
    die "rabbitmq-server is not installed (Debian/Ubuntu: apt-get install rabbitmq-server; scripts/test installs it)."
  fi
  id rabbitmq >/dev/null 2>&1 || die "there is no rabbitmq user; install Debian's rabbitmq-server package."
  if [ "$(id -u)" != 0 ] && [ "$(id -un)" != rabbitmq ]; then
    die "run this as root or as the rabbitmq user (the nodes run as rabbitmq and need its Erlang cookie)."
  fi
}

# Runs a command as the rabbitmq user, keeping the environment (RABBITMQ_* reach the node).
as_rabbitmq() {
  if [ "$(id -un)" = rabbitmq ]; then
    "$@"
  else
    runuser -u rabbitmq -- "$@"
  fi
}

# private_node_prepare DIR HOST PORT WRITER [EXTRA_CONF_LINE...]: the node's folder, owned by
# rabbitmq: mnesia/, log/, an empty plugin list, rabbitmq.conf (its listener and any extra
# lines) and its own rabbitmq-env.conf, read instead of /etc/rabbitmq/rabbitmq-env.conf (which
# names the main node).
private_node_prepare() {
  local dir=$1 host=$2 port=$3 writer=$4
  shift 4
  mkdir -p "$dir/mnesia" "$dir/log"
  # An empty plugin list: the node needs none, and must not enable the main node's plugins.
  echo '[].' >"$dir/enabled_plugins"
  {
    echo "# Written by $writer."
    echo "listeners.tcp.local = $host:$port"
    local line
    for line in "$@"; do echo "$line"; done
  } >"$dir/rabbitmq.conf"
  # Same loopback-only epmd and distribution as the main node.
  cat >"$dir/rabbitmq-env.conf" <<ENV
# Written by $writer.
ERL_EPMD_ADDRESS=127.0.0.1
export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"
ENV
  if [ "$(id -un)" != rabbitmq ]; then
    chown -R rabbitmq:rabbitmq "$dir"
  fi
}

# private_node_launch NODE DIR HOST PORT DIST_PORT PID_FILE: starts the node detached, its
# startup output in DIR/log/startup_log and startup_err; returns once it is launched (callers
# wait for it).
private_node_launch() {
  local node=$1 dir=$2 host=$3 port=$4 dist=$5 pid_file=$6
  (
    cd "$dir"
    export RABBITMQ_NODENAME="$node" \
      RABBITMQ_NODE_IP_ADDRESS="$host" \
      RABBITMQ_NODE_PORT="$port" \
      RABBITMQ_DIST_PORT="$dist" \
      RABBITMQ_MNESIA_BASE="$dir/mnesia" \
      RABBITMQ_LOG_BASE="$dir/log" \
      RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
      RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
      RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" \
      RABBITMQ_PID_FILE="$pid_file" \
      HOME=/var/lib/rabbitmq
    # Called directly rather than through /usr/sbin/rabbitmq-server: the Debian wrapper would
    # redirect the output over the main node's /var/log/rabbitmq/startup_log.
    as_rabbitmq /usr/lib/rabbitmq/bin/rabbitmq-server -detached \
      >"$dir/log/startup_log" 2>"$dir/log/startup_err"
  ) || die "rabbitmq-server -detached failed for $node; see $dir/log/startup_err"
  if [ "$(id -un)" != rabbitmq ]; then
    chown rabbitmq:rabbitmq "$dir/log/startup_log" "$dir/log/startup_err"
  fi
}
