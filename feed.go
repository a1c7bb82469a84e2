package ssefeed

import (
	"context"
	"encoding/json"
	"math"
	"net/http"
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

// eventLog is what a feed needs of its replay log. *replay.Log is the
// local one; a cluster's log mirrors a shared one.
type eventLog interface {
	Append(frames ...replay.Frame)
	Read(cursor uint64, dst [][]byte, maxFrames, maxBytes int) (frames [][]byte, next uint64, more bool, wake <-chan struct{}, err error)
	Wake() <-chan struct{}
	After(id string) (cursor uint64, ok bool)
	Tail(end uint64, n int) uint64
	Next() uint64
	HasKey(key string) bool
	Expire()
	Drop()
	Close()
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

// feedParts are what a feed is built from.
type feedParts struct {
	kind    feedKind
	source  reader
	mapping mapping
	log     eventLog
	linger  time.Duration
	// readyWait bounds how long a restarted document feed keeps new
	// subscribers waiting for a fresh document before they get the
	// retained one. Zero waits without bound.
	readyWait time.Duration
	metrics   *feedMetrics
	logger    *zap.Logger
	// shared is the feed's part in a cluster, or nil.
	shared *sharing
	// decides tells that the upstream decides who may subscribe: an answer
	// of 401, 403, 404 or 410 refuses the feed's subscribers and ends it.
	decides bool
	// idle, if not nil, is called when the linger stopped the reader or
	// the upstream refused the feed, so that the feed can be forgotten.
	idle func(*feed)
}

// feed is one upstream reader, its replay log and its subscribers.
type feed struct {
	feedParts

	// ctx ends when the feed ends or Caddy exits; so do its streams.
	ctx    context.Context
	cancel context.CancelFunc

	// idPrefix starts every generated id. It is the feed's creation time,
	// so that ids from an earlier process are never mistaken for ours.
	idPrefix string

	mu          sync.Mutex
	subscribers int
	stopReader  context.CancelFunc // nil while no reader runs
	readerDone  chan struct{}      // closed when the last reader started has returned
	lingerGen   int                // invalidates linger timers that fired late
	closed      bool
	// ready is closed once the reader has read its upstream since it last
	// started: at once for a tail, after the first poll otherwise.
	// Subscribers that need the upstream's current state wait for it, so
	// that the first poll after an item feed starts is a baseline and not
	// news, and a restarted document feed hands out a fresh document.
	ready chan struct{}
	// readyAt is the log's end when ready was closed: subscribers that
	// waited take their place relative to it, not to when they woke.
	readyAt uint64
	// readyFallback closes ready after readyWait if the first poll has not;
	// it is stopped once ready is closed, so that it does not keep a
	// forgotten feed in memory until it fires.
	readyFallback *time.Timer
	// answered is closed at the upstream's first answer.
	answered chan struct{}
	// refusal is the status with which the upstream refused the feed, or 0.
	refusal int
	// pacers pace the streams of handlers with a flush_interval, by interval.
	pacers map[time.Duration]*pacer

	// Fields below are used by the reader's goroutine only, under publishMu.
	publishMu sync.Mutex
	nextID    uint64
	lastID    string
	lastPoll  map[string]struct{} // keys of the last polled array
}

func newFeed(parts feedParts) *feed {
	ctx, cancel := context.WithCancel(exiting)
	f := &feed{
		ctx:       ctx,
		cancel:    cancel,
		feedParts: parts,
		idPrefix:  strconv.FormatInt(time.Now().UnixNano(), 36) + "-",
		ready:     make(chan struct{}),
		answered:  make(chan struct{}),
	}
	if f.kind == tailFeed && f.shared == nil {
		close(f.ready)
	}
	context.AfterFunc(ctx, f.closeWaits)
	if f.shared != nil {
		f.shared.mirror.Log = mirrorSink{f}
		// Ids from before the shared log lost data must be unknown, and
		// the streams told.
		f.shared.mirror.Reset = func(string) { f.log.Drop() }
	}
	return f
}

// admission is a subscriber's place in a feed, taken as it arrives.
type admission struct {
	// end is the log's end at arrival, when the feed was ready then.
	end uint64
	// ready is closed when the feed has read its upstream; it is nil when
	// the feed was ready at arrival.
	ready <-chan struct{}
}

// position is where a subscriber starts reading the feed's log.
type position struct {
	cursor uint64
	// reset tells that the subscriber's last event id is unknown, so it
	// is owed a reset event first.
	reset bool
}

// subscribe admits a subscriber and starts the reader if none runs. It
// takes the subscriber's place at the log's end before a reader can
// publish, so that nothing published after the subscriber arrived is
// missed. It returns false when the feed is closed or already has limit
// subscribers (a limit of 0 means none).
func (f *feed) subscribe(limit int) (admission, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed || limit > 0 && f.subscribers >= limit {
		return admission{}, false
	}
	f.subscribers++
	f.metrics.subscribers.Inc()
	f.lingerGen++
	if f.stopReader == nil {
		f.startReader()
	}
	select {
	case <-f.ready:
		return admission{end: f.log.Next()}, true
	default:
		return admission{ready: f.ready}, true
	}
}

// startReader starts the source, or in a cluster the mirror and the
// leader. A poll feed outside a cluster takes a new baseline: until its
// first poll, new subscribers wait. In a cluster they wait only once, for
// the mirror to catch up. f.mu must be held.
func (f *feed) startReader() {
	if f.kind != tailFeed && f.shared == nil {
		select {
		case <-f.ready:
			f.ready = make(chan struct{})
		default:
		}
		if f.kind == documentFeed && f.readyWait > 0 {
			ready := f.ready
			f.stopReadyFallback()
			f.readyFallback = time.AfterFunc(f.readyWait, func() { f.markReadyIf(ready) })
		}
	}
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
		if f.shared != nil {
			f.runShared(ctx)
		} else {
			f.source.Run(ctx, f)
		}
	}()
}

// join returns where an admitted subscriber that brings lastID (or "")
// starts, and counts the resumption. A known id resumes right after it at
// once, whatever the upstream does. An unknown one owes a reset, then
// every retained event of an item or tail feed, or the latest document.
// No id gets the initial count of newest events. When the position
// depends on the upstream's current state, join returns a channel to wait
// for instead; call it again once that is closed. In a cluster, an id is
// unknown only once the local log has caught up with the shared one, and
// is looked for there too.
func (f *feed) join(a admission, lastID string, initial int) (position, <-chan struct{}) {
	f.log.Expire()
	if lastID != "" {
		cursor, ok := f.log.After(lastID)
		if !ok && f.shared != nil && isClosed(a.ready) {
			cursor, ok = f.shared.known(f.log, lastID)
		}
		if ok {
			f.metrics.resumeHit.Inc()
			return position{cursor: cursor}, nil
		}
		if f.kind != documentFeed && (f.shared == nil || isClosed(a.ready)) {
			f.metrics.resumeReset.Inc()
			f.logger.Debug("unknown last event id; sending reset", zap.Int("id_length", len(lastID)))
			return position{cursor: f.log.Tail(f.log.Next(), math.MaxInt), reset: true}, nil
		}
	}
	end := a.end
	if a.ready != nil {
		select {
		case <-a.ready:
			end = f.readyEnd()
		default:
			return position{}, a.ready
		}
	}
	if lastID == "" {
		// A place that a burst evicted before the subscriber took it stays
		// evicted: its first read tells, and it gets the reset.
		return position{cursor: min(end, f.log.Tail(end, initial))}, nil
	}
	f.metrics.resumeReset.Inc()
	f.logger.Debug("unknown last event id; sending reset", zap.Int("id_length", len(lastID)))
	return position{cursor: f.log.Tail(end, 1), reset: true}, nil
}

// isClosed reports whether ready is nil or closed.
func isClosed(ready <-chan struct{}) bool {
	select {
	case <-ready:
		return true
	default:
		return ready == nil
	}
}

// read appends to dst the frames after cursor that one write takes, as
// replay.Log.Read does.
func (f *feed) read(cursor uint64, dst [][]byte) ([][]byte, uint64, bool, <-chan struct{}, error) {
	return f.log.Read(cursor, dst, maxFramesPerWrite, maxBytesPerWrite)
}

// pacer returns the feed's pacer for streams with a flush interval,
// started at the first call and ended with the feed.
func (f *feed) pacer(interval time.Duration) *pacer {
	f.mu.Lock()
	defer f.mu.Unlock()
	p := f.pacers[interval]
	if p == nil {
		p = newPacer(f.ctx, f.log, interval)
		if f.pacers == nil {
			f.pacers = make(map[time.Duration]*pacer)
		}
		f.pacers[interval] = p
	}
	return p
}

// closeWaits closes the log when the feed ends or Caddy exits, then every
// other channel a stream may wait on: ready and the pacers'. A stream that
// wakes then finds the log closed and ends, so that streams need not wait
// on the feed's context too.
func (f *feed) closeWaits() {
	f.log.Close()
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closeReady()
	for _, p := range f.pacers {
		p.stop()
	}
}

// oldest returns a cursor at the oldest retained event.
func (f *feed) oldest() uint64 {
	return f.log.Tail(f.log.Next(), math.MaxInt)
}

// markReady closes the ready channel if it is open.
func (f *feed) markReady() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closeReady()
}

// markReadyIf closes ready if it is still the feed's: the fallback of a
// document feed whose first poll since it started takes longer than
// readyWait.
func (f *feed) markReadyIf(ready chan struct{}) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if ready == f.ready {
		f.closeReady()
	}
}

// closeReady closes ready if it is open. f.mu must be held.
func (f *feed) closeReady() {
	f.stopReadyFallback()
	select {
	case <-f.ready:
	default:
		f.readyAt = f.log.Next()
		close(f.ready)
	}
}

// stopReadyFallback stops the timer that would close ready. f.mu must be
// held.
func (f *feed) stopReadyFallback() {
	if f.readyFallback != nil {
		f.readyFallback.Stop()
		f.readyFallback = nil
	}
}

// readyEnd returns the log's end when the feed last became ready.
func (f *feed) readyEnd() uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.readyAt
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
		stopped := gen == f.lingerGen && f.stopReader != nil
		if stopped {
			f.stopReader()
			f.stopReader = nil
			f.logger.Info("feed stopped: no subscribers", zap.Duration("linger", f.linger))
		}
		f.mu.Unlock()
		if stopped && f.idle != nil {
			f.idle(f)
		}
	})
}

// Destruct stops the reader and ends every stream of the feed. The usage
// pool calls it when the last config using the feed is cleaned up.
func (f *feed) Destruct() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.end("config unloaded")
	return nil
}

// end stops the reader and ends every stream of the feed, for reason.
// f.mu must be held.
func (f *feed) end(reason string) {
	if f.closed {
		return
	}
	f.closed = true
	f.cancel()
	f.lingerGen++
	f.stopReadyFallback()
	if f.stopReader != nil {
		f.stopReader()
		f.stopReader = nil
		f.logger.Info("feed stopped: " + reason)
	}
	f.log.Close()
	f.metrics.release()
	if f.shared != nil {
		done := f.readerDone
		go func() {
			if done != nil {
				<-done
			}
			_ = f.shared.store.Close()
		}()
	}
}

// Answered implements source.Sink. A good answer makes the feed ready: the
// source calls it after publishing what the answer brought. Any answer
// releases the subscribers that wait for the upstream's verdict. Where the upstream decides who
// may subscribe, a refusal ends the feed: its streams end, and the
// subscribers that reconnect get the refusal's status.
func (f *feed) Answered(status int) {
	f.mu.Lock()
	f.closeAnswered()
	if status >= 200 && status < 300 || status == http.StatusNotModified {
		f.closeReady()
	}
	refused := f.decides && refuses(status) && !f.closed
	if refused {
		f.refusal = status
		f.metrics.refused(status)
		f.end("refused by the upstream with " + strconv.Itoa(status))
	}
	f.mu.Unlock()
	if refused && f.idle != nil {
		f.idle(f)
	}
}

// closeAnswered closes answered if it is open. f.mu must be held.
func (f *feed) closeAnswered() {
	select {
	case <-f.answered:
	default:
		close(f.answered)
	}
}

// refuses tells whether an upstream answer refuses a per-request feed's
// subscribers: the credentials or the resource are not good, for good.
func refuses(status int) bool {
	switch status {
	case http.StatusUnauthorized, http.StatusForbidden, http.StatusNotFound, http.StatusGone:
		return true
	}
	return false
}

// verdict waits up to wait for the upstream's first answer and returns
// the status with which it refused the feed, or 0.
func (f *feed) verdict(ctx context.Context, wait time.Duration) int {
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-f.answered:
	case <-t.C:
	case <-ctx.Done():
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.refusal
}

// LastID implements source.Sink.
func (f *feed) LastID() string {
	f.publishMu.Lock()
	defer f.publishMu.Unlock()
	return f.lastID
}

// Publish implements source.Sink: it turns the values into frames and
// appends them all to the log in one step.
func (f *feed) Publish(values []json.RawMessage) {
	f.publishMu.Lock()
	defer f.publishMu.Unlock()
	frames := f.frames(values)
	if len(frames) == 0 {
		return
	}
	f.log.Append(frames...)
	f.published(frames)
}

// frames turns values into frames as the feed's kind says. f.publishMu
// must be held.
func (f *feed) frames(values []json.RawMessage) []replay.Frame {
	if len(values) == 0 {
		return nil
	}
	switch f.kind {
	case documentFeed:
		return f.documentFrames(values[0])
	case itemFeed:
		return f.itemFrames(values[0])
	default:
		return f.lineFrames(values)
	}
}

// published records frames that went into the log. f.publishMu must be
// held.
func (f *feed) published(frames []replay.Frame) {
	f.lastID = frames[len(frames)-1].ID
	f.metrics.events.Add(float64(len(frames)))
	if ce := f.logger.Check(zap.DebugLevel, "published"); ce != nil {
		ce.Write(zap.Int("events", len(frames)), zap.String("last_id", f.lastID))
	}
}

// documentFrames makes the one event of a changed document. A document is
// never recognised by its id: the source publishes only changes.
func (f *feed) documentFrames(doc json.RawMessage) []replay.Frame {
	ev, _, ok := f.toEvent(doc, false)
	if !ok {
		return nil
	}
	return []replay.Frame{f.frame(ev, "")}
}

// itemFrames makes an event of each element of the document's array that
// is neither in the last poll nor in the log, and remembers this poll's
// elements.
func (f *feed) itemFrames(doc json.RawMessage) []replay.Frame {
	elems, err := f.mapping.elements(doc)
	if err != nil {
		f.metrics.UpstreamError("mapping")
		f.logger.Warn("skipped a document", zap.Error(err))
		return nil
	}
	thisPoll := make(map[string]struct{}, len(elems))
	frames := make([]replay.Frame, 0, len(elems))
	for _, elem := range elems {
		ev, key, ok := f.toEvent(elem, true)
		if !ok {
			continue
		}
		_, inThisPoll := thisPoll[key]
		_, inLastPoll := f.lastPoll[key]
		thisPoll[key] = struct{}{}
		if inThisPoll || inLastPoll || f.log.HasKey(key) {
			continue
		}
		frames = append(frames, f.frame(ev, key))
	}
	f.lastPoll = thisPoll
	return frames
}

// lineFrames makes an event of each NDJSON line, skipping lines whose id
// was seen in this batch or is in the log.
func (f *feed) lineFrames(lines []json.RawMessage) []replay.Frame {
	batch := make(map[string]struct{})
	frames := make([]replay.Frame, 0, len(lines))
	for _, line := range lines {
		ev, key, ok := f.toEvent(line, false)
		if !ok {
			continue
		}
		if key != "" {
			if _, seen := batch[key]; seen || f.log.HasKey(key) {
				continue
			}
			batch[key] = struct{}{}
		}
		frames = append(frames, f.frame(ev, key))
	}
	return frames
}

// toEvent maps one element, logging and counting one that does not map.
func (f *feed) toEvent(elem json.RawMessage, byContent bool) (Event, string, bool) {
	ev, key, err := f.mapping.toEvent(elem, byContent)
	if err != nil {
		f.metrics.UpstreamError("mapping")
		f.logger.Warn("skipped an element", zap.Error(err))
		return ev, key, false
	}
	return ev, key, true
}

// frame encodes ev as a log frame recognised by key. An id a client could
// not send back is replaced by a generated one, and a type that cannot be
// written is dropped, each with a warning.
func (f *feed) frame(ev Event, key string) replay.Frame {
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
	return replay.Frame{ID: ev.ID, Key: key, Bytes: appendEvent(nil, ev)}
}

// Interface guards.
var (
	_ source.Sink      = (*feed)(nil)
	_ caddy.Destructor = (*feed)(nil)
	_ eventLog         = (*replay.Log)(nil)
)
