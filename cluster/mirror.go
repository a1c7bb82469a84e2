package cluster

import (
	"context"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/ssefeed/caddy-ssefeed/replay"
)

// Mirror keeps a local log filled from a feed's shared log, with one reader
// per feed however many subscribers read the local log. It reads what is
// new on every hint and every Interval, so a lost hint costs latency, never
// an event.
type Mirror struct {
	// Store is the feed's store.
	Store Store
	// Log receives the shared log's frames, in order, each once.
	Log Sink
	// Reset, if not nil, is called when the shared log no longer continues
	// what the mirror appended to Log: its epoch changed (the store lost
	// its data) or entries the mirror had not read were trimmed. Frames
	// appended before must no longer be found by id nor read, so that a
	// client that had them gets the reset instead of a silent gap. It is
	// called before the frames that follow are appended, with the epoch
	// they belong to.
	Reset func(epoch string)
	// Interval is how often the mirror reads without a hint. Default: 1s.
	Interval time.Duration
	// Batch is the most entries read at once. Default: 256.
	Batch int
	// Observer, if not nil, counts store errors.
	Observer Observer
	// Logger, if not nil, logs store errors and resets.
	Logger *zap.Logger

	readyOnce sync.Once
	// reading serialises the catch-ups of Run and Sync.
	reading sync.Mutex

	mu       sync.Mutex
	ready    chan struct{} // closed after the first catch-up
	epoch    string        // of the entries read so far
	applied  uint64        // Seq of the last entry appended to Log
	appended bool          // whether Log got frames since the last Reset
	changed  chan struct{} // closed when epoch or applied change
}

// Run mirrors the shared log until ctx ends. Store errors are retried with
// backoff; Run never ends for them.
func (m *Mirror) Run(ctx context.Context) {
	logger := m.Logger
	if logger == nil {
		logger = zap.NewNop()
	}
	interval := m.Interval
	if interval <= 0 {
		interval = time.Second
	}
	hints := m.Store.Hints()
	ticker := time.NewTicker(interval)
	defer ticker.Stop()
	f := faults{op: "read", observer: m.Observer, logger: logger}
	for ctx.Err() == nil {
		if err := m.syncWith(ctx, logger); err != nil {
			if ctx.Err() != nil {
				return
			}
			f.failed(err)
			sleep(ctx, backoff(f.count))
			continue
		}
		f.recovered()
		m.readyOnce.Do(func() { close(m.readyChan()) })
		select {
		case <-ctx.Done():
			return
		case <-hints:
		case <-ticker.C:
		}
	}
}

// Ready returns a channel closed once the mirror has caught up with the
// shared log for the first time: from then on, the local log has what the
// shared log had, and an id missing from it is unknown to the cluster.
func (m *Mirror) Ready() <-chan struct{} { return m.readyChan() }

func (m *Mirror) readyChan() chan struct{} {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.ready == nil {
		m.ready = make(chan struct{})
	}
	return m.ready
}

// Sync reads what the shared log has now, so that the local log has every
// entry appended before the call, wherever it was appended: a subscriber
// may bring an id that another instance delivered before this mirror had
// its hint.
func (m *Mirror) Sync(ctx context.Context) error {
	logger := m.Logger
	if logger == nil {
		logger = zap.NewNop()
	}
	return m.syncWith(ctx, logger)
}

func (m *Mirror) syncWith(ctx context.Context, logger *zap.Logger) error {
	m.reading.Lock()
	defer m.reading.Unlock()
	return m.catchUp(ctx, logger)
}

// catchUp reads and appends until the mirror has everything the shared log
// has.
func (m *Mirror) catchUp(ctx context.Context, logger *zap.Logger) error {
	batch := m.Batch
	if batch <= 0 {
		batch = 256
	}
	for {
		m.mu.Lock()
		epoch, after := m.epoch, m.applied
		m.mu.Unlock()
		meta, entries, err := m.Store.Read(ctx, after, batch)
		if err != nil {
			return err
		}
		if meta.Epoch == "" {
			// Nothing stored, or the store lost it and no holder has
			// started a new epoch yet.
			return nil
		}
		if meta.Epoch != epoch {
			m.reset(meta.Epoch, 0, logger)
			if after > 0 {
				// Read after a position of another epoch: read again
				// from its start.
				continue
			}
		}
		if len(entries) == 0 {
			return nil
		}
		if first := entries[0].Seq; first > after+1 {
			m.reset(meta.Epoch, first-1, logger)
		}
		frames := make([]replay.Frame, len(entries))
		for i, e := range entries {
			frames[i] = replay.Frame{ID: e.ID, Key: e.Key, Bytes: e.Bytes}
		}
		m.Log.Append(frames...)
		m.advance(entries[len(entries)-1].Seq)
		if len(entries) < batch {
			return nil
		}
	}
}

// reset positions the mirror at seq of epoch, and calls Reset if the frames
// already appended do not lead there.
func (m *Mirror) reset(epoch string, seq uint64, logger *zap.Logger) {
	m.mu.Lock()
	appended := m.appended
	m.epoch, m.applied, m.appended = epoch, seq, false
	m.notify()
	m.mu.Unlock()
	if appended && m.Reset != nil {
		logger.Warn("shared log does not continue the local one; resetting",
			zap.String("epoch", epoch), zap.Uint64("seq", seq))
		m.Reset(epoch)
	}
}

// advance records that the entries up to seq were appended.
func (m *Mirror) advance(seq uint64) {
	m.mu.Lock()
	m.applied, m.appended = seq, true
	m.notify()
	m.mu.Unlock()
}

// notify wakes Wait callers. m.mu must be held.
func (m *Mirror) notify() {
	if m.changed != nil {
		close(m.changed)
		m.changed = nil
	}
}

// Wait returns once the mirror has appended the entry seq of epoch, or
// skipped past it, or with ctx's error once ctx ends. The lease holder
// calls it after an append, so that its own local log has what it
// appended.
func (m *Mirror) Wait(ctx context.Context, epoch string, seq uint64) error {
	for {
		m.mu.Lock()
		if m.epoch == epoch && m.applied >= seq {
			m.mu.Unlock()
			return nil
		}
		if m.changed == nil {
			m.changed = make(chan struct{})
		}
		changed := m.changed
		m.mu.Unlock()
		select {
		case <-changed:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}
