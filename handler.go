package ssefeed

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/ssefeed/caddy-ssefeed/replay"
)

// maxFramesPerWrite bounds the frames gathered for one write and flush, and
// so the per-subscriber scratch slice.
const maxFramesPerWrite = 256

// maxBytesPerWrite bounds the frame bytes gathered for one write, so that a
// subscriber blocked in a write holds at most this much of the replay log
// (one larger frame goes out alone).
const maxBytesPerWrite = 256 << 10

// keptFrames is the largest scratch slice a stream keeps between writes: a
// burst grows it, and an idle subscriber should not hold that memory.
const keptFrames = 64

// overCapacityRetry is the base of the jittered `retry:` sent to a
// subscriber turned away by max_subscribers when no retry is configured.
const overCapacityRetry = 3 * time.Second

// stallTimeout bounds how long one write and flush to a subscriber may
// take. A subscriber that stops reading is disconnected after it, so that
// it holds no frames the log has evicted for longer.
const stallTimeout = 10 * time.Second

// stallRearm is how much of stallTimeout a write may find used before the
// deadline is moved: a write is bounded by between stallTimeout -
// stallRearm and stallTimeout.
const stallRearm = time.Second

// joinBytes bounds the bytes copied into one buffer for one write. A
// subscriber blocked in a write holds at most this much of its own, beside
// the log's frames.
const joinBytes = 4 << 10

// joinPool holds the buffers of writes in progress.
var joinPool = sync.Pool{New: func() any {
	b := make([]byte, 0, joinBytes)
	return &b
}}

// ServeHTTP serves one subscriber: it writes and flushes the headers at
// once, resumes from the Last-Event-ID if one came, then writes every event
// of the feed as it exists until the client leaves, the feed ends or Caddy
// exits. HEAD gets the stream's headers only.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		return caddyhttp.Error(http.StatusMethodNotAllowed, errors.New("event streams answer GET and HEAD only"))
	}
	if r.Method == http.MethodHead {
		writeStreamHeader(w)
		return nil
	}
	rc := http.NewResponseController(w)
	if r.ContentLength != 0 {
		// An event stream reads no request body: its headers go out without
		// waiting for one, and it ends without draining one.
		_ = rc.EnableFullDuplex()
		defer func() { _ = rc.SetReadDeadline(time.Now()) }()
	}

	f, a, err := h.subscribe(r)
	if errors.Is(err, errOverCapacity) {
		writeStreamHeader(w)
		base := max(time.Duration(h.Retry), overCapacityRetry)
		_, _ = w.Write(appendRetry(nil, base+rand.N(base)))
		return nil
	}
	if err != nil {
		return err
	}
	defer f.unsubscribe()
	if f.decides {
		// The upstream's first answer tells whether this subscriber may
		// have the feed.
		if status := f.verdict(r.Context(), time.Duration(h.Timeout)); status != 0 {
			return caddyhttp.Error(status, fmt.Errorf("the upstream answered %d", status))
		}
	}
	writeStreamHeader(w)
	s := &stream{
		h:      h,
		f:      f,
		w:      w,
		rc:     rc,
		remote: r.RemoteAddr,
		ctx:    r.Context(),
		// An HTTP/2 write deadline resets the stream when it passes, even
		// with no write in flight.
		clearDeadline: r.ProtoMajor == 2,
	}
	if h.Retry > 0 {
		s.buf = appendRetry(s.buf, time.Duration(h.Retry))
	}
	// When the feed ends or Caddy exits, a write blocked on a client that
	// stopped reading ends at once too. Caddy's writers are not safe for
	// use from another goroutine; the one they wrap is.
	// The response must not be touched once ServeHTTP returned, so a cut
	// that has started is waited for.
	inner := http.NewResponseController(innermost(w))
	cut := make(chan struct{})
	stopCut := context.AfterFunc(f.ctx, func() {
		defer close(cut)
		_ = inner.SetWriteDeadline(time.Now())
	})
	defer func() {
		if !stopCut() {
			<-cut
		}
	}()
	s.run(a, lastEventID(r))
	return nil
}

// writeStreamHeader writes the header of an event stream with status 200.
// EventSource takes nothing else for a stream: a 200 of another type, like
// any other status, makes it give up for good.
func writeStreamHeader(w http.ResponseWriter) {
	header := w.Header()
	header.Set("Content-Type", "text/event-stream")
	header.Set("Cache-Control", "no-cache")
	header.Set("X-Accel-Buffering", "no")
	header.Del("Content-Length")
	w.WriteHeader(http.StatusOK)
}

// innermost returns the ResponseWriter at the bottom of the wrappers.
func innermost(w http.ResponseWriter) http.ResponseWriter {
	for {
		u, ok := w.(interface{ Unwrap() http.ResponseWriter })
		if !ok {
			return w
		}
		w = u.Unwrap()
	}
}

// lastEventID returns the id the client last saw: the Last-Event-ID header,
// else the lastEventId or last_event_id query parameter, for clients that
// cannot set headers.
func lastEventID(r *http.Request) string {
	if id := r.Header.Get("Last-Event-ID"); id != "" {
		return id
	}
	q := r.URL.Query()
	if id := q.Get("lastEventId"); id != "" {
		return id
	}
	return q.Get("last_event_id")
}

// stream is one subscriber's connection.
type stream struct {
	h      *Handler
	f      *feed
	w      http.ResponseWriter
	rc     *http.ResponseController
	remote string
	// ctx is the request's: it ends when the client leaves. The end of
	// the feed or of Caddy closes the channels the stream waits on.
	ctx           context.Context
	clearDeadline bool

	buf       []byte   // bytes of this stream only: retry, reset, heartbeat
	frames    [][]byte // scratch for the frames of one write
	heartbeat *time.Timer
	// deadline is the write deadline set last for the stall bound.
	deadline time.Time
	// lastSent is the id of the last event written, which a reset in the
	// stream names.
	lastSent []byte
}

// run flushes the headers, takes the subscriber's position in the feed
// (waiting for the upstream if the feed says so), then writes frames as
// they are appended until the stream ends.
func (s *stream) run(a admission, lastID string) {
	if s.h.Heartbeat > 0 {
		s.heartbeat = time.NewTimer(time.Duration(s.h.Heartbeat))
		defer s.heartbeat.Stop()
	}
	if !s.send() {
		return
	}
	pos, wait := s.f.join(a, lastID, *s.h.Initial)
	if wait != nil {
		if !s.await(wait) {
			return
		}
		pos, _ = s.f.join(a, lastID, *s.h.Initial)
	}
	if pos.reset {
		s.buf = appendReset(s.buf, s.h.ResetEvent, lastID)
	}
	cursor := pos.cursor
	var paced *pacer
	if s.h.FlushInterval > 0 {
		paced = s.f.pacer(time.Duration(s.h.FlushInterval))
	}
	// busy tells that frames were appended while the stream was writing:
	// a cursor evicted then was evicted because the stream was too slow.
	busy := false
	for {
		var more bool
		var wake, pacedWake <-chan struct{}
		var err error
		if paced != nil {
			// Taken before the read: a release after it is not missed.
			pacedWake = paced.next()
		}
		s.frames, cursor, more, wake, err = s.f.read(cursor, s.frames[:0])
		switch {
		case errors.Is(err, replay.ErrEvicted) && busy:
			s.f.metrics.slowDisconnect.Inc()
			s.f.logger.Info("disconnected a subscriber that fell behind the replay log",
				zap.String("remote", s.remote))
			return
		case errors.Is(err, replay.ErrEvicted):
			// Evicted while the stream waited, by a burst larger than the
			// log or a shared log's loss: the subscriber is owed a reset
			// that names the last id it got, not a disconnect.
			s.f.metrics.resumeReset.Inc()
			if s.lastSent != nil {
				lastID = string(s.lastSent)
			}
			s.buf = appendReset(s.buf, s.h.ResetEvent, lastID)
			cursor = s.f.oldest()
			continue
		case err != nil:
			return
		}
		wrote := len(s.frames) > 0
		if wrote {
			s.lastSent = append(s.lastSent[:0], frameID(s.frames[len(s.frames)-1])...)
		}
		if (wrote || len(s.buf) > 0) && !s.send() {
			return
		}
		if more {
			busy = true
			continue
		}
		if cap(s.frames) > keptFrames {
			s.frames = nil
		}
		if paced != nil {
			wake = pacedWake
		}
		select {
		case <-wake:
			busy = wrote
		default:
			busy = false
			// The log closes, and so closes wake, when the feed ends.
			if !s.await(wake) {
				return
			}
		}
	}
}

// await waits until ch is closed, sending heartbeats meanwhile. It reports
// false when the stream must end instead: the client left or a heartbeat
// could not be written. The end of the feed or of Caddy closes every
// channel a stream waits on, after the log, whose next read then ends the
// stream. Every case costs each waiting subscriber a lock at every
// wake-up, so only the cases that can matter are given: none is shared by
// the feed's streams but ch.
func (s *stream) await(ch <-chan struct{}) bool {
	for {
		select {
		case <-ch:
			return true
		case <-s.heartbeatC():
			if s.h.HeartbeatEvent != "" {
				s.buf = appendEvent(s.buf, Event{Type: s.h.HeartbeatEvent})
			} else {
				s.buf = appendComment(s.buf, "heartbeat")
			}
			if !s.send() {
				return false
			}
		case <-s.ctx.Done():
			return false
		}
	}
}

// heartbeatC returns the heartbeat timer's channel, or nil when heartbeats
// are off, which blocks forever in a select.
func (s *stream) heartbeatC() <-chan time.Time {
	if s.heartbeat == nil {
		return nil
	}
	return s.heartbeat.C
}

// send writes what is pending in buf, then the gathered frames, flushes
// once and restarts the heartbeat timer. It reports whether the client is
// still there; one that took longer than the stall bound is not, and is
// counted as slow.
func (s *stream) send() bool {
	if !s.armStallBound() {
		return false
	}
	n, err := s.write()
	s.f.metrics.bytes.Add(float64(n))
	if err == nil {
		err = s.rc.Flush()
	}
	if err != nil {
		// The request's context cannot tell a stall from a client that
		// left: net/http cancels it when a write to the connection fails.
		// Only the stall bound or the end of the feed sets a deadline.
		if errors.Is(err, os.ErrDeadlineExceeded) && s.f.ctx.Err() == nil {
			s.f.metrics.slowDisconnect.Inc()
			s.f.logger.Info("disconnected a subscriber that stopped reading",
				zap.String("remote", s.remote), zap.Duration("stalled", stallTimeout))
		}
		return false
	}
	if s.clearDeadline {
		_ = s.rc.SetWriteDeadline(time.Time{})
	}
	if s.heartbeat != nil {
		s.heartbeat.Reset(time.Duration(s.h.Heartbeat))
	}
	return true
}

// armStallBound sets the write deadline that bounds the next write and
// flush, unless the one set last still leaves at least stallTimeout -
// stallRearm: a stream that writes often moves it about once per
// stallRearm. It reports false when the feed has ended, whose cut of
// blocked writes the deadline would otherwise undo.
func (s *stream) armStallBound() bool {
	now := time.Now()
	if !s.clearDeadline && s.deadline.Sub(now) >= stallTimeout-stallRearm {
		return true
	}
	s.deadline = now.Add(stallTimeout)
	_ = s.rc.SetWriteDeadline(s.deadline)
	return s.f.ctx.Err() == nil
}

// write writes buf, then the frames, and empties both. Frames that fit are
// first copied after buf into one buffer, so that they pass Caddy's writers
// in one call: each call costs a deadline reset there. It returns the bytes
// written.
func (s *stream) write() (n int, err error) {
	joined := joinPool.Get().(*[]byte)
	b := append((*joined)[:0], s.buf...)
	s.buf = s.buf[:0]
	put := func(p []byte) {
		if err == nil && len(p) > 0 {
			var m int
			m, err = s.w.Write(p)
			n += m
		}
	}
	for i, frame := range s.frames {
		if len(b)+len(frame) > joinBytes {
			put(b)
			b = b[:0]
		}
		if len(frame) > joinBytes {
			put(frame)
		} else {
			b = append(b, frame...)
		}
		s.frames[i] = nil // hold no frame the log may evict
	}
	s.frames = s.frames[:0]
	put(b)
	if cap(b) <= joinBytes {
		*joined = b
	}
	joinPool.Put(joined)
	return n, err
}
