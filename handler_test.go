package ssefeed

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/ssefeed/caddy-ssefeed/internal/ssetest"
	"github.com/ssefeed/caddy-ssefeed/replay"
)

// provision provisions h, a tail feed of its own named after the test with
// ids at /id and data at /d unless set, and cleans it up when the test
// ends.
func provision(t testing.TB, h *Handler) (cleanup func()) {
	t.Helper()
	if h.Tail == "" {
		h.Tail = ssetest.ClosedURL(t)
	}
	if h.ID == "" {
		h.ID = "/id"
	}
	if h.Data == "" {
		h.Data = "/d"
	}
	h.Name = t.Name()
	cleanup, err := provisionErr(t, h)
	if err != nil {
		t.Fatal(err)
	}
	return cleanup
}

// provisionErr provisions h as it is, in a Caddy context of its own that
// logs errors only (warnings, such as of a reader failing to connect, are
// expected). It returns the handler's cleanup, as Caddy runs it when a
// config is unloaded; it runs when the test ends unless the test ran it.
func provisionErr(t testing.TB, h *Handler) (cleanup func(), err error) {
	t.Helper()
	quiet := &caddy.Logging{Logs: map[string]*caddy.CustomLog{"default": {BaseLog: caddy.BaseLog{Level: "ERROR"}}}}
	base, err := caddy.ProvisionContext(&caddy.Config{Logging: quiet})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := caddy.NewContext(base)
	if err := h.Provision(ctx); err != nil {
		// Caddy cleans up a module whose provisioning failed.
		_ = h.Cleanup()
		cancel()
		return nil, err
	}
	cleanup = sync.OnceFunc(func() {
		if err := h.Cleanup(); err != nil {
			t.Error(err)
		}
		cancel()
	})
	t.Cleanup(cleanup)
	return cleanup, nil
}

// publishIDs hands the feed one element per id, with data "data of <id>", as
// its reader would.
func publishIDs(h *Handler, ids ...string) {
	values := make([]json.RawMessage, len(ids))
	for i, id := range ids {
		values[i], _ = json.Marshal(map[string]string{"id": id, "d": "data of " + id})
	}
	h.feed.Publish(values)
}

// serve serves h over HTTP as Caddy would, answering a handler error with
// its status code.
func serve(t *testing.T, h *Handler) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		caddyhttp.NewTestReplacer(r) // the request's placeholders
		var he caddyhttp.HandlerError
		if err := h.ServeHTTP(w, r, nil); errors.As(err, &he) {
			w.WriteHeader(he.StatusCode)
		}
	}))
	t.Cleanup(srv.Close)
	return srv
}

// expectPublishedIDs reads events and fails unless they are, in order, the
// events publishIDs made of want.
func expectPublishedIDs(t *testing.T, s *ssetest.Stream, want ...string) {
	t.Helper()
	for _, id := range want {
		ev := s.NextEvent(t)
		if ev.LastEventID != id || !ev.HasIDField || ev.Data != "data of "+id {
			t.Fatalf("event %#v, want id %q", ev, id)
		}
	}
}

func TestServeHTTPHeadersBeforeAnyEvent(t *testing.T) {
	h := &Handler{Heartbeat: -1}
	provision(t, h)
	srv := serve(t, h)
	s := ssetest.Open(t, srv.URL) // fails unless the headers come without an event
	for name, want := range map[string]string{
		"Content-Type":      "text/event-stream",
		"Cache-Control":     "no-cache",
		"X-Accel-Buffering": "no",
	} {
		if got := s.Response.Header.Get(name); got != want {
			t.Errorf("%s = %q, want %q", name, got, want)
		}
	}
	if s.Response.StatusCode != http.StatusOK || s.Response.ContentLength != -1 {
		t.Errorf("status %d, content length %d; want 200 and a stream", s.Response.StatusCode, s.Response.ContentLength)
	}
	publishIDs(h, "1")
	expectPublishedIDs(t, s, "1")
}

func TestServeHTTPMethodNotAllowed(t *testing.T) {
	h := &Handler{}
	provision(t, h)
	for _, method := range []string{http.MethodPost, http.MethodPut, http.MethodDelete} {
		w := httptest.NewRecorder()
		err := h.ServeHTTP(w, httptest.NewRequest(method, "/events", nil), nil)
		var he caddyhttp.HandlerError
		if !errors.As(err, &he) || he.StatusCode != http.StatusMethodNotAllowed {
			t.Errorf("%s: error %v, want 405", method, err)
		}
		if got := w.Header().Get("Allow"); got != "GET, HEAD" {
			t.Errorf("%s: Allow = %q", method, got)
		}
	}
}

func TestServeHTTPHeadGetsTheStreamHeaders(t *testing.T) {
	h := &Handler{}
	provision(t, h)
	w := httptest.NewRecorder()
	if err := h.ServeHTTP(w, httptest.NewRequest(http.MethodHead, "/events", nil), nil); err != nil {
		t.Fatal(err)
	}
	require.Equal(t, http.StatusOK, w.Code)
	require.Equal(t, "text/event-stream", w.Header().Get("Content-Type"))
	require.Equal(t, "no-cache", w.Header().Get("Cache-Control"))
	require.Zero(t, w.Body.Len(), "HEAD got a body")
	require.Zero(t, subscribers(h.feed), "HEAD subscribed to the feed")
}

func TestServeHTTPResumes(t *testing.T) {
	for _, tc := range []struct {
		name, query string
		header      []string
	}{
		{"header", "", []string{"Last-Event-ID", "2"}},
		{"lastEventId query", "?lastEventId=2", nil},
		{"last_event_id query", "?last_event_id=2", nil},
		{"header before query", "?lastEventId=1&last_event_id=1", []string{"Last-Event-ID", "2"}},
		{"lastEventId before last_event_id", "?lastEventId=2&last_event_id=1", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := &Handler{Heartbeat: -1}
			provision(t, h)
			srv := serve(t, h)
			publishIDs(h, "1", "2", "3", "4")
			s := ssetest.Open(t, srv.URL+tc.query, tc.header...)
			expectPublishedIDs(t, s, "3", "4")
			publishIDs(h, "5")
			expectPublishedIDs(t, s, "5")
		})
	}
}

func TestServeHTTPResumeHandOverHasNoGapOrDuplicate(t *testing.T) {
	h := &Handler{Heartbeat: -1}
	provision(t, h)
	srv := serve(t, h)
	publishIDs(h, "1", "2")
	const last = 300
	published := make(chan struct{})
	go func() {
		defer close(published)
		for i := 3; i <= last; i++ {
			publishIDs(h, strconv.Itoa(i))
		}
	}()
	s := ssetest.Open(t, srv.URL, "Last-Event-ID", "2")
	for i := 3; i <= last; i++ {
		expectPublishedIDs(t, s, strconv.Itoa(i))
	}
	<-published
}

func TestServeHTTPUnknownIDGetsResetThenRetained(t *testing.T) {
	for _, id := range []string{"gone", "zzzz-1", strings.Repeat("9", 128)} {
		t.Run(id[:min(len(id), 8)], func(t *testing.T) {
			h := &Handler{Heartbeat: -1, ResetEvent: "start_over"}
			provision(t, h)
			srv := serve(t, h)
			publishIDs(h, "a", "b")
			s := ssetest.Open(t, srv.URL, "Last-Event-ID", id)
			reset := s.NextEvent(t)
			var data struct {
				LastEventID string `json:"last_event_id"`
			}
			if reset.Type != "start_over" || reset.HasIDField || json.Unmarshal([]byte(reset.Data), &data) != nil || data.LastEventID != id {
				t.Fatalf("first event %#v, want the reset event naming %q", reset, id)
			}
			expectPublishedIDs(t, s, "a", "b")
			publishIDs(h, "c")
			expectPublishedIDs(t, s, "c")
		})
	}
}

func TestServeHTTPIDFromAnEarlierFeedIsUnknown(t *testing.T) {
	anonymous := []json.RawMessage{json.RawMessage(`{"d": "x"}`), json.RawMessage(`{"d": "y"}`)}
	earlier := &Handler{Heartbeat: -1}
	unload := provision(t, earlier)
	earlier.feed.Publish(anonymous)
	oldID := earlier.feed.LastID()
	unload()

	// The same config after a restart: a new feed numbers its ids afresh.
	h := &Handler{FeedConfig: FeedConfig{Tail: earlier.Tail}, Heartbeat: -1}
	provision(t, h)
	h.feed.Publish(anonymous)
	h.feed.Publish(anonymous)
	if h.feed == earlier.feed || h.feed.LastID() == oldID {
		t.Fatalf("the new feed's ids %q repeat the earlier feed's %q", h.feed.LastID(), oldID)
	}
	s := ssetest.Open(t, serve(t, h).URL, "Last-Event-ID", oldID)
	if reset := s.NextEvent(t); reset.Type != "reset" {
		t.Fatalf("first event %#v, want the reset event", reset)
	}
}

func TestServeHTTPResetWithNothingRetained(t *testing.T) {
	h := &Handler{Heartbeat: -1}
	provision(t, h)
	srv := serve(t, h)
	s := ssetest.Open(t, srv.URL+"?last_event_id=old")
	if reset := s.NextEvent(t); reset.Type != "reset" || reset.Data != `{"last_event_id":"old"}` {
		t.Fatalf("first event %#v, want the reset event", reset)
	}
	publishIDs(h, "x")
	expectPublishedIDs(t, s, "x")
}

func TestServeHTTPNeverWritesInvalidIDs(t *testing.T) {
	h := &Handler{Heartbeat: -1}
	provision(t, h)
	srv := serve(t, h)
	s := ssetest.Open(t, srv.URL)
	for _, id := range []string{"a\rb", "a\nb", "a\x00b", strings.Repeat("x", 129), "\xff", "ok"} {
		t.Run(fmt.Sprintf("%q", id[:min(len(id), 8)]), func(t *testing.T) {
			publishIDs(h, id)
			ev := s.NextEvent(t)
			switch {
			case ev.Data != normalisedData("data of "+id):
				t.Fatalf("event %#v is not the one published", ev)
			case !ev.HasIDField || !validID(ev.LastEventID):
				t.Fatalf("event %#v has no valid id", ev)
			case validID(id) && ev.LastEventID != id:
				t.Fatalf("event %#v lost its valid id %q", ev, id)
			case !utf8.ValidString(id) && ev.LastEventID == id:
				t.Fatalf("event %#v kept an invalid id", ev)
			case strings.ContainsAny(id, "\r\n\x00") || len(id) > maxIDLength:
				if !strings.HasPrefix(ev.LastEventID, h.feed.idPrefix) {
					t.Fatalf("event %#v has no generated id", ev)
				}
			}
		})
	}
}

// pipeResponse is a ResponseWriter whose body is read from a pipe, so that
// a test reads a stream as it is written without a network.
type pipeResponse struct {
	header http.Header
	body   *io.PipeWriter
}

func (p *pipeResponse) Header() http.Header         { return p.header }
func (p *pipeResponse) Write(b []byte) (int, error) { return p.body.Write(b) }
func (p *pipeResponse) WriteHeader(int)             {}
func (p *pipeResponse) Flush()                      {}

// FuzzLastEventID resumes from arbitrary ids, by header or query, on a feed
// holding a1, a2 and a3.
func FuzzLastEventID(f *testing.F) {
	h := &Handler{Heartbeat: -1, Initial: new(1)}
	provision(f, h)
	publishIDs(h, "a1", "a2", "a3")
	known := map[string]string{"a1": "a2", "a2": "a3", "": "a3"} // id -> first event

	f.Add("a1", false)
	f.Add("a2", true)
	f.Add("", false)
	f.Add("zzzz-1", false)
	f.Add(h.feed.idPrefix+"1", true)
	f.Add(strconv.FormatInt(time.Now().Add(-time.Hour).UnixNano(), 36)+"-1", false)
	f.Add("a\x00b", true)
	f.Add("a\rb\nc", true)
	f.Add("\xff\xfe\"}\n\ndata: x\n\n", false)
	f.Add(strings.Repeat("long", 1<<14), false)
	f.Fuzz(func(t *testing.T, id string, inQuery bool) {
		if id == "a3" {
			t.Skip("nothing follows the newest id")
		}
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		req := httptest.NewRequest(http.MethodGet, "/events", nil).WithContext(ctx)
		if inQuery {
			req.URL.RawQuery = "last_event_id=" + url.QueryEscape(id)
		} else {
			req.Header["Last-Event-Id"] = []string{id}
		}
		pr, pw := io.Pipe()
		served := make(chan error, 1)
		go func() {
			served <- h.ServeHTTP(&pipeResponse{header: make(http.Header), body: pw}, req, nil)
			pw.Close()
		}()
		stalled := time.AfterFunc(10*time.Second, func() { pr.CloseWithError(errors.New("stream stalled for 10s")) })
		defer stalled.Stop()
		var raw bytes.Buffer
		body := io.TeeReader(pr, &raw)
		r := ssetest.NewReader(body)

		ev, err := r.NextEvent()
		if err != nil {
			t.Fatalf("reading the first event: %v", err)
		}
		if want, ok := known[id]; ok {
			if ev.LastEventID != want {
				t.Fatalf("first event %#v, want %q", ev, want)
			}
		} else {
			var data map[string]string
			// The reset names the id, or for one longer than any issued its
			// first maxIDLength bytes; JSON carries each byte of invalid
			// UTF-8 as U+FFFD, so at most maxIDLength runes come back.
			echoed, named := "", string([]rune(id))
			if ev.Type == "reset" && json.Unmarshal([]byte(ev.Data), &data) == nil {
				echoed = data["last_event_id"]
			}
			if ev.Type != "reset" || utf8.RuneCountInString(echoed) > maxIDLength ||
				!strings.HasPrefix(named, echoed) || len(id) <= maxIDLength && echoed != named {
				t.Fatalf("first event of type %q echoes %.40q (%d bytes), want a reset naming %.40q (%d bytes)",
					ev.Type, echoed, len(echoed), id, len(id))
			}
			if ev, err := r.NextEvent(); err != nil || ev.LastEventID != "a1" {
				t.Fatalf("event after the reset %#v, %v; want a1", ev, err)
			}
		}
		cancel()
		_, _ = io.Copy(io.Discard, body)
		if err := <-served; err != nil {
			t.Fatalf("ServeHTTP: %v", err)
		}
		if !utf8.Valid(raw.Bytes()) || bytes.HasPrefix(raw.Bytes(), []byte("\uFEFF")) {
			t.Fatalf("stream is not UTF-8 without a BOM: %q", raw.Bytes())
		}
	})
}

func TestServeHTTPEvictedBeforeReadingGetsAResetNotADisconnect(t *testing.T) {
	h := &Handler{FeedConfig: FeedConfig{Replay: 3}, Heartbeat: -1}
	provision(t, h)
	s := ssetest.Open(t, serve(t, h).URL)
	// One burst larger than the log evicts the new subscriber's place
	// before it could write anything: it was never slow.
	publishIDs(h, "1", "2", "3", "4", "5", "6", "7", "8", "9", "10")
	reset := s.NextEvent(t)
	require.Equal(t, "reset", reset.Type)
	require.JSONEq(t, `{"last_event_id":""}`, reset.Data)
	expectPublishedIDs(t, s, "8", "9", "10")
	publishIDs(h, "11")
	expectPublishedIDs(t, s, "11")
	require.Zero(t, testutil.ToFloat64(h.feed.metrics.slowDisconnect))
}

func TestServeHTTPEvictedWhileWaitingGetsAResetNamingTheLastIDItGot(t *testing.T) {
	h := &Handler{FeedConfig: FeedConfig{Replay: 3}, Heartbeat: caddy.Duration(50 * time.Millisecond)}
	provision(t, h)
	s := ssetest.Open(t, serve(t, h).URL)
	publishIDs(h, "1")
	expectPublishedIDs(t, s, "1")
	// A heartbeat tells that the stream waits: a burst during its write
	// would find it busy, and slow.
	for !s.Next(t).IsComment {
	}
	publishIDs(h, "2", "3", "4", "5", "6", "7", "8", "9", "10")
	reset := s.NextEvent(t)
	require.Equal(t, "reset", reset.Type)
	require.JSONEq(t, `{"last_event_id":"1"}`, reset.Data, "a reset must name the last id the client got")
	expectPublishedIDs(t, s, "8", "9", "10")
	require.Zero(t, testutil.ToFloat64(h.feed.metrics.slowDisconnect))
}

func TestServeHTTPDoesNotWaitForARequestBody(t *testing.T) {
	// With the body unread the server cannot see the client leave; a
	// heartbeat's failed write tells the stream.
	h := &Handler{Heartbeat: caddy.Duration(50 * time.Millisecond)}
	provision(t, h)
	conn, err := net.Dial("tcp", serve(t, h).Listener.Addr().String())
	require.NoError(t, err)
	defer conn.Close()
	_, err = io.WriteString(conn, "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nthe body never ends")
	require.NoError(t, err)
	require.NoError(t, conn.SetReadDeadline(time.Now().Add(5*time.Second)))
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	require.NoError(t, err, "no response headers while the request body is unfinished")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Equal(t, "text/event-stream", resp.Header.Get("Content-Type"))
}

// flushCounter counts the flushes of the response it wraps.
type flushCounter struct {
	http.ResponseWriter
	flushes *atomic.Int64
}

func (w flushCounter) Flush() {
	w.flushes.Add(1)
	http.NewResponseController(w.ResponseWriter).Flush()
}

func (w flushCounter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// countingServer serves h with a response that counts its flushes.
func countingServer(t *testing.T, h *Handler) (*httptest.Server, *atomic.Int64) {
	var flushes atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_ = h.ServeHTTP(flushCounter{w, &flushes}, r, nil)
	}))
	t.Cleanup(srv.Close)
	return srv, &flushes
}

// twentyIDs returns the ids "0" to "19".
func twentyIDs() []string {
	ids := make([]string, 20)
	for i := range ids {
		ids[i] = strconv.Itoa(i)
	}
	return ids
}

func TestServeHTTPFlushesEveryEventByDefault(t *testing.T) {
	h := &Handler{Heartbeat: -1}
	provision(t, h)
	srv, flushes := countingServer(t, h)
	s := ssetest.Open(t, srv.URL)
	for _, id := range twentyIDs() {
		publishIDs(h, id)
		expectPublishedIDs(t, s, id)
	}
	require.Equal(t, int64(1+20), flushes.Load(), "the headers, then each event")
}

func TestServeHTTPFlushIntervalCoalesces(t *testing.T) {
	h := &Handler{Heartbeat: -1, FlushInterval: caddy.Duration(300 * time.Millisecond)}
	provision(t, h)
	srv, flushes := countingServer(t, h)
	s := ssetest.Open(t, srv.URL)
	ids := twentyIDs()
	for _, id := range ids {
		publishIDs(h, id)
	}
	expectPublishedIDs(t, s, ids...)
	// The headers, the first event at once, then the other nineteen,
	// which arrived within the interval, together.
	require.LessOrEqual(t, flushes.Load(), int64(3))
}

// recordingWriter records each Write and each write deadline set on it.
type recordingWriter struct {
	header    http.Header
	writes    [][]byte
	deadlines []time.Time
}

func (w *recordingWriter) Header() http.Header { return w.header }
func (w *recordingWriter) WriteHeader(int)     {}
func (w *recordingWriter) Flush()              {}

func (w *recordingWriter) Write(b []byte) (int, error) {
	w.writes = append(w.writes, bytes.Clone(b))
	return len(b), nil
}

func (w *recordingWriter) SetWriteDeadline(d time.Time) error {
	w.deadlines = append(w.deadlines, d)
	return nil
}

// recordedStream returns a stream of a new feed that writes to a recorder.
func recordedStream(t *testing.T) (*stream, *recordingWriter) {
	w := &recordingWriter{header: http.Header{}}
	f := newTestFeed(t, tailFeed, FeedConfig{}, replay.Limits{})
	return &stream{h: &Handler{}, f: f, w: w, rc: http.NewResponseController(w), ctx: context.Background()}, w
}

func TestStreamWriteJoinsFramesThatFit(t *testing.T) {
	small := []byte("data: a\n\n")
	half := bytes.Repeat([]byte("h"), joinBytes/2)
	large := bytes.Repeat([]byte("l"), joinBytes+1)
	for _, tc := range []struct {
		name   string
		buf    []byte
		frames [][]byte
		sizes  []int // of the writes, in order
	}{
		{"nothing", nil, nil, nil},
		{"stream bytes only", []byte(": heartbeat\n\n"), nil, []int{13}},
		{"stream bytes and small frames in one write", []byte("retry: 1\n\n"), [][]byte{small, small, small}, []int{10 + 3*len(small)}},
		{"a large frame alone, in order", nil, [][]byte{small, large, small}, []int{len(small), len(large), len(small)}},
		{"a large frame first", nil, [][]byte{large, small}, []int{len(large), len(small)}},
		{"split where the next frame would pass the bound", nil, [][]byte{half, half, small}, []int{joinBytes, len(small)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, w := recordedStream(t)
			s.buf = bytes.Clone(tc.buf)
			s.frames = append([][]byte(nil), tc.frames...)
			n, err := s.write()
			require.NoError(t, err)

			want := bytes.Join(append([][]byte{tc.buf}, tc.frames...), nil)
			require.Equal(t, len(want), n)
			require.Equal(t, string(want), string(bytes.Join(w.writes, nil)))
			var sizes []int
			for _, b := range w.writes {
				sizes = append(sizes, len(b))
			}
			require.Equal(t, tc.sizes, sizes)
			require.Empty(t, s.buf)
			require.Empty(t, s.frames)
		})
	}
}

func TestStreamSendMovesTheStallDeadlineOnlyWhenDue(t *testing.T) {
	s, w := recordedStream(t)
	for range 20 {
		s.buf = appendComment(s.buf, "x")
		require.True(t, s.send())
	}
	require.Len(t, w.deadlines, 1, "the first send's deadline still leaves more than stallTimeout - stallRearm")
	require.WithinDuration(t, time.Now().Add(stallTimeout), w.deadlines[0], stallRearm)

	s.deadline = time.Now().Add(stallTimeout - stallRearm - time.Millisecond)
	require.True(t, s.send())
	require.Len(t, w.deadlines, 2, "a deadline closer than stallTimeout - stallRearm was not moved")
}

func TestStreamSendOverHTTP2SetsAndClearsTheDeadlineEachTime(t *testing.T) {
	s, w := recordedStream(t)
	s.clearDeadline = true
	for range 3 {
		require.True(t, s.send())
	}
	require.Len(t, w.deadlines, 6)
	for i, d := range w.deadlines {
		require.Equal(t, i%2 == 1, d.IsZero(), "deadline %d", i)
	}
}

func TestStreamSendAfterTheFeedEndedWritesNothing(t *testing.T) {
	s, w := recordedStream(t)
	require.NoError(t, s.f.Destruct())
	s.buf = appendComment(s.buf, "x")
	require.False(t, s.send())
	require.Empty(t, w.writes)
}
