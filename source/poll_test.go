package source

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ssefeed/caddy-ssefeed/internal/ssetest"
)

// pollUpstream serves a document that the test changes, and records the
// requests it got.
type pollUpstream struct {
	*httptest.Server

	mu       sync.Mutex
	body     string
	header   http.Header // sent with each 200
	requests []*http.Request
}

func newPollUpstream(t *testing.T, body string) *pollUpstream {
	u := &pollUpstream{body: body, header: http.Header{}}
	u.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u.mu.Lock()
		defer u.mu.Unlock()
		u.requests = append(u.requests, r.Clone(context.Background()))
		if inm := r.Header.Get("If-None-Match"); inm != "" && inm == u.header.Get("ETag") {
			w.WriteHeader(http.StatusNotModified)
			return
		}
		if ims := r.Header.Get("If-Modified-Since"); ims != "" && ims == u.header.Get("Last-Modified") {
			w.WriteHeader(http.StatusNotModified)
			return
		}
		for name, values := range u.header {
			w.Header()[name] = values
		}
		w.Write([]byte(u.body))
	}))
	t.Cleanup(u.Close)
	return u
}

// set changes the document and the headers sent with it.
func (u *pollUpstream) set(body string, header ...string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.body = body
	u.header = http.Header{}
	for i := 0; i+1 < len(header); i += 2 {
		u.header.Set(header[i], header[i+1])
	}
}

// lastRequest returns the last request the upstream got.
func (u *pollUpstream) lastRequest(t *testing.T) *http.Request {
	t.Helper()
	u.mu.Lock()
	defer u.mu.Unlock()
	if len(u.requests) == 0 {
		t.Fatal("the upstream got no request")
	}
	return u.requests[len(u.requests)-1]
}

// poller is a Poll on a URL with its observer and sink, polled one request
// at a time by the test.
type poller struct {
	*Poll
	obs    *fakeObserver
	sink   *fakeSink
	client *http.Client
}

// newPoller returns a poller of rawURL with header.
func newPoller(t *testing.T, rawURL string, header map[string][]string) *poller {
	obs := &fakeObserver{}
	p := &Poll{Config: testConfig(t, rawURL, header, obs), Interval: 10 * time.Millisecond}
	return &poller{Poll: p, obs: obs, sink: newFakeSink(), client: p.newClient()}
}

// once makes one poll.
func (p *poller) once() error {
	return p.poll(context.Background(), p.client, p.sink)
}

// mustPoll makes one poll that must succeed.
func (p *poller) mustPoll(t *testing.T) {
	t.Helper()
	if err := p.once(); err != nil {
		t.Fatalf("poll: %v", err)
	}
}

// expectRequests fails the test unless the observer saw exactly these
// request results and error reasons.
func (p *poller) expectRequests(t *testing.T, requests []string, errs ...string) {
	t.Helper()
	gotRequests, gotErrors := p.obs.calls()
	if !slices.Equal(gotRequests, requests) || !slices.Equal(gotErrors, errs) {
		t.Fatalf("observed requests %q and errors %q, want %q and %q", gotRequests, gotErrors, requests, errs)
	}
}

func TestPollETag(t *testing.T) {
	u := newPollUpstream(t, `{"v":1}`)
	u.set(`{"v":1}`, "ETag", `"v1"`)
	p := newPoller(t, u.URL, nil)

	p.mustPoll(t)
	p.sink.expectBatch(t, `{"v":1}`)
	p.mustPoll(t)
	if got := u.lastRequest(t).Header.Get("If-None-Match"); got != `"v1"` {
		t.Fatalf("If-None-Match = %q, want the ETag", got)
	}
	p.sink.expectNothing(t)

	u.set(`{"v":2}`, "ETag", `"v2"`)
	p.mustPoll(t)
	p.sink.expectBatch(t, `{"v":2}`)
	p.expectRequests(t, []string{"ok", "not_modified", "ok"})
}

func TestPollLastModified(t *testing.T) {
	const modified = "Sun, 01 Jun 2025 12:00:00 GMT"
	u := newPollUpstream(t, "")
	u.set(`[1]`, "Last-Modified", modified)
	p := newPoller(t, u.URL, nil)

	p.mustPoll(t)
	p.sink.expectBatch(t, `[1]`)
	p.mustPoll(t)
	if got := u.lastRequest(t).Header.Get("If-Modified-Since"); got != modified {
		t.Fatalf("If-Modified-Since = %q, want %q", got, modified)
	}
	if got := u.lastRequest(t).Header.Get("If-None-Match"); got != "" {
		t.Fatalf("If-None-Match = %q without an ETag", got)
	}
	p.sink.expectNothing(t)
	p.expectRequests(t, []string{"ok", "not_modified"})
}

func TestPollWithoutValidators(t *testing.T) {
	u := newPollUpstream(t, `{"v":1}`)
	p := newPoller(t, u.URL, nil)

	p.mustPoll(t)
	p.sink.expectBatch(t, `{"v":1}`)
	p.mustPoll(t)
	p.sink.expectNothing(t)
	if r := u.lastRequest(t); r.Header.Get("If-None-Match") != "" || r.Header.Get("If-Modified-Since") != "" {
		t.Fatalf("validators sent that the upstream never gave: %v", r.Header)
	}

	u.set(`{"v":2}`)
	p.mustPoll(t)
	p.sink.expectBatch(t, `{"v":2}`)
	u.set(`{"v":1}`)
	p.mustPoll(t)
	p.sink.expectBatch(t, `{"v":1}`)
	p.expectRequests(t, []string{"ok", "ok", "ok", "ok"})
}

func TestPollFailures(t *testing.T) {
	tests := []struct {
		name    string
		handler http.HandlerFunc
		result  string
		reason  string
	}{
		{"non-2xx", func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, `{"error":"boom"}`, http.StatusInternalServerError)
		}, "error", ReasonStatus},
		{"invalid JSON", func(w http.ResponseWriter, r *http.Request) {
			w.Write([]byte(`{"v":`))
		}, "error", ReasonInvalidJSON},
		{"body over max_body", func(w http.ResponseWriter, r *http.Request) {
			w.Write([]byte(`"` + strings.Repeat("x", 1<<10) + `"`))
		}, "error", ReasonTooLarge},
		{"body cut short", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Length", "100")
			w.Write([]byte(`{"v":1}`))
		}, "error", ReasonRead},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := httptest.NewServer(tt.handler)
			defer srv.Close()
			p := newPoller(t, srv.URL, nil)
			if err := p.once(); err == nil {
				t.Fatal("poll succeeded")
			}
			p.sink.expectNothing(t)
			p.expectRequests(t, []string{tt.result}, tt.reason)
		})
	}
}

// TestPollHugeBody checks that a body far over max_body is not read to
// its end: the upstream would need the whole 50 MB to be read to finish.
func TestPollHugeBody(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		chunk := []byte(strings.Repeat("[", 1<<20))
		for range 50 {
			if _, err := w.Write(chunk); err != nil {
				return
			}
		}
	}))
	defer srv.Close()
	p := newPoller(t, srv.URL, nil)
	if err := p.once(); err == nil {
		t.Fatal("poll of a 50 MB body succeeded")
	}
	p.sink.expectNothing(t)
	p.expectRequests(t, []string{"error"}, ReasonTooLarge)
}

func TestPollRefusedConnection(t *testing.T) {
	p := newPoller(t, ssetest.ClosedURL(t), nil)
	if err := p.once(); err == nil {
		t.Fatal("poll succeeded")
	}
	p.sink.expectNothing(t)
	p.expectRequests(t, []string{"error"}, ReasonConnect)
}

func TestPollTimeout(t *testing.T) {
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	defer srv.Close()
	defer close(release)
	p := newPoller(t, srv.URL, nil)
	p.client.Timeout = 50 * time.Millisecond
	if err := p.once(); err == nil {
		t.Fatal("poll of an upstream that never answers succeeded")
	}
	p.sink.expectNothing(t)
	p.expectRequests(t, []string{"error"}, ReasonConnect)
}

func TestPollRetryAfter(t *testing.T) {
	date := time.Now().Add(5 * time.Minute).UTC().Format(http.TimeFormat)
	tests := []struct {
		status     int
		retryAfter string
		min, max   time.Duration
	}{
		{http.StatusTooManyRequests, "120", 120 * time.Second, 120 * time.Second},
		{http.StatusServiceUnavailable, date, 4 * time.Minute, 5 * time.Minute},
		{http.StatusServiceUnavailable, "86400", maxRetryAfter, maxRetryAfter},
		{http.StatusInternalServerError, "120", 0, 50 * time.Millisecond}, // only 429 and 503 carry it
	}
	for _, tt := range tests {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Retry-After", tt.retryAfter)
			w.WriteHeader(tt.status)
		}))
		p := newPoller(t, srv.URL, nil)
		err := p.once()
		srv.Close()
		if err == nil {
			t.Fatalf("%d: poll succeeded", tt.status)
		}
		if delay := p.Backoff.Delay(1, retryAfterOf(err)); delay < tt.min || delay > tt.max {
			t.Errorf("%d with Retry-After %q: delay %v, want within [%v, %v]", tt.status, tt.retryAfter, delay, tt.min, tt.max)
		}
		p.sink.expectNothing(t)
	}
}

func TestPollRedirect(t *testing.T) {
	target := newPollUpstream(t, `{"secret":true}`)
	mux := http.NewServeMux()
	mux.Handle("/elsewhere", http.RedirectHandler(target.URL+"/doc", http.StatusFound))
	mux.Handle("/moved", http.RedirectHandler("/doc", http.StatusMovedPermanently))
	mux.HandleFunc("/doc", func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte(`{"here":` + `"` + r.Header.Get("X-Key") + `"}`))
	})
	srv := httptest.NewServer(mux)
	defer srv.Close()

	key := map[string][]string{"X-Key": {"k"}}
	p := newPoller(t, srv.URL+"/elsewhere", key)
	if err := p.once(); !errors.Is(err, errRedirect) {
		t.Fatalf("redirect to another host: err = %v, want %v", err, errRedirect)
	}
	require.Equal(t, []sinkCall{answered(0)}, p.sink.takeCalls(), "a refused redirect is no answer")
	target.mu.Lock()
	if n := len(target.requests); n != 0 {
		t.Errorf("the other host got %d requests", n)
	}
	target.mu.Unlock()

	p = newPoller(t, srv.URL+"/moved", key)
	p.mustPoll(t)
	p.sink.expectBatch(t, `{"here":"k"}`)
}

func TestPollLastID(t *testing.T) {
	u := newPollUpstream(t, `[]`)
	p := newPoller(t, u.URL+"/items?since={sse_feed.last_id}", map[string][]string{"X-Since": {"{sse_feed.last_id}"}})

	p.mustPoll(t)
	if r := u.lastRequest(t); r.URL.RawQuery != "since=" || r.Header.Get("X-Since") != "" {
		t.Errorf("before any event: query %q, header %q; want both empty", r.URL.RawQuery, r.Header.Get("X-Since"))
	}
	p.sink.setLastID("a b&c")
	p.mustPoll(t)
	if r := u.lastRequest(t); r.URL.RawQuery != "since=a+b%26c" || r.Header.Get("X-Since") != "a+b%26c" {
		t.Errorf("query %q, header %q; want since=a+b%%26c and a+b%%26c", r.URL.RawQuery, r.Header.Get("X-Since"))
	}
}

// TestPollRun checks the loop: it polls at the interval, backs off after a
// failure, publishes again after recovery, and returns when ctx ends.
func TestPollRun(t *testing.T) {
	var mu sync.Mutex
	status := http.StatusOK
	body := `{"v":1}`
	requests := make(chan struct{}, 100)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		requests <- struct{}{}
		w.WriteHeader(status)
		w.Write([]byte(body))
	}))
	defer srv.Close()
	set := func(s int, b string) {
		mu.Lock()
		status, body = s, b
		mu.Unlock()
	}
	waitRequests := func(n int) {
		t.Helper()
		for range n {
			select {
			case <-requests:
			case <-time.After(5 * time.Second):
				t.Fatal("the poller stopped polling")
			}
		}
	}

	p := newPoller(t, srv.URL, nil)
	stop := start(t, p.Poll, p.sink)
	p.sink.expectBatch(t, `{"v":1}`)
	waitRequests(3)
	set(http.StatusBadGateway, "")
	waitRequests(3)
	set(http.StatusOK, `{"v":2}`)
	p.sink.expectBatch(t, `{"v":2}`)
	stop()
	p.sink.expectNothing(t)
	_, errs := p.obs.calls()
	if !slices.Contains(errs, ReasonStatus) {
		t.Errorf("errors %q, want a %q", errs, ReasonStatus)
	}
}

// TestPollRedirectToHTTP checks that a redirect from https to http on the
// same host and port is refused, so the headers never cross in clear, while
// a redirect on the same origin is followed with them.
func TestPollRedirectToHTTP(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("/clear", func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "http://"+r.Host+"/doc", http.StatusFound)
	})
	mux.Handle("/moved", http.RedirectHandler("/doc", http.StatusMovedPermanently))
	mux.HandleFunc("/doc", func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte(`{"here":"` + r.Header.Get("Authorization") + `"}`))
	})
	srv := httptest.NewTLSServer(mux)
	defer srv.Close()
	trust := srv.Client().Transport.(*http.Transport).TLSClientConfig

	for path, want := range map[string]error{"/clear": errRedirect, "/moved": nil} {
		p := newPoller(t, srv.URL+path, map[string][]string{"Authorization": {"Bearer k"}})
		p.client.Transport.(*http.Transport).TLSClientConfig = trust
		if err := p.once(); !errors.Is(err, want) {
			t.Fatalf("%s: err = %v, want %v", path, err, want)
		}
		if want == nil {
			p.sink.expectBatch(t, `{"here":"Bearer k"}`)
		}
	}
}

// TestPollState checks that a poller restored from another's state, passed
// through JSON, sends its validators and publishes nothing for the document
// the other published.
func TestPollState(t *testing.T) {
	u := newPollUpstream(t, "")
	u.set(`{"v":1}`, "ETag", `"v1"`, "Last-Modified", "Sun, 01 Jun 2025 12:00:00 GMT")
	first := newPoller(t, u.URL, nil)
	if got := first.State(); !reflect.DeepEqual(got, PollState{}) {
		t.Fatalf("state before any poll = %+v, want zero", got)
	}
	first.mustPoll(t)
	first.sink.expectBatch(t, `{"v":1}`)
	state := first.State()
	if state.ETag != `"v1"` || state.LastModified != "Sun, 01 Jun 2025 12:00:00 GMT" || len(state.BodyHash) == 0 {
		t.Fatalf("state after a poll = %+v", state)
	}
	data, err := json.Marshal(state)
	if err != nil {
		t.Fatal(err)
	}
	var restored PollState
	if err := json.Unmarshal(data, &restored); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(restored, state) {
		t.Fatalf("state through JSON %s = %+v, want %+v", data, restored, state)
	}

	second := newPoller(t, u.URL, nil)
	second.Restore(restored)
	restored.BodyHash[0]++ // the poller keeps its own copy
	second.mustPoll(t)
	r := u.lastRequest(t)
	if r.Header.Get("If-None-Match") != `"v1"` || r.Header.Get("If-Modified-Since") != state.LastModified {
		t.Fatalf("restored poller sent validators %q and %q", r.Header.Get("If-None-Match"), r.Header.Get("If-Modified-Since"))
	}
	require.Equal(t, []sinkCall{answered(http.StatusNotModified)}, second.sink.takeCalls())

	// Without validators, the body hash tells the document is the same.
	u.set(`{"v":1}`)
	third := newPoller(t, u.URL, nil)
	third.Restore(PollState{BodyHash: state.BodyHash})
	third.mustPoll(t)
	require.Equal(t, []sinkCall{answered(http.StatusOK)}, third.sink.takeCalls())
	if !reflect.DeepEqual(third.State(), PollState{BodyHash: state.BodyHash}) {
		t.Fatalf("state after an unchanged poll = %+v", third.State())
	}
	u.set(`{"v":2}`)
	third.mustPoll(t)
	third.sink.expectBatch(t, `{"v":2}`)
}

// TestPollSpread starts pollers together with Spread: each polls at once,
// then after the interval plus a random part of it, so that the second
// polls spread over the interval instead of coming all together.
func TestPollSpread(t *testing.T) {
	const pollers, interval = 12, 200 * time.Millisecond
	var mu sync.Mutex
	polled := map[string][]time.Time{} // by poller
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		polled[r.URL.Path] = append(polled[r.URL.Path], time.Now())
		mu.Unlock()
		w.Write([]byte(`[1]`))
	}))
	defer srv.Close()

	started := time.Now()
	for i := range pollers {
		c := testConfig(t, fmt.Sprintf("%s/%d", srv.URL, i), nil, &fakeObserver{})
		start(t, &Poll{Config: c, Interval: interval, Spread: true}, newFakeSink())
	}
	waitFor(t, func() bool {
		mu.Lock()
		defer mu.Unlock()
		for i := range pollers {
			if len(polled[fmt.Sprintf("/%d", i)]) < 2 {
				return false
			}
		}
		return true
	})
	mu.Lock()
	defer mu.Unlock()
	var gaps []time.Duration
	for path, times := range polled {
		require.Less(t, times[0].Sub(started), interval, "%s: first poll", path)
		gap := times[1].Sub(times[0])
		require.GreaterOrEqual(t, gap, interval, "%s: time to the second poll", path)
		require.Less(t, gap, 3*interval, "%s: time to the second poll", path)
		gaps = append(gaps, gap)
	}
	// Twelve draws in [0, interval) all fall within a quarter of it of
	// each other with a chance of about 2 in a million.
	require.GreaterOrEqual(t, slices.Max(gaps)-slices.Min(gaps), interval/4, "spread of the second polls: %v", gaps)
}
