#!/usr/bin/env bash
# Make sure the local RabbitMQ (AMQP 127.0.0.1:5672) and its management API (127.0.0.1:15672)
# answer, installing, starting or enabling what is missing; fail with a clear message otherwise.
# It never stops or reconfigures a running broker beyond enabling the management plugin.
set -euo pipefail

AMQP_PORT=${FABRIC_RABBITMQ_PORT:-5672}
MGMT_PORT=${FABRIC_RABBITMQ_MANAGEMENT_PORT:-15672}
WAIT_SECONDS=${FABRIC_RABBITMQ_WAIT_SECONDS:-90}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
management_answers() {
  curl -fsS -u guest:guest -o /dev/null "http://127.0.0.1:${MGMT_PORT}/api/overview" 2>/dev/null
}
wait_for() {
  local what=$1; shift
  for _ in $(seq "$WAIT_SECONDS"); do "$@" && return 0; sleep 1; done
  echo "ensure_rabbitmq: $what did not come up within ${WAIT_SECONDS}s" >&2
  return 1
}

if ! command -v rabbitmq-server >/dev/null; then
  echo "ensure_rabbitmq: installing rabbitmq-server (apt-get)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server curl >/dev/null
fi
if ! port_open "$AMQP_PORT"; then
  echo "ensure_rabbitmq: starting rabbitmq-server"
  rabbitmq-server -detached
  wait_for "RabbitMQ on 127.0.0.1:${AMQP_PORT}" port_open "$AMQP_PORT"
fi
if ! management_answers; then
  echo "ensure_rabbitmq: enabling the management plugin"
  rabbitmq-plugins enable --quiet rabbitmq_management >/dev/null
  wait_for "the RabbitMQ management API on 127.0.0.1:${MGMT_PORT}" management_answers
fi
echo "ensure_rabbitmq: RabbitMQ on 127.0.0.1:${AMQP_PORT}, management API on 127.0.0.1:${MGMT_PORT}"
