package ssefeed

import (
	"context"
	"encoding/json"
	"strconv"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/ssefeed/caddy-ssefeed/replay"
	"github.com/ssefeed/caddy-ssefeed/source"
)

// feeds holds every feed in the process, keyed by the canonical form of the
// config that makes it, so that a reload with an unchanged feed keeps its
// reader, replay log and streams.
var feeds = caddy.NewUsagePool()

// reader is a source: it reads its upstream until ctx ends.
type reader interface {
	Run(ctx context.Context, sink source.Sink)
}

// feedKind tells how upstream values become elements.
type feedKind int

const (
	// documentFeed: each changed polled document is one event.
	documentFeed feedKind = iota
	// itemFeed: each new element of the polled array is one event.
	itemFeed
	// tailFeed: each NDJSON line is one event.
	tailFeed
)

// feed is one upstream reader, its replay log and its subscribers.
type feed struct {
	name    string
	kind    feedKind
	source  reader
	mapping mapping
	log     *replay.Log
	linger  time.Duration
	logger  *zap.Logger
	metrics *feedMetrics

	// idPrefix starts every generated id. It is the feed's creation time,
	// so that ids from an earlier process are never mistaken for ours.
	idPrefix string

	// done is closed when the feed is destructed.
	done chan struct{}

	mu          sync.Mutex
	subscribers int
	stopReader  context.CancelFunc // nil while no reader runs
	readerDone  chan struct{}      // closed when the last reader started has returned
	lingerGen   int                // invalidates linger timers that fired late
	closed      bool
	// ready is closed once the reader has polled successfully or, for a
	// tail, at once. Subscribers wait for it, so that the first poll after
	// an item feed starts is a baseline and not news.
	ready chan struct{}
	// readyAt is the log's end when ready was closed: subscribers that
	// waited take their place relative to it, not to when they woke.
	readyAt uint64

	// Fields below are used by the reader's goroutine only, under publishMu.
	publishMu sync.Mutex
	nextID    uint64
	lastID    string
	lastPoll  map[string]struct{} // keys of the last polled array
}

func newFeed(name string, kind feedKind, src reader, m mapping, limits replay.Limits, linger time.Duration, logger *zap.Logger) *feed {
	f := &feed{
		name:     name,
		kind:     kind,
		source:   src,
		mapping:  m,
		log:      replay.New(limits),
		linger:   linger,
		logger:   logger,
		metrics:  newFeedMetrics(name),
		idPrefix: strconv.FormatInt(time.Now().UnixNano(), 36) + "-",
		ready:    make(chan struct{}),
		done:     make(chan struct{}),
	}
	if kind == tailFeed {
		close(f.ready)
	}
	return f
}

// markReady closes the ready channel if it is open.
func (f *feed) markReady() {
	f.mu.Lock()
	defer f.mu.Unlock()
	select {
	case <-f.ready:
	default:
		f.readyAt = f.log.Next()
		close(f.ready)
	}
}

// readyEnd returns the log's end when the feed last became ready.
func (f *feed) readyEnd() uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.readyAt
}

// subscribe counts a new subscriber and starts the reader if none runs.
// When the feed is ready, it calls position first, before a reader can
// publish, so that the subscriber takes its place in the log at its arrival
// and returns a nil channel. Otherwise it returns a channel closed when the
// subscriber may take its place: after the first poll. It returns false
// when the feed is closed or already has limit subscribers (a limit of 0
// means none).
func (f *feed) subscribe(limit int, position func()) (wait <-chan struct{}, ok bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed || limit > 0 && f.subscribers >= limit {
		return nil, false
	}
	f.subscribers++
	f.metrics.subscribers.Inc()
	f.lingerGen++
	if f.stopReader == nil && f.kind == itemFeed {
		select {
		case <-f.ready:
			f.ready = make(chan struct{}) // a new baseline
		default:
		}
	}
	wait = f.ready
	select {
	case <-f.ready:
		position()
		wait = nil
	default:
	}
	if f.stopReader == nil {
		ctx, cancel := context.WithCancel(context.Background())
		f.stopReader = cancel
		f.logger.Info("feed started")
		// A reader stopped a moment ago may still be returning; the new one
		// waits for it, so that one source never runs twice at once.
		previous, done := f.readerDone, make(chan struct{})
		f.readerDone = done
		go func() {
			defer close(done)
			if previous != nil {
				<-previous
			}
			f.source.Run(ctx, f)
		}()
	}
	return wait, true
}

// unsubscribe counts a subscriber gone; the last one starts the linger,
// after which the reader stops.
func (f *feed) unsubscribe() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.subscribers--
	f.metrics.subscribers.Dec()
	if f.subscribers > 0 || f.stopReader == nil {
		return
	}
	f.lingerGen++
	gen := f.lingerGen
	time.AfterFunc(f.linger, func() {
		f.mu.Lock()
		defer f.mu.Unlock()
		if gen == f.lingerGen && f.stopReader != nil {
			f.stopReader()
			f.stopReader = nil
			f.logger.Info("feed stopped: no subscribers", zap.Duration("linger", f.linger))
		}
	})
}

// Destruct stops the reader and ends every stream of the feed. The usage
// pool calls it when the last config using the feed is cleaned up.
func (f *feed) Destruct() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return nil
	}
	f.closed = true
	f.lingerGen++
	if f.stopReader != nil {
		f.stopReader()
		f.stopReader = nil
		f.logger.Info("feed stopped: config unloaded")
	}
	f.log.Close()
	close(f.done)
	return nil
}

// LastID implements source.Sink.
func (f *feed) LastID() string {
	f.publishMu.Lock()
	defer f.publishMu.Unlock()
	return f.lastID
}

// Publish implements source.Sink: it maps the values to events, skips
// elements seen before, encodes each event once and appends them all to
// the log in one step.
func (f *feed) Publish(values []json.RawMessage) {
	f.publishMu.Lock()
	defer f.publishMu.Unlock()
	defer f.markReady()
	if len(values) == 0 {
		return
	}

	elems := values
	if f.kind == itemFeed {
		var err error
		if elems, err = f.mapping.elements(values[0]); err != nil {
			f.metrics.UpstreamError("mapping")
			f.logger.Warn("skipped a document", zap.Error(err))
			return
		}
	}
	var thisPoll map[string]struct{}
	if f.kind == itemFeed {
		thisPoll = make(map[string]struct{}, len(elems))
	}
	batchKeys := make(map[string]struct{})
	frames := make([]replay.Frame, 0, len(elems))
	for _, elem := range elems {
		ev, key, err := f.mapping.toEvent(elem, f.kind == itemFeed)
		if err != nil {
			f.metrics.UpstreamError("mapping")
			f.logger.Warn("skipped an element", zap.Error(err))
			continue
		}
		if f.kind == documentFeed {
			key = ""
		}
		if key != "" {
			if thisPoll != nil {
				thisPoll[key] = struct{}{}
			}
			_, inBatch := batchKeys[key]
			_, inLastPoll := f.lastPoll[key]
			if inBatch || inLastPoll || f.log.HasKey(key) {
				continue
			}
			batchKeys[key] = struct{}{}
		}
		if ev.ID != "" && !validID(ev.ID) {
			f.logger.Warn("upstream id cannot be sent back by clients; generating one",
				zap.Int("length", len(ev.ID)))
			ev.ID = ""
		}
		if ev.ID == "" {
			f.nextID++
			ev.ID = f.idPrefix + strconv.FormatUint(f.nextID, 10)
		}
		if !validEventType(ev.Type) {
			f.logger.Warn("upstream event type has a line break or invalid UTF-8; sending it as a message")
			ev.Type = ""
		}
		frames = append(frames, replay.Frame{ID: ev.ID, Key: key, Bytes: appendEvent(nil, ev)})
	}
	if thisPoll != nil {
		f.lastPoll = thisPoll
	}
	if len(frames) == 0 {
		return
	}
	f.lastID = frames[len(frames)-1].ID
	f.log.Append(frames...)
	f.metrics.events.Add(float64(len(frames)))
	if ce := f.logger.Check(zap.DebugLevel, "published"); ce != nil {
		ce.Write(zap.Int("events", len(frames)), zap.String("last_id", f.lastID))
	}
}

// Interface guards.
var (
	_ source.Sink      = (*feed)(nil)
	_ caddy.Destructor = (*feed)(nil)
)
