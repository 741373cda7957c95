#!/usr/bin/env bash
# Make sure a Redis server binary is installed and one answers on 127.0.0.1:6379.
# Tests start private servers of their own on free ports; the default one serves `make demo`
# with GPL_REDIS_URL and the README's Redis examples.
set -euo pipefail
if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis-server not found: installing Debian's redis-server package"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=""; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
if redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; then
  echo "redis: answering on 127.0.0.1:6379"
  exit 0
fi
echo "redis: starting redis-server on 127.0.0.1:6379"
redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
  --logfile /tmp/gpl-redis.log
for _ in $(seq 1 50); do
  if redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; then echo "redis: up"; exit 0; fi
  sleep 0.1
done
echo "redis: did not come up; see /tmp/gpl-redis.log" >&2
exit 1
