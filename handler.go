package ssefeed

import (
	"errors"
	"math/rand/v2"
	"net/http"
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

// ServeHTTP serves one subscriber: it writes and flushes the headers at
// once, resumes from the Last-Event-ID if one came, then writes every event
// of the feed as it exists until the client leaves, the feed ends or Caddy
// exits.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	if r.Method != http.MethodGet {
		w.Header().Set("Allow", http.MethodGet)
		return caddyhttp.Error(http.StatusMethodNotAllowed, errors.New("event streams answer GET only"))
	}
	header := w.Header()
	header.Set("Content-Type", "text/event-stream")
	header.Set("Cache-Control", "no-cache")
	header.Set("X-Accel-Buffering", "no")
	header.Del("Content-Length")
	rc := http.NewResponseController(w)

	s := &stream{h: h, f: h.feed, w: w, rc: rc, r: r}
	if h.Retry > 0 {
		s.buf = appendRetry(s.buf, time.Duration(h.Retry))
	}
	lastID := lastEventID(r)
	wait, ok := h.feed.subscribe(h.MaxSubscribers, func() { s.cursor = s.start(lastID, h.feed.log.Next()) })
	if !ok {
		w.WriteHeader(http.StatusOK)
		base := max(time.Duration(h.Retry), overCapacityRetry)
		_, _ = w.Write(appendRetry(nil, base+rand.N(base)))
		return nil
	}
	defer h.feed.unsubscribe()
	w.WriteHeader(http.StatusOK)
	s.run(wait, lastID)
	return nil
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
	h  *Handler
	f  *feed
	w  http.ResponseWriter
	rc *http.ResponseController
	r  *http.Request

	cursor    uint64   // where the stream starts in the feed's log
	buf       []byte   // bytes of this stream only: retry, reset, heartbeat
	frames    [][]byte // scratch for the frames of one write
	heartbeat *time.Timer
}

// run flushes the headers and, when the feed was not ready at subscription,
// waits until wait is closed and positions the cursor. Then it writes frames
// as they are appended until the stream ends.
func (s *stream) run(wait <-chan struct{}, lastID string) {
	if s.h.Heartbeat > 0 {
		s.heartbeat = time.NewTimer(time.Duration(s.h.Heartbeat))
		defer s.heartbeat.Stop()
	}
	if !s.flush() {
		return
	}
	if wait != nil {
		if !s.await(wait, s.f.done) {
			return
		}
		s.cursor = s.start(lastID, s.f.readyEnd())
	}
	cursor := s.cursor
	for {
		var more bool
		var wake <-chan struct{}
		var err error
		s.frames, cursor, more, wake, err = s.f.log.Read(cursor, s.frames[:0], maxFramesPerWrite, maxBytesPerWrite)
		switch {
		case errors.Is(err, replay.ErrEvicted):
			s.f.metrics.slowDisconnect.Inc()
			s.f.logger.Info("disconnected a subscriber that fell behind the replay log",
				zap.String("remote", s.r.RemoteAddr))
			return
		case err != nil:
			return
		}
		if len(s.frames) > 0 {
			if !s.writeFrames() {
				return
			}
			if more {
				continue
			}
			if cap(s.frames) > keptFrames {
				s.frames = nil
			}
		} else if len(s.buf) > 0 && !s.flush() {
			// A reset event goes out at once, not with the next event.
			return
		}
		// The log closes, and so closes wake, when the feed ends: no need
		// to wait for f.done as well, which every subscriber shares.
		if !s.await(wake, nil) {
			return
		}
	}
}

// await waits until ch is closed, sending heartbeats meanwhile. It reports
// false when the stream must end instead: the client left, a heartbeat
// could not be written, done was closed or Caddy is exiting. A nil done is
// never closed; every case costs each waiting subscriber a lock at every
// wake-up, so only the cases that can matter are given.
func (s *stream) await(ch, done <-chan struct{}) bool {
	for {
		select {
		case <-ch:
			return true
		case <-s.heartbeatC():
			if !s.sendHeartbeat() {
				return false
			}
		case <-s.r.Context().Done():
			return false
		case <-s.h.stopping:
			return false
		case <-done:
			return false
		}
	}
}

// start returns the cursor where the stream begins, end being the log's end
// when the subscriber took its place. A known last id resumes right after
// it. An unknown one gets the reset event, then every retained event of an
// item feed or the latest document. No last id gets the initial count of
// newest events.
func (s *stream) start(lastID string, end uint64) uint64 {
	log := s.f.log
	log.Expire()
	if lastID == "" {
		return log.Tail(end, *s.h.Initial)
	}
	if cursor, ok := log.After(lastID); ok {
		s.f.metrics.resumeHit.Inc()
		return cursor
	}
	s.f.metrics.resumeReset.Inc()
	s.f.logger.Debug("unknown last event id; sending reset", zap.Int("id_length", len(lastID)))
	s.buf = appendReset(s.buf, s.h.ResetEvent, lastID)
	if s.f.kind == documentFeed {
		return log.Tail(end, 1)
	}
	return log.Tail(end, s.h.Replay)
}

// heartbeatC returns the heartbeat timer's channel, or nil when heartbeats
// are off, which blocks forever in a select.
func (s *stream) heartbeatC() <-chan time.Time {
	if s.heartbeat == nil {
		return nil
	}
	return s.heartbeat.C
}

// sendHeartbeat writes a heartbeat comment, or event if heartbeat_event is
// set, and flushes it.
func (s *stream) sendHeartbeat() bool {
	if s.h.HeartbeatEvent != "" {
		s.buf = appendEvent(s.buf, Event{Type: s.h.HeartbeatEvent})
	} else {
		s.buf = appendComment(s.buf, "heartbeat")
	}
	return s.flush()
}

// writeFrames writes the gathered frames after anything pending in buf,
// then flushes once.
func (s *stream) writeFrames() bool {
	n := 0
	for _, frame := range s.frames {
		if len(s.buf) > 0 {
			if !s.write(s.buf) {
				return false
			}
			n += len(s.buf)
			s.buf = s.buf[:0]
		}
		if !s.write(frame) {
			return false
		}
		n += len(frame)
	}
	s.f.metrics.bytes.Add(float64(n))
	return s.flush()
}

// flush writes what is pending in buf and flushes the response, then
// restarts the heartbeat timer. It reports whether the client is still
// there.
func (s *stream) flush() bool {
	if len(s.buf) > 0 {
		if !s.write(s.buf) {
			return false
		}
		s.f.metrics.bytes.Add(float64(len(s.buf)))
		s.buf = s.buf[:0]
	}
	if err := s.rc.Flush(); err != nil {
		return false
	}
	if s.heartbeat != nil {
		s.heartbeat.Reset(time.Duration(s.h.Heartbeat))
	}
	return true
}

func (s *stream) write(b []byte) bool {
	_, err := s.w.Write(b)
	return err == nil
}
