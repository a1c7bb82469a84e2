package ssefeed

import (
	"context"

	"github.com/caddyserver/caddy/v2"
)

// exiting ends when Caddy exits. Every feed's context derives from it, so
// that an exit ends every stream of the process, whichever config
// generation opened it: Caddy tells only the modules of the config being
// stopped, and a stream kept across reloads belongs to an older one.
var exiting, exit = context.WithCancel(context.Background())

// stoppingHandler ends every stream of the process when Caddy exits, so that
// Caddy's eternal default grace period does not wait for them. On a reload
// streams go on; those of feeds that the reload drops end when the feed is
// destructed.
type stoppingHandler struct{}

// Handle implements caddyevents.Handler.
func (stoppingHandler) Handle(context.Context, caddy.Event) error {
	if caddy.Exiting() {
		exit()
	}
	return nil
}
