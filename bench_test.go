package ssefeed

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/ssefeed/caddy-ssefeed/replay"
)

// BenchmarkAppendEvent encodes a typical event into a reused buffer.
func BenchmarkAppendEvent(b *testing.B) {
	ev := Event{ID: "12345", Type: "update", Data: `{"id":"12345","price":101.5,"symbol":"ACME"}`}
	var buf []byte
	b.ReportAllocs()
	for b.Loop() {
		buf = appendEvent(buf[:0], ev)
	}
}

// discardWriter is a ResponseWriter that supports Flush and throws the
// bytes away. It calls flushed with the frames of frameLen bytes completed
// by each flush, when set.
type discardWriter struct {
	header   http.Header
	pending  int
	frameLen int
	flushed  func(frames int)
}

func (w *discardWriter) Header() http.Header         { return w.header }
func (w *discardWriter) WriteHeader(int)             {}
func (w *discardWriter) Write(p []byte) (int, error) { w.pending += len(p); return len(p), nil }

// SetWriteDeadline accepts the stall bound that every write sets, as a
// server's connection does.
func (w *discardWriter) SetWriteDeadline(time.Time) error { return nil }

func (w *discardWriter) Flush() {
	if w.flushed != nil && w.frameLen > 0 && w.pending >= w.frameLen {
		w.flushed(w.pending / w.frameLen)
		w.pending %= w.frameLen
	}
}

// benchHandler returns a provisioned-like handler of a tail feed whose
// upstream does not answer; the benchmarks publish to the feed directly.
func benchHandler(b *testing.B) *Handler {
	h := &Handler{FeedConfig: FeedConfig{Tail: "http://127.0.0.1:1/", ID: "/id", Linger: caddy.Duration(time.Hour)}}
	h.applyDefaults(false)
	h.logger = zap.NewNop()
	f, err := h.FeedConfig.newFeed(h.logger, nil, "", nil, nil)
	if err != nil {
		b.Fatal(err)
	}
	h.feed = f
	b.Cleanup(func() { _ = h.feed.Destruct() })
	return h
}

// BenchmarkStreamWrite is one subscriber's work per event: read the frame
// after its cursor from the log, write it and flush. It allocates nothing.
func BenchmarkStreamWrite(b *testing.B) {
	h := benchHandler(b)
	h.feed.log.Append(replay.Frame{ID: "1", Bytes: appendEvent(nil, Event{ID: "1", Data: `{"id":"1"}`})})
	w := &discardWriter{header: make(http.Header)}
	r, _ := http.NewRequest(http.MethodGet, "/events", nil)
	s := &stream{h: h, f: h.feed, w: w, rc: http.NewResponseController(w), ctx: r.Context()}
	s.heartbeat = time.NewTimer(time.Duration(h.Heartbeat))
	defer s.heartbeat.Stop()
	b.ReportAllocs()
	for b.Loop() {
		s.frames, _, _, _, _ = s.f.read(0, s.frames[:0])
		if !s.send() {
			b.Fatal("write failed")
		}
	}
}

// BenchmarkFanOut publishes one event to a feed with N subscribers, each
// served by ServeHTTP on a discarding writer, and waits until every one has
// written and flushed it. The cost per subscriber (ns/subscriber) should
// stay flat from 10 to 10,000 subscribers.
func BenchmarkFanOut(b *testing.B) {
	for _, n := range []int{10, 100, 1000, 10000} {
		b.Run(fmt.Sprintf("subscribers=%d", n), func(b *testing.B) {
			h := benchHandler(b)
			frameLen := len(appendEvent(nil, Event{ID: "1000000", Data: `{"id":"1000000"}`}))
			var delivered sync.WaitGroup
			ctx, cancel := context.WithCancel(context.Background())
			var served sync.WaitGroup
			for range n {
				w := &discardWriter{header: make(http.Header), frameLen: frameLen, flushed: func(k int) { delivered.Add(-k) }}
				r, _ := http.NewRequestWithContext(ctx, http.MethodGet, "/events", nil)
				served.Go(func() { _ = h.ServeHTTP(w, r, nil) })
			}
			for subscribers(h.feed) < n {
				time.Sleep(time.Millisecond)
			}
			time.Sleep(100 * time.Millisecond) // let every stream position its cursor
			values := make([]json.RawMessage, 1)
			cpu := processCPU()
			b.ReportAllocs()
			for i := 1000000; b.Loop(); i++ {
				values[0] = json.RawMessage(`{"id":"` + strconv.Itoa(i) + `"}`)
				delivered.Add(n)
				h.feed.Publish(values)
				delivered.Wait()
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(n), "ns/subscriber")
			b.ReportMetric(float64((processCPU()-cpu).Nanoseconds())/float64(b.N)/float64(n), "cpu-ns/subscriber")
			cancel()
			served.Wait()
		})
	}
}

// processCPU returns the CPU time the process has used, which unlike the
// elapsed time does not count the time other processes held the cores.
func processCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func subscribers(f *feed) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.subscribers
}
