package ssefeed_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"

	_ "github.com/ssefeed/caddy-ssefeed"
	"github.com/ssefeed/caddy-ssefeed/internal/ssetest"
)

// The integration tests run Caddy in this process through caddytest, on its
// fixed admin port 2999 and HTTP port 9080, so they must not run in
// parallel, and every caddytest test lives in this package.
const siteURL = "http://localhost:9080"

// startCaddy loads a Caddyfile made of the test ports' global options and
// the given site body for localhost:9080.
func startCaddy(t *testing.T, site string) *caddytest.Tester {
	t.Helper()
	tester := caddytest.NewTester(t)
	tester.InitServer(caddyfile(site), "caddyfile")
	return tester
}

// caddyfile returns a whole Caddyfile for the test ports around site.
func caddyfile(site string) string {
	return fmt.Sprintf(`{
	admin localhost:2999
	http_port 9080
	https_port 9443
	grace_period 1s
	skip_install_trust
}
%s:9080 {
%s
}
`, "http://localhost", site)
}

// ndjsonUpstream is an NDJSON endpoint the test writes lines to. Every
// connected client gets each line as it is sent, flushed at once.
type ndjsonUpstream struct {
	*httptest.Server

	mu       sync.Mutex
	clients  map[chan string]struct{}
	requests []*http.Request
	changed  chan struct{}
}

func newNDJSONUpstream(t *testing.T) *ndjsonUpstream {
	u := &ndjsonUpstream{clients: make(map[chan string]struct{}), changed: make(chan struct{})}
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

// notify wakes waitFor; u.mu must be held.
func (u *ndjsonUpstream) notify() {
	close(u.changed)
	u.changed = make(chan struct{})
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
	return append([]*http.Request(nil), u.requests...)
}

// WaitConnected waits until exactly n clients are connected.
func (u *ndjsonUpstream) WaitConnected(t *testing.T, n int) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		u.mu.Lock()
		count, changed := len(u.clients), u.changed
		u.mu.Unlock()
		if count == n {
			return
		}
		select {
		case <-changed:
		case <-deadline:
			t.Fatalf("upstream has %d clients, want %d", count, n)
		}
	}
}

// jsonUpstream is a polled JSON API whose answer the test sets. It records
// every request with its answer, answers 304 to a request whose
// If-None-Match or If-Modified-Since matches the answer's ETag or
// Last-Modified, and can refuse connections for a while.
type jsonUpstream struct {
	URL  string
	addr string

	mu          sync.Mutex
	answer      func(r *http.Request) jsonAnswer
	server      *http.Server
	requests    []upstreamRequest
	inFlight    int
	maxInFlight int
	changed     chan struct{}
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
	RawQuery   string
	Header     http.Header
	// Status is the status answered, or 0 when the client left first.
	Status int
}

func newJSONUpstream(t *testing.T, answer jsonAnswer) *jsonUpstream {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u := &jsonUpstream{addr: ln.Addr().String(), changed: make(chan struct{})}
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
	if err != nil {
		t.Fatal(err)
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	u.serve(ln)
}

func (u *jsonUpstream) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	req := upstreamRequest{Start: time.Now(), RawQuery: r.URL.RawQuery, Header: r.Header.Clone()}
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
	close(u.changed)
	u.changed = make(chan struct{})
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
	return append([]upstreamRequest(nil), u.requests...)
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
	deadline := time.After(10 * time.Second)
	for {
		u.mu.Lock()
		requests, changed := append([]upstreamRequest(nil), u.requests...), u.changed
		u.mu.Unlock()
		if len(requests) >= n {
			return requests
		}
		select {
		case <-changed:
		case <-deadline:
			t.Fatalf("upstream answered %d requests, want %d", len(requests), n)
		}
	}
}

// openStream GETs path on the test site with the given headers (name,
// value pairs) and starts reading its items.
func openStream(t *testing.T, path string, header ...string) *ssetest.Stream {
	t.Helper()
	return ssetest.Open(t, siteURL+path, header...)
}
