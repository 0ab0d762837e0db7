#!/usr/bin/env bash
# A single-node Apache Kafka (KRaft) on loopback for tests, from jars fetched with Maven.
#   deploy/kafka/kafka.sh fetch            download the broker jars once (cached)
#   deploy/kafka/kafka.sh start DIR        format DIR, start the broker, print host:port
#   deploy/kafka/kafka.sh stop DIR         stop the broker started in DIR, by PID
#   deploy/kafka/kafka.sh restart DIR      stop it and start it again on its data and ports
# Retention is off (log.retention.ms=-1): tests feed events with old timestamps. A second
# listener takes SASL/PLAIN (user churnsignal, password test-secret) for the security tests.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
version=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$here/pom.xml")
libs=${KAFKA_LIBS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/churnsignal/kafka-$version}

fetch() {
  if [ ! -f "$libs/.complete" ]; then
    mkdir -p "$libs"
    mvn -q -B -f "$here/pom.xml" dependency:copy-dependencies -DoutputDirectory="$libs" >&2
    touch "$libs/.complete"
  fi
}

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

start() {
  local dir=$1
  fetch
  mkdir -p "$dir"
  local port ctrl sasl
  port=$(free_port); ctrl=$(free_port); sasl=$(free_port)
  cat > "$dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$ctrl
listeners=PLAINTEXT://127.0.0.1:$port,SASL_PLAINTEXT://127.0.0.1:$sasl,CONTROLLER://127.0.0.1:$ctrl
advertised.listeners=PLAINTEXT://127.0.0.1:$port,SASL_PLAINTEXT://127.0.0.1:$sasl
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:PLAINTEXT
sasl.enabled.mechanisms=PLAIN
listener.name.sasl_plaintext.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="admin" password="admin-secret" user_admin="admin-secret" user_churnsignal="test-secret";
inter.broker.listener.name=PLAINTEXT
log.dirs=$dir/data
num.partitions=4
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
group.initial.rebalance.delay.ms=0
log.retention.ms=-1
auto.create.topics.enable=true
PROPS
  local cluster
  rm -rf "$dir/data"  # start = a new, empty broker (restart keeps the data)
  cluster=$(python3 -c 'import base64,uuid;print(base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="))')
  java -cp "$libs/*" kafka.tools.StorageTool format -t "$cluster" -c "$dir/server.properties" >"$dir/format.log" 2>&1
  launch "$dir"
}

launch() {
  local dir=$1 port
  port=$(sed -n 's/^advertised.listeners=PLAINTEXT:\/\/127.0.0.1:\([0-9]*\).*/\1/p' "$dir/server.properties")
  sed -n 's/^advertised.listeners=.*SASL_PLAINTEXT:\/\/\(127.0.0.1:[0-9]*\).*/\1/p' "$dir/server.properties" \
    > "$dir/bootstrap_sasl"  # SASL/PLAIN listener, user churnsignal / test-secret
  setsid java -Xms256m -Xmx768m -cp "$libs/*" kafka.Kafka "$dir/server.properties" \
    >>"$dir/kafka.log" 2>&1 < /dev/null &
  echo $! > "$dir/kafka.pid"
  for _ in $(seq 1 240); do
    if python3 -c "import socket,sys;socket.create_connection(('127.0.0.1',$port),0.5)" 2>/dev/null; then
      echo "127.0.0.1:$port" > "$dir/bootstrap"
      echo "127.0.0.1:$port"
      return 0
    fi
    if ! kill -0 "$(cat "$dir/kafka.pid")" 2>/dev/null; then
      echo "kafka exited; see $dir/kafka.log" >&2; tail -20 "$dir/kafka.log" >&2; return 1
    fi
    sleep 0.25
  done
  echo "kafka did not listen on $port within 60s" >&2
  stop "$dir"; return 1
}

restart() {
  # Same data, same ports: what a rolling restart of a one-broker cluster looks like.
  local dir=$1
  stop "$dir"
  launch "$dir"
}

stop() {
  local dir=$1 pid
  [ -f "$dir/kafka.pid" ] || return 0
  pid=$(cat "$dir/kafka.pid")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 80); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$dir/kafka.pid"
}

case "${1:-}" in
  fetch) fetch ;;
  start) start "${2:?DIR}" ;;
  stop) stop "${2:?DIR}" ;;
  restart) restart "${2:?DIR}" ;;
  *) echo "usage: $0 fetch | start DIR | stop DIR | restart DIR" >&2; exit 2 ;;
esac
