package integration

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// watched is the state of a fake upstream, guarded by mu, that its handlers
// change and a test waits for: every change closes changed and replaces it.
type watched struct {
	mu      sync.Mutex
	changed chan struct{}
}

// notify wakes waitUntil; w.mu must be held.
func (w *watched) notify() {
	if w.changed != nil {
		close(w.changed)
	}
	w.changed = make(chan struct{})
}

// waitUntil waits until cond, called with w.mu held, reports done, and
// fails after within with the state cond describes.
func (w *watched) waitUntil(t *testing.T, within time.Duration, cond func() (done bool, state string)) {
	t.Helper()
	deadline := time.After(within)
	for {
		w.mu.Lock()
		done, state := cond()
		if w.changed == nil {
			w.changed = make(chan struct{})
		}
		changed := w.changed
		w.mu.Unlock()
		if done {
			return
		}
		select {
		case <-changed:
		case <-deadline:
			t.Fatalf("after %v: %s", within, state)
		}
	}
}

// ndjsonUpstream is an NDJSON endpoint the test writes lines to. Every
// connected client gets each line as it is sent, flushed at once.
type ndjsonUpstream struct {
	*httptest.Server
	watched

	clients  map[chan string]struct{}
	requests []*http.Request
}

func newNDJSONUpstream(t *testing.T) *ndjsonUpstream {
	u := &ndjsonUpstream{clients: make(map[chan string]struct{})}
	u.Server = httptest.NewServer(http.HandlerFunc(u.serve))
	t.Cleanup(func() {
		// The feed may still be connected, lingering, or reconnecting.
		u.Config.SetKeepAlivesEnabled(false)
		u.Listener.Close()
		u.Disconnect()
		u.CloseClientConnections()
		u.Close()
	})
	return u
}

func (u *ndjsonUpstream) serve(w http.ResponseWriter, r *http.Request) {
	lines := make(chan string, 1024)
	u.mu.Lock()
	u.clients[lines] = struct{}{}
	u.requests = append(u.requests, r.Clone(context.Background()))
	u.notify()
	u.mu.Unlock()
	defer func() {
		u.mu.Lock()
		delete(u.clients, lines)
		u.notify()
		u.mu.Unlock()
	}()
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	_ = rc.Flush()
	for {
		select {
		case line, ok := <-lines:
			if !ok {
				return
			}
			if _, err := io.WriteString(w, line); err != nil {
				return
			}
			if err := rc.Flush(); err != nil {
				return
			}
		case <-r.Context().Done():
			return
		}
	}
}

// Send writes raw bytes, normally whole lines, to every connected client.
func (u *ndjsonUpstream) Send(raw string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	for c := range u.clients {
		c <- raw
	}
}

// Disconnect ends every client's response.
func (u *ndjsonUpstream) Disconnect() {
	u.mu.Lock()
	defer u.mu.Unlock()
	for c := range u.clients {
		close(c)
		delete(u.clients, c)
	}
	u.notify()
}

// Requests returns the requests received so far.
func (u *ndjsonUpstream) Requests() []*http.Request {
	u.mu.Lock()
	defer u.mu.Unlock()
	return slices.Clone(u.requests)
}

// WaitConnected waits until exactly n clients are connected.
func (u *ndjsonUpstream) WaitConnected(t *testing.T, n int) {
	t.Helper()
	u.waitUntil(t, 10*time.Second, func() (bool, string) {
		return len(u.clients) == n, fmt.Sprintf("upstream has %d clients, want %d", len(u.clients), n)
	})
}

// line returns an NDJSON line with the given id and text body.
func line(id, body string) string {
	return fmt.Sprintf(`{"id":%q,"body":%q}`+"\n", id, body)
}

// jsonUpstream is a polled JSON API whose answer the test sets. It records
// every request with its answer, answers 304 to a request whose
// If-None-Match or If-Modified-Since matches the answer's ETag or
// Last-Modified, and can refuse connections for a while.
type jsonUpstream struct {
	URL  string
	addr string
	watched

	answer      func(r *http.Request) jsonAnswer
	server      *http.Server
	requests    []upstreamRequest
	inFlight    int
	maxInFlight int
}

// jsonAnswer is what a jsonUpstream answers.
type jsonAnswer struct {
	Status int // 0 means 200
	Body   string
	Header map[string]string
	// Delay holds the answer back, unless the client leaves first.
	Delay time.Duration
}

// upstreamRequest is one request a jsonUpstream received.
type upstreamRequest struct {
	Start, End time.Time
	// Host is the Host header; RequestURI the target of the request line,
	// as sent.
	Host, RequestURI string
	RawQuery         string
	Header           http.Header
	// Status is the status answered, or 0 when the client left first.
	Status int
}

func newJSONUpstream(t *testing.T, answer jsonAnswer) *jsonUpstream {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	u := &jsonUpstream{addr: ln.Addr().String()}
	u.URL = "http://" + u.addr
	u.Set(answer)
	u.serve(ln)
	t.Cleanup(u.Refuse)
	return u
}

func (u *jsonUpstream) serve(ln net.Listener) {
	server := &http.Server{Handler: u}
	u.server = server
	go func() { _ = server.Serve(ln) }()
}

// Set makes every later request get a.
func (u *jsonUpstream) Set(a jsonAnswer) {
	u.SetFunc(func(*http.Request) jsonAnswer { return a })
}

// SetFunc makes every later request get what answer returns; it is called
// with the upstream's lock held.
func (u *jsonUpstream) SetFunc(answer func(r *http.Request) jsonAnswer) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.answer = answer
}

// Refuse closes the listener and every connection: connecting is refused
// until Accept.
func (u *jsonUpstream) Refuse() {
	u.mu.Lock()
	server := u.server
	u.mu.Unlock()
	_ = server.Close()
}

// Accept listens again on the same address after Refuse.
func (u *jsonUpstream) Accept(t *testing.T) {
	t.Helper()
	ln, err := net.Listen("tcp", u.addr)
	require.NoError(t, err)
	u.mu.Lock()
	defer u.mu.Unlock()
	u.serve(ln)
}

func (u *jsonUpstream) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	req := upstreamRequest{
		Start: time.Now(), Host: r.Host, RequestURI: r.RequestURI, RawQuery: r.URL.RawQuery, Header: r.Header.Clone(),
	}
	u.mu.Lock()
	u.inFlight++
	u.maxInFlight = max(u.maxInFlight, u.inFlight)
	a := u.answer(r)
	u.mu.Unlock()

	req.Status = a.write(w, r)

	u.mu.Lock()
	defer u.mu.Unlock()
	u.inFlight--
	req.End = time.Now()
	u.requests = append(u.requests, req)
	u.notify()
}

// write sends the answer and returns its status, or 0 if the client left
// during the delay.
func (a jsonAnswer) write(w http.ResponseWriter, r *http.Request) int {
	if a.Delay > 0 {
		select {
		case <-time.After(a.Delay):
		case <-r.Context().Done():
			return 0
		}
	}
	status := a.Status
	if status == 0 {
		status = http.StatusOK
		etag, modified := a.Header["ETag"], a.Header["Last-Modified"]
		if etag != "" && r.Header.Get("If-None-Match") == etag ||
			modified != "" && r.Header.Get("If-Modified-Since") == modified {
			status = http.StatusNotModified
		}
	}
	for name, value := range a.Header {
		w.Header().Set(name, value)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	if status != http.StatusNotModified {
		_, _ = io.WriteString(w, a.Body)
	}
	return status
}

// Requests returns the requests answered so far, in the order they ended.
func (u *jsonUpstream) Requests() []upstreamRequest {
	u.mu.Lock()
	defer u.mu.Unlock()
	return slices.Clone(u.requests)
}

// MaxInFlight returns the most requests the upstream has served at once.
func (u *jsonUpstream) MaxInFlight() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.maxInFlight
}

// WaitRequests waits until at least n requests have been answered and
// returns them.
func (u *jsonUpstream) WaitRequests(t *testing.T, n int) []upstreamRequest {
	t.Helper()
	var requests []upstreamRequest
	u.waitUntil(t, 10*time.Second, func() (bool, string) {
		requests = slices.Clone(u.requests)
		return len(requests) >= n, fmt.Sprintf("upstream answered %d requests, want %d", len(requests), n)
	})
	return requests
}

// itemsDoc returns a JSON document whose "items" array holds an element
// {"id":"<id>","n":<id>} for each id, in the order given.
func itemsDoc(ids ...int) string {
	elems := make([]string, len(ids))
	for i, id := range ids {
		elems[i] = fmt.Sprintf(`{"id":"%d","n":%d}`, id, id)
	}
	return `{"items":[` + strings.Join(elems, ",") + `]}`
}

// numberedUpstream is an NDJSON upstream whose events are numbered 1, 2, 3,
// ... at a steady rate whether or not anyone reads them. A request resumes
// after the id in its since query parameter, or starts with the next event
// when since is empty, so a tail that sends {sse_feed.last_id} loses nothing
// across reconnects. On demand it cuts its connections, in the middle of a
// line or between lines, and answers 503 for a while.
type numberedUpstream struct {
	*httptest.Server
	padding string
	watched // changes with open

	produced  int
	born      []time.Time   // born[i] is when id i+1 was produced
	grew      chan struct{} // closed and replaced when produced grows
	cut       chan struct{} // closed and replaced to cut every connection
	failUntil time.Time
	maxLife   time.Duration // cut each connection at a random moment within it; 0: never
	open      int
	stats     numberedStats
}

// numberedStats counts what a numberedUpstream did.
type numberedStats struct {
	requests, refused, cuts int
}

// newNumberedUpstream starts an upstream producing one event every period,
// each line padded with padding bytes.
func newNumberedUpstream(t *testing.T, period time.Duration, padding int) *numberedUpstream {
	u := &numberedUpstream{
		padding: strings.Repeat("x", padding),
		grew:    make(chan struct{}),
		cut:     make(chan struct{}),
	}
	u.Server = httptest.NewServer(http.HandlerFunc(u.serve))
	done := make(chan struct{})
	go func() {
		tick := time.NewTicker(period)
		defer tick.Stop()
		for {
			select {
			case <-tick.C:
				u.mu.Lock()
				u.produced++
				u.born = append(u.born, time.Now())
				close(u.grew)
				u.grew = make(chan struct{})
				u.mu.Unlock()
			case <-done:
				return
			}
		}
	}()
	t.Cleanup(func() {
		close(done)
		u.Config.SetKeepAlivesEnabled(false)
		u.CutAll()
		u.CloseClientConnections()
		u.Close()
	})
	return u
}

// feedURL is the URL a tail reads, resuming after the feed's last id.
func (u *numberedUpstream) feedURL() string {
	return u.URL + "/stream?since={sse_feed.last_id}"
}

func (u *numberedUpstream) serve(w http.ResponseWriter, r *http.Request) {
	u.mu.Lock()
	u.stats.requests++
	if time.Now().Before(u.failUntil) {
		u.stats.refused++
		u.mu.Unlock()
		http.Error(w, "down for maintenance", http.StatusServiceUnavailable)
		return
	}
	next := u.produced + 1
	if since := r.URL.Query().Get("since"); since != "" {
		n, err := strconv.Atoi(since)
		if err != nil {
			u.mu.Unlock()
			http.Error(w, "bad since", http.StatusBadRequest)
			return
		}
		next = n + 1
	}
	var lifetime <-chan time.Time
	if u.maxLife > 0 {
		lifetime = time.After(rand.N(u.maxLife))
	}
	u.setOpen(+1)
	u.mu.Unlock()
	defer func() {
		u.mu.Lock()
		u.setOpen(-1)
		u.mu.Unlock()
	}()

	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	_ = rc.Flush()
	var buf []byte
	for {
		u.mu.Lock()
		produced, grew, cut := u.produced, u.grew, u.cut
		u.mu.Unlock()
		for buf = buf[:0]; next <= produced; next++ {
			buf = u.appendLine(buf, next)
		}
		if len(buf) > 0 {
			if _, err := w.Write(buf); err != nil {
				return
			}
			if rc.Flush() != nil {
				return
			}
		}
		select {
		case <-grew:
		case <-cut:
			u.abort(w, rc, next)
			return
		case <-lifetime:
			u.abort(w, rc, next)
			return
		case <-r.Context().Done():
			return
		}
	}
}

func (u *numberedUpstream) appendLine(buf []byte, id int) []byte {
	return fmt.Appendf(buf, `{"id":"%d","n":%d,"pad":"%s"}`+"\n", id, id, u.padding)
}

// abort cuts the connection: half the time it writes half of the next line
// and aborts, so the feed must not take a truncated line for an event;
// else it returns, and the caller ends the response cleanly between lines.
func (u *numberedUpstream) abort(w http.ResponseWriter, rc *http.ResponseController, next int) {
	u.mu.Lock()
	u.stats.cuts++
	u.mu.Unlock()
	if rand.N(2) == 0 {
		return
	}
	line := u.appendLine(nil, next)
	_, _ = w.Write(line[:len(line)/2])
	_ = rc.Flush()
	panic(http.ErrAbortHandler)
}

// setOpen changes the count of open connections; u.mu must be held.
func (u *numberedUpstream) setOpen(delta int) {
	u.open += delta
	u.notify()
}

// CutAll cuts every open connection.
func (u *numberedUpstream) CutAll() {
	u.mu.Lock()
	defer u.mu.Unlock()
	close(u.cut)
	u.cut = make(chan struct{})
}

// FailFor answers 503 to every request for d.
func (u *numberedUpstream) FailFor(d time.Duration) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.failUntil = time.Now().Add(d)
}

// CutWithin makes each later connection end at a random moment within d;
// 0 turns that off.
func (u *numberedUpstream) CutWithin(d time.Duration) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.maxLife = d
}

// Produced returns the highest id produced so far.
func (u *numberedUpstream) Produced() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.produced
}

// Born returns when id was produced.
func (u *numberedUpstream) Born(id int) time.Time {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.born[id-1]
}

// Stats returns the counts so far.
func (u *numberedUpstream) Stats() numberedStats {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.stats
}

// WaitOpen waits until exactly n connections are open.
func (u *numberedUpstream) WaitOpen(t *testing.T, n int, within time.Duration) {
	t.Helper()
	u.waitUntil(t, within, func() (bool, string) {
		return u.open == n, fmt.Sprintf("upstream has %d open connections, want %d", u.open, n)
	})
}

// newFuncUpstream serves handler on a test server closed with the test.
func newFuncUpstream(t *testing.T, handler http.HandlerFunc) *httptest.Server {
	srv := httptest.NewServer(handler)
	t.Cleanup(func() {
		srv.CloseClientConnections()
		srv.Close()
	})
	return srv
}

// writeNDJSON writes and flushes lines as an NDJSON response.
func writeNDJSON(w http.ResponseWriter, lines ...string) {
	w.Header().Set("Content-Type", "application/x-ndjson")
	for _, line := range lines {
		_, _ = io.WriteString(w, line+"\n")
	}
	_ = http.NewResponseController(w).Flush()
}
