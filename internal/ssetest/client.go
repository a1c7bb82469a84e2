package ssetest

import (
	"context"
	"io"
	"net"
	"net/http"
	"testing"
	"time"
)

// Stream is one client's event stream, read in the background so that a
// test can wait for each item with a timeout.
type Stream struct {
	// Response is the stream's response; its body is being read.
	Response *http.Response

	items  chan Item
	errs   chan error
	cancel context.CancelFunc
}

// Open GETs rawURL with the given header (name, value pairs) and starts
// reading its items. The response headers must come within 5s, whether or
// not there is any event yet. The stream is closed when the test ends.
func Open(t testing.TB, rawURL string, header ...string) *Stream {
	t.Helper()
	return OpenWith(t, http.DefaultClient, nil, rawURL, header...)
}

// OpenWith is Open through client. When decode is not nil it wraps the body,
// for example in a gzip reader, in the reading goroutine, so that it may
// block until the first bytes come.
func OpenWith(t testing.TB, client *http.Client, decode func(io.Reader) (io.Reader, error), rawURL string, header ...string) *Stream {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, rawURL, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	headerTimeout := time.AfterFunc(5*time.Second, cancel)
	resp, err := client.Do(req)
	if err != nil || !headerTimeout.Stop() {
		cancel()
		t.Fatalf("GET %s: no response headers within 5s: %v", rawURL, err)
	}
	s := &Stream{Response: resp, items: make(chan Item, 1024), errs: make(chan error, 1), cancel: cancel}
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer close(s.items)
		var body io.Reader = resp.Body
		if decode != nil {
			if body, err = decode(resp.Body); err != nil {
				s.errs <- err
				return
			}
		}
		r := NewReader(body)
		for {
			item, err := r.Next()
			if err != nil {
				s.errs <- err
				return
			}
			s.items <- item
		}
	}()
	t.Cleanup(func() {
		s.Close()
		<-done
	})
	return s
}

// Close hangs up.
func (s *Stream) Close() {
	s.cancel()
	s.Response.Body.Close()
}

// Next returns the next item, failing the test if none comes within 5s.
func (s *Stream) Next(t testing.TB) Item {
	t.Helper()
	select {
	case item, ok := <-s.items:
		if !ok {
			t.Fatalf("stream ended: %v", <-s.errs)
		}
		return item
	case <-time.After(5 * time.Second):
		t.Fatal("no item within 5s")
	}
	return Item{}
}

// NextEvent returns the next event, skipping comments and retry fields.
func (s *Stream) NextEvent(t testing.TB) Event {
	t.Helper()
	for {
		if item := s.Next(t); item.Event != nil {
			return *item.Event
		}
	}
}

// NextEvents returns the next n events, skipping comments and retry fields.
func (s *Stream) NextEvents(t testing.TB, n int) []Event {
	t.Helper()
	events := make([]Event, n)
	for i := range events {
		events[i] = s.NextEvent(t)
	}
	return events
}

// ExpectEnd waits for the server to end the stream.
func (s *Stream) ExpectEnd(t testing.TB, within time.Duration) {
	t.Helper()
	deadline := time.After(within)
	for {
		select {
		case _, ok := <-s.items:
			if !ok {
				return
			}
		case <-deadline:
			t.Fatalf("stream still open after %v", within)
		}
	}
}

// ExpectSilence fails if anything at all, even a comment, arrives within d
// or the stream ends.
func (s *Stream) ExpectSilence(t testing.TB, d time.Duration) {
	t.Helper()
	select {
	case item, ok := <-s.items:
		if !ok {
			t.Fatalf("stream ended: %v", <-s.errs)
		}
		t.Fatalf("unexpected item %+v", item)
	case <-time.After(d):
	}
}

// ExpectQuiet fails if an event arrives within d; comments are allowed.
func (s *Stream) ExpectQuiet(t testing.TB, d time.Duration) {
	t.Helper()
	deadline := time.After(d)
	for {
		select {
		case item, ok := <-s.items:
			if ok && item.Event != nil {
				t.Fatalf("unexpected event %+v", *item.Event)
			}
		case <-deadline:
			return
		}
	}
}

// ClosedURL returns a loopback URL on which nothing listens, for an upstream
// that refuses connections.
func ClosedURL(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return "http://" + addr + "/"
}
