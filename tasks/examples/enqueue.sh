#!/usr/bin/env bash
# Put the example job on a Redis broker the way any language can: LPUSH of kombu's JSON envelope.
#   tasks/examples/enqueue.sh [REDIS_URL]        (default redis://127.0.0.1:6379/0)
# then: tierq result example-fast-1 --wait 30   (with TIERQ_BROKER_URL set to the same Redis)
# With TIERQ_KEY_PREFIX set, the queue is "${TIERQ_KEY_PREFIX}tierq.fast".
set -o errexit -o nounset -o pipefail
here="$(cd "$(dirname "$0")" && pwd)"
url="${1:-redis://127.0.0.1:6379/0}"
# one line of JSON: redis-cli takes the envelope as one argument
envelope="$(tr -d '\n' < "$here/fast-job.envelope.json")"
exec redis-cli -u "$url" LPUSH "${TIERQ_KEY_PREFIX:-}tierq.fast" "$envelope"
