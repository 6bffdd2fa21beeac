#!/bin/bash
# One command to this container's baresip over its ctrl_tcp socket (JSON in a netstring),
# and what comes back within TIMEOUT seconds (the response, then any events):
#   ctrl dial sip:bob@example.com     ctrl hangup     ctrl reginfo     ctrl quit
set -eu
command=${1:?usage: ctrl COMMAND [PARAMS]}
params=${2:-}
port=$(sed -n 's/^ctrl_tcp_listen[[:space:]]*127\.0\.0\.1:\([0-9]*\).*/\1/p' \
    "${HOME}/.baresip/config")
json=$(printf '{"command":"%s","params":"%s","token":"ctrl"}' "$command" "$params")
exec 3<>"/dev/tcp/127.0.0.1/${port}"
printf '%d:%s,' "${#json}" "$json" >&3
timeout "${TIMEOUT:-2}" cat <&3 || true
echo
