package integration

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ssefeed/caddy-ssefeed/internal/ssetest"
)

// Every stream is opened with ssetest.Get: read item by item in the
// background with openStream (ssetest.Open), many at once with
// openLiveStreams, or by the test itself with an ssetest.Reader. A client
// that connects and never reads is stalledClient.

// openStream opens a stream of path on the test site with the given headers
// (name, value pairs), read in the background.
func openStream(t *testing.T, path string, header ...string) *ssetest.Stream {
	t.Helper()
	return ssetest.Open(t, siteURL+path, header...)
}

// newStreamClient returns a client for many concurrent streams, closed
// with the test. Each stream has a connection of its own: one that the
// server ended is not reused, so that a reload closing idle connections
// cannot fail the next request.
func newStreamClient(t *testing.T) *http.Client {
	transport := &http.Transport{DisableKeepAlives: true}
	t.Cleanup(transport.CloseIdleConnections)
	return &http.Client{Transport: transport}
}

// sendAndExpect sends a line for each id, one at a time, and waits for its
// event, with its id and data, on every stream before sending the next. It
// returns how long each event took from its line to the last stream.
func sendAndExpect(t *testing.T, up *ndjsonUpstream, ids []string, streams ...*ssetest.Stream) []time.Duration {
	t.Helper()
	latencies := make([]time.Duration, len(ids))
	for i, id := range ids {
		sent := time.Now()
		up.Send(line(id, "text of "+id))
		for j, s := range streams {
			require.Equal(t, ssetest.Event{Type: "message", Data: "text of " + id, LastEventID: id, HasIDField: true},
				s.NextEvent(t), "stream %d", j)
		}
		latencies[i] = time.Since(sent)
	}
	return latencies
}

// expectStreamHeaders fails unless resp carries the event-stream headers.
func expectStreamHeaders(t *testing.T, resp *http.Response) {
	t.Helper()
	assert.Equal(t, http.StatusOK, resp.StatusCode, "status")
	for name, want := range map[string]string{
		"Content-Type":      "text/event-stream",
		"Cache-Control":     "no-cache",
		"X-Accel-Buffering": "no",
	} {
		assert.Equal(t, want, resp.Header.Get(name), name)
	}
}

// liveStream is one of many streams, read in the background.
type liveStream struct {
	last   atomic.Int64 // the last event id received
	ended  chan struct{}
	cancel context.CancelFunc
}

// openLiveStreams opens n streams of rawURL with client and reads them in
// the background until they end or the test does.
func openLiveStreams(t *testing.T, client *http.Client, rawURL string, n int) []*liveStream {
	t.Helper()
	return openLiveStreamsOf(t, client, slices.Repeat([]string{rawURL}, n))
}

// openLiveStreamsOf opens a stream of each URL with client, as
// openLiveStreams does.
func openLiveStreamsOf(t *testing.T, client *http.Client, urls []string) []*liveStream {
	t.Helper()
	streams := make([]*liveStream, len(urls))
	errs := make(chan error, len(urls))
	var opening sync.WaitGroup
	gate := make(chan struct{}, 32)
	for i := range streams {
		ctx, cancel := context.WithCancel(context.Background())
		s := &liveStream{ended: make(chan struct{}), cancel: cancel}
		streams[i] = s
		t.Cleanup(cancel)
		gate <- struct{}{}
		opening.Go(func() {
			defer func() { <-gate }()
			resp, err := ssetest.Get(ctx, client, urls[i])
			if err != nil {
				errs <- err
				close(s.ended)
				return
			}
			go s.read(resp)
		})
	}
	opening.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("opening a stream: %v", err)
	}
	return streams
}

func (s *liveStream) read(resp *http.Response) {
	defer close(s.ended)
	defer resp.Body.Close()
	r := ssetest.NewReader(resp.Body)
	for {
		item, err := r.Next()
		if err != nil {
			return
		}
		if item.Event != nil {
			id, _ := strconv.Atoi(item.Event.LastEventID)
			s.last.Store(int64(id))
		}
	}
}

// waitAllPast waits until every stream has received an id above id.
func waitAllPast(t *testing.T, streams []*liveStream, id int, within time.Duration) {
	t.Helper()
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		for i, s := range streams {
			last := s.last.Load()
			select {
			case <-s.ended:
				if last <= int64(id) {
					c.Errorf("stream %d ended at id %d, before one past %d", i, last, id)
					return
				}
			default:
			}
			if last <= int64(id) {
				c.Errorf("stream %d at id %d, not past %d", i, last, id)
				return
			}
		}
	}, within, 10*time.Millisecond)
}

// waitAllEnded waits until every stream has ended and returns how long it
// took.
func waitAllEnded(t *testing.T, streams []*liveStream, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	timeout := time.After(within)
	for i, s := range streams {
		select {
		case <-s.ended:
		case <-timeout:
			t.Fatalf("stream %d still open after %v", i, within)
		}
	}
	return time.Since(start)
}

// stalledClient opens a stream of path on the test site over a raw TCP
// connection with a tiny receive buffer and never reads it. The header
// comes as name, value pairs.
func stalledClient(t *testing.T, path string, header ...string) net.Conn {
	t.Helper()
	return stalledClientOf(t, siteURL+path, header...)
}

// stalledClientOf is stalledClient for any URL.
func stalledClientOf(t *testing.T, rawURL string, header ...string) net.Conn {
	t.Helper()
	u, err := url.Parse(rawURL)
	require.NoError(t, err)
	dialer := net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		var err error
		if cerr := c.Control(func(fd uintptr) {
			err = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096)
		}); cerr != nil {
			return cerr
		}
		return err
	}}
	conn, err := dialer.Dial("tcp", u.Host)
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	var req strings.Builder
	fmt.Fprintf(&req, "GET %s HTTP/1.1\r\nHost: %s\r\n", u.RequestURI(), u.Host)
	for i := 0; i+1 < len(header); i += 2 {
		fmt.Fprintf(&req, "%s: %s\r\n", header[i], header[i+1])
	}
	req.WriteString("\r\n")
	_, err = io.WriteString(conn, req.String())
	require.NoError(t, err)
	return conn
}

// mustAtoi returns the number s holds.
func mustAtoi(t *testing.T, s string) int {
	t.Helper()
	n, err := strconv.Atoi(s)
	require.NoError(t, err, "%q is not a number", s)
	return n
}
