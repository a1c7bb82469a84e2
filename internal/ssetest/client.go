package ssetest

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
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

// Get opens a stream: it GETs rawURL with client and the given header
// (name, value pairs; a pair with an empty value is left out, as
// EventSource leaves out an empty Last-Event-ID) and returns the response
// once its headers are in. A status other than 200 is an error. The body is
// for the caller to read, with a Reader, and to close; ending ctx ends the
// stream.
func Get(ctx context.Context, client *http.Client, rawURL string, header ...string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, rawURL, nil)
	if err != nil {
		return nil, err
	}
	for i := 0; i+1 < len(header); i += 2 {
		if header[i+1] != "" {
			req.Header.Set(header[i], header[i+1])
		}
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		return nil, fmt.Errorf("GET %s: status %d", rawURL, resp.StatusCode)
	}
	return resp, nil
}

// Open opens a stream with Get and starts reading its items in the
// background. The response headers must come within 5s, whether or not
// there is any event yet. The stream is closed when the test ends.
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
	headerTimeout := time.AfterFunc(5*time.Second, cancel)
	resp, err := Get(ctx, client, rawURL, header...)
	if !headerTimeout.Stop() && err == nil {
		resp.Body.Close()
		err = context.DeadlineExceeded
	}
	if err != nil {
		cancel()
		t.Fatalf("opening a stream of %s (headers due within 5s): %v", rawURL, err)
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

// ExpectIDs reads len(want) events and fails as soon as one has no id
// field or the ids so far differ from want.
func (s *Stream) ExpectIDs(t testing.TB, want ...string) {
	t.Helper()
	s.expectEach(t, "ids", want, func(ev Event) string {
		if !ev.HasIDField {
			t.Fatalf("event without an id field: %+v", ev)
		}
		return ev.LastEventID
	})
}

// ExpectData reads len(want) events and fails as soon as their data so far
// differ from want.
func (s *Stream) ExpectData(t testing.TB, want ...string) {
	t.Helper()
	s.expectEach(t, "data", want, func(ev Event) string { return ev.Data })
}

// expectEach reads len(want) events and compares field of each, in order,
// as it arrives.
func (s *Stream) expectEach(t testing.TB, what string, want []string, field func(Event) string) {
	t.Helper()
	got := make([]string, 0, len(want))
	for range want {
		ev := s.NextEvent(t)
		got = append(got, field(ev))
		require.Equal(t, want[:len(got)], got, "%s of the events so far; the last is %+v", what, ev)
	}
}

// ExpectComments reads until n comments, such as heartbeats, have come, and
// fails if an event comes first.
func (s *Stream) ExpectComments(t testing.TB, n int) {
	t.Helper()
	for n > 0 {
		item := s.Next(t)
		if item.Event != nil {
			t.Fatalf("event %+v while waiting for comments", *item.Event)
		}
		if item.IsComment {
			n--
		}
	}
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
