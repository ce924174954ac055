#!/usr/bin/env bash
# Make sure the local RabbitMQ (AMQP 127.0.0.1:5672) and its management API (127.0.0.1:15672)
# answer guest/guest, installing, starting or enabling what is missing; fail with a clear message
# otherwise. It never stops or reconfigures a running broker beyond enabling the management plugin.
# The ports are fixed: the tests and scripts/local_fabric.py expect these.
set -euo pipefail

AMQP_PORT=5672
MGMT_PORT=15672
WAIT_SECONDS=${FABRIC_RABBITMQ_WAIT_SECONDS:-90}

fail() { echo "ensure_rabbitmq: $*" >&2; exit 1; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# The HTTP status of GET /api/overview as guest; "000" while nothing answers on the port.
management_status() {
  curl -sS -u guest:guest -o /dev/null -w '%{http_code}' --max-time 5 \
    "http://127.0.0.1:${MGMT_PORT}/api/overview" 2>/dev/null || true
}
# Whether it gives a final answer (not "000", not a 5xx while the plugin boots).
management_answers() { [[ ! $(management_status) =~ ^(000|5) ]]; }
wait_for() {
  local what=$1; shift
  for _ in $(seq "$WAIT_SECONDS"); do "$@" && return 0; sleep 1; done
  fail "$what did not come up within ${WAIT_SECONDS}s"
}

missing=()
command -v rabbitmq-server >/dev/null || missing+=(rabbitmq-server)
command -v curl >/dev/null || missing+=(curl)
if ((${#missing[@]})); then
  echo "ensure_rabbitmq: installing ${missing[*]} (apt-get)"
  command -v apt-get >/dev/null || fail "${missing[*]} not found and no apt-get: install it yourself"
  apt-get update -qq \
    || fail "apt-get update failed (it needs root and the package index): install ${missing[*]} yourself"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
    || fail "apt-get install ${missing[*]} failed"
fi
if ! port_open "$AMQP_PORT"; then
  echo "ensure_rabbitmq: starting rabbitmq-server"
  rabbitmq-server -detached || fail "rabbitmq-server -detached failed"
  wait_for "RabbitMQ on 127.0.0.1:${AMQP_PORT}" port_open "$AMQP_PORT"
fi
if ! management_answers; then
  echo "ensure_rabbitmq: enabling the management plugin"
  rabbitmq-plugins enable --quiet rabbitmq_management >/dev/null \
    || fail "rabbitmq-plugins could not enable rabbitmq_management"
  wait_for "the RabbitMQ management API on 127.0.0.1:${MGMT_PORT}" management_answers
fi
status=$(management_status)
case $status in
  200) ;;
  401) fail "the management API on 127.0.0.1:${MGMT_PORT} refuses guest/guest (HTTP 401):" \
    "the tests and the local fabric log in as guest" ;;
  *) fail "the management API on 127.0.0.1:${MGMT_PORT} answered HTTP $status to GET /api/overview" ;;
esac
echo "ensure_rabbitmq: RabbitMQ on 127.0.0.1:${AMQP_PORT}, management API on 127.0.0.1:${MGMT_PORT}"
