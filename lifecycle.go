package ssefeed

import (
	"context"

	"github.com/caddyserver/caddy/v2"
)

// exiting ends when Caddy exits. Every stream group derives from it, so
// that an exit ends every stream of the process, whichever config
// generation opened it: Caddy tells only the modules of the config being
// stopped, and a stream kept across reloads belongs to an older one.
var exiting, exit = context.WithCancel(context.Background())

// stoppingHandler ends every stream of the process when Caddy exits, so that
// Caddy's eternal default grace period does not wait for them. On a reload
// streams go on; those of handlers that the reload drops end in Cleanup.
type stoppingHandler struct{}

// Handle implements caddyevents.Handler.
func (stoppingHandler) Handle(context.Context, caddy.Event) error {
	if caddy.Exiting() {
		exit()
	}
	return nil
}

// streamGroups holds a stream group per handler config, so that a reload
// keeps the streams of unchanged handlers and ends those of changed ones,
// even when a changed handler shares its feed with an unchanged one.
var streamGroups = caddy.NewUsagePool()

// streamGroup is the context that the streams of one handler config run
// under.
type streamGroup struct {
	ctx    context.Context
	cancel context.CancelFunc
}

func newStreamGroup() (caddy.Destructor, error) {
	ctx, cancel := context.WithCancel(exiting)
	return &streamGroup{ctx: ctx, cancel: cancel}, nil
}

// Destruct ends the group's streams.
func (g *streamGroup) Destruct() error {
	g.cancel()
	return nil
}
