#!/usr/bin/env bash
# cluster-demo.sh: one feed served by three Caddy instances that share it
# through Redis, all on loopback.
#
# It builds ./cmd/caddy once, then starts
#   - redis-server on 127.0.0.1:16379, without persistence;
#   - an upstream Caddy on 127.0.0.1:18080 (admin 20190) whose /ticks lists
#     the ten newest ticks, one a second, newest first;
#   - three Caddy instances on 127.0.0.1:18081-18083 (admins 20191-20193),
#     from one Caddyfile, each fronting /ticks with the same clustered feed.
# With a subscriber on each instance, it shows with curl that an event id
# from instance 1 resumes on instance 2 with no gap, which instance holds
# the feed's lease and how many upstream requests each made; then it kills
# the holder with kill -9, waits until another instance holds the lease,
# and resumes on a third. Everything it started is stopped when it exits.
#
# Usage: scripts/cluster-demo.sh   (from anywhere in the checkout)
# Needs: go, redis-server (Redis 7+ or Valkey), curl.
set -euo pipefail
cd "$(dirname "$0")/.."

for program in go redis-server curl; do
	command -v "$program" >/dev/null || {
		echo "cluster-demo: $program not found" >&2
		exit 1
	}
done

dir=$(mktemp -d /tmp/sse-cluster-demo.XXXXXX)
pids=()
stop() {
	for pid in "${pids[@]}"; do
		kill "$pid" 2>/dev/null || true
	done
	wait 2>/dev/null || true
	rm -rf "$dir"
}
trap stop EXIT
trap 'exit 130' INT TERM

echo "building ./cmd/caddy into $dir"
go build -o "$dir/caddy" ./cmd/caddy

# The upstream: a JSON API whose /ticks lists the ten newest ticks, newest
# first. A new tick appears every second; its id is its Unix second.
cat >"$dir/upstream.Caddyfile" <<'EOF'
{
	admin 127.0.0.1:20190
}

http://127.0.0.1:18080 {
	bind 127.0.0.1
	handle /ticks {
		templates {
			mime application/json
		}
		header Content-Type application/json
		respond `{{ $now := now.Unix }}{"ticks": [{{range $i, $_ := until 10}}{{if $i}}, {{end}}{"id": "{{sub $now $i}}", "at": {{sub $now $i}}}{{end}}]}`
	}
}
EOF

# The instances: one Caddyfile, the ports from the environment.
cat >"$dir/instance.Caddyfile" <<'EOF'
{
	admin 127.0.0.1:{$ADMIN_PORT}
}

http://127.0.0.1:{$PORT} {
	bind 127.0.0.1
	sse_feed /ticks {
		poll http://127.0.0.1:18080/ticks 1s
		items /ticks
		id /id
		data /at
		order newest_first
		initial 3
		name ticks
		cluster redis {
			address redis://127.0.0.1:16379
			lease 3s
		}
	}
}
EOF

# start NAME ARGS... runs a program in the background, its output in
# $dir/NAME.log, and remembers its pid.
declare -A pid_of
start() {
	local name=$1
	shift
	"$@" >"$dir/$name.log" 2>&1 &
	pids+=("$!")
	pid_of[$name]=$!
}

# wait_for URL waits until URL answers, or fails after 30 seconds.
wait_for() {
	for _ in $(seq 300); do
		curl -s -o /dev/null --max-time 1 "$1" && return 0
		sleep 0.1
	done
	echo "cluster-demo: $1 does not answer; logs in $dir" >&2
	tail -n 20 "$dir"/*.log >&2
	trap - EXIT
	exit 1
}

start redis redis-server --bind 127.0.0.1 --port 16379 --save '' --appendonly no
start upstream env XDG_CONFIG_HOME="$dir/upstream" XDG_DATA_HOME="$dir/upstream" \
	"$dir/caddy" run --config "$dir/upstream.Caddyfile" --adapter caddyfile
for n in 1 2 3; do
	start "instance$n" env PORT=1808$n ADMIN_PORT=2019$n \
		XDG_CONFIG_HOME="$dir/instance$n" XDG_DATA_HOME="$dir/instance$n" \
		"$dir/caddy" run --config "$dir/instance.Caddyfile" --adapter caddyfile
done
wait_for http://127.0.0.1:18080/ticks
for n in 1 2 3; do
	wait_for "http://127.0.0.1:2019$n/config/"
done
echo "redis on 127.0.0.1:16379; upstream on :18080; instances on :18081, :18082, :18083"

# watch N SECONDS [LAST-EVENT-ID] prints what a client of instance N gets
# in SECONDS, resuming after LAST-EVENT-ID if given, and keeps the last id
# it got in $last.
watch() {
	local n=$1 seconds=$2 header=() shown="curl -N"
	if [ -n "${3-}" ]; then
		header=(-H "Last-Event-ID: $3")
		shown+=" -H 'Last-Event-ID: $3'"
	fi
	echo
	echo "\$ $shown http://127.0.0.1:1808$n/ticks   # for ${seconds}s"
	curl -sN --max-time "$seconds" "${header[@]}" "http://127.0.0.1:1808$n/ticks" >"$dir/stream" || true
	cat "$dir/stream"
	last=$(sed -n 's/^id: //p' "$dir/stream" | tail -n 1)
}

# metric N SERIES prints the sum of the values of the series of the feed
# "ticks" named caddy_sse_feed_SERIES on instance N.
metric() {
	curl -s "http://127.0.0.1:2019$1/metrics" |
		awk -v name="caddy_sse_feed_$2" '
			index($1, name "{") == 1 && index($1, "feed=\"ticks\"") { sum += $2 }
			END { print sum + 0 }'
}

# holder prints the instance among the given ones that holds the feed's
# lease, or nothing.
holder() {
	for n in "$@"; do
		if [ "$(metric "$n" cluster_lease_held)" = 1 ]; then
			echo "$n"
		fi
	done
}

# report prints, for each given instance, whether it holds the feed's lease
# and how many upstream requests it has made.
report() {
	echo
	for n in "$@"; do
		echo "instance $n: lease held $(metric "$n" cluster_lease_held), upstream requests $(metric "$n" upstream_requests_total)"
	done
}

# Other users: a subscriber on each instance, instance 1's first, so that
# it takes the lease.
for n in 1 2 3; do
	start "subscriber$n" curl -sN "http://127.0.0.1:1808$n/ticks"
	sleep 1
done

watch 1 3
sleep 2
watch 2 1 "$last"
report 1 2 3

leader=$(holder 1 2 3)
if [ -z "$leader" ]; then
	echo "cluster-demo: no instance holds the lease" >&2
	exit 1
fi
survivors=()
for n in 1 2 3; do
	[ "$n" = "$leader" ] || survivors+=("$n")
done
echo
echo "kill -9 instance $leader, the lease holder (lease 3s)"
killed=$(date +%s%N)
{
	kill -9 "${pid_of[instance$leader]}"
	wait "${pid_of[instance$leader]}"
} 2>/dev/null || true
for _ in $(seq 300); do
	[ -n "$(holder "${survivors[@]}")" ] && break
	sleep 0.1
done
if [ -z "$(holder "${survivors[@]}")" ]; then
	echo "cluster-demo: no instance took the lease within 30s" >&2
	exit 1
fi
echo "instance $(holder "${survivors[@]}") took the lease $(((($(date +%s%N) - killed) / 1000000))) ms later"
watch "${survivors[1]}" 1 "$last"
report "${survivors[@]}"
