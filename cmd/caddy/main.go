// Command caddy is Caddy with its standard modules and sse_feed, so that
// `go run ./cmd/caddy run --config Caddyfile.example` works without xcaddy.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/ssefeed/caddy-ssefeed"
)

func main() {
	caddycmd.Main()
}
