package ssefeed

import (
	"context"
	"sync"
	"time"
)

// pacer wakes the subscribers of a feed at most once per flush interval,
// so that each takes everything that arrived meanwhile in one write and one
// flush. The first append after a quiet interval wakes them at once. One
// pacer serves every stream of a feed with that interval: a stream parks
// once per write, and no stream needs a timer of its own.
type pacer struct {
	mu      sync.Mutex
	wake    chan struct{}
	stopped bool
}

// newPacer paces the appends to log until ctx ends.
func newPacer(ctx context.Context, log eventLog, interval time.Duration) *pacer {
	p := &pacer{wake: make(chan struct{})}
	// Taken now: an append before run starts is released too.
	go p.run(ctx, log.Wake(), log, interval)
	return p
}

// next returns the channel closed at the next paced wake. A stream takes it
// before it reads the log, so that nothing appended after that read goes
// unnoticed.
func (p *pacer) next() <-chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.wake
}

// release wakes the streams that wait.
func (p *pacer) release() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.stopped {
		close(p.wake)
		p.wake = make(chan struct{})
	}
}

// stop wakes the streams that wait, and every later one at once: the feed
// has ended.
func (p *pacer) stop() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.stopped {
		p.stopped = true
		close(p.wake)
	}
}

// run releases the streams after each append, from the one that closes
// appended on, then lets interval pass before the next release, until ctx
// ends: the feed then stops the pacer.
func (p *pacer) run(ctx context.Context, appended <-chan struct{}, log eventLog, interval time.Duration) {
	pause := time.NewTimer(interval)
	defer pause.Stop()
	for {
		select {
		case <-appended:
		case <-ctx.Done():
			return
		}
		// The next append's channel is taken before the release: what was
		// appended before it is read by the streams this release wakes.
		appended = log.Wake()
		p.release()
		pause.Reset(interval)
		select {
		case <-pause.C:
		case <-ctx.Done():
			return
		}
	}
}
