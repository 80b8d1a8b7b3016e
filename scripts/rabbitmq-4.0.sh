#!/usr/bin/env bash
# RabbitMQ 4.0 (Debian trixie's) beside the host's broker: see scripts/rabbitmq-debian.sh.
exec "$(dirname "$0")/rabbitmq-debian.sh" trixie "$@"
