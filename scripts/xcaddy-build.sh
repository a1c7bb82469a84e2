#!/bin/sh
# xcaddy-build.sh builds Caddy with this module through xcaddy, the way users
# build it, and checks that the result lists http.handlers.sse_feed and its
# redis cluster backend.
#
# Usage: scripts/xcaddy-build.sh [output-dir]   (default: a temporary dir)
# Environment: CADDY_VERSION (default v2.11.9), XCADDY_VERSION (default v0.4.5).
#
# xcaddy itself is built with `go build` inside a throwaway module, because
# `go install github.com/caddyserver/xcaddy/cmd/xcaddy@latest` fails on some
# module proxies: they refuse (403) the version list behind @latest and the
# package path, but serve the module at a pinned version.
set -eu

repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$(mktemp -d)}
mkdir -p "$out"
out=$(cd "$out" && pwd)
caddy_version=${CADDY_VERSION:-v2.11.9}
xcaddy_version=${XCADDY_VERSION:-v0.4.5}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "building xcaddy@$xcaddy_version" >&2
(
	cd "$work"
	go mod init tmp >/dev/null 2>&1
	go get "github.com/caddyserver/xcaddy@$xcaddy_version"
	go build -mod=mod -o "$out/xcaddy" github.com/caddyserver/xcaddy/cmd/xcaddy
)

# This module comes from the replace directive xcaddy writes, yet xcaddy
# still asks for its latest version. A proxy answers 404 (fine) or, like some
# mirrors, 403 (fatal, even before ",direct", and "direct" fails offline);
# the proxies joined with "|" and then an empty file proxy turn any refusal
# into "not found", and Go uses the replacement.
mkdir "$work/noproxy"
proxies=$(go env GOPROXY | tr ',|' '\n\n' | grep -v -x -e direct -e off | paste -sd '|' -)
echo "building caddy $caddy_version with github.com/ssefeed/caddy-ssefeed=$repo" >&2
(
	cd "$repo"
	GOPROXY="${proxies:+$proxies|}file://$work/noproxy" \
		"$out/xcaddy" build "$caddy_version" \
			--with "github.com/ssefeed/caddy-ssefeed=$repo" \
			--output "$out/caddy"
)

modules=$("$out/caddy" list-modules)
for module in http.handlers.sse_feed http.handlers.sse_feed.clusters.redis; do
	if ! grep -qx "$module" <<<"$modules"; then
		echo "error: $out/caddy does not list $module" >&2
		exit 1
	fi
done
echo "ok: $out/caddy has http.handlers.sse_feed and http.handlers.sse_feed.clusters.redis"
