package ssefeed

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/ssefeed/caddy-ssefeed/internal/ssetest"
)

// userUpstream answers each request with a document naming the user of
// its Cookie and a version, or with the status set for that user. It
// records the requests' paths and users.
type userUpstream struct {
	*httptest.Server
	mu       sync.Mutex
	status   map[string]int
	version  int
	requests []*http.Request
}

func newUserUpstream(t *testing.T) *userUpstream {
	u := &userUpstream{status: make(map[string]int)}
	u.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u.mu.Lock()
		defer u.mu.Unlock()
		u.requests = append(u.requests, r)
		user := r.Header.Get("Cookie")
		if status := u.status[user]; status != 0 {
			w.WriteHeader(status)
			return
		}
		fmt.Fprintf(w, `{"user":%q,"version":%d}`, user, u.version)
	}))
	t.Cleanup(u.Close)
	return u
}

// answer makes the upstream answer user's requests with status.
func (u *userUpstream) answer(user string, status int) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.status[user] = status
}

// bump changes every user's document.
func (u *userUpstream) bump() {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.version++
}

// paths returns the raw paths the upstream was asked for.
func (u *userUpstream) paths() []string {
	u.mu.Lock()
	defer u.mu.Unlock()
	var paths []string
	for _, r := range u.requests {
		paths = append(paths, r.URL.EscapedPath())
	}
	return paths
}

// perRequestHandler provisions a document feed polling up every 20ms with
// the subscriber's Cookie, at path, which may hold request placeholders.
func perRequestHandler(t *testing.T, up *userUpstream, path string, configure func(*Handler)) *Handler {
	t.Helper()
	h := &Handler{
		FeedConfig: FeedConfig{
			Poll: up.URL + path, Interval: caddy.Duration(20 * time.Millisecond),
			Header: map[string][]string{"Cookie": {"{http.request.header.Cookie}"}},
			Linger: caddy.Duration(10 * time.Millisecond), Name: t.Name(),
		},
		Heartbeat: -1,
	}
	if configure != nil {
		configure(h)
	}
	_, err := provisionErr(t, h)
	require.NoError(t, err)
	require.NotNil(t, h.set, "a handler with request placeholders has per-request feeds")
	return h
}

// liveFeeds returns how many per-request feeds h has.
func liveFeeds(h *Handler) int {
	h.set.mu.Lock()
	defer h.set.mu.Unlock()
	return len(h.set.live)
}

// get sends a GET with the given cookie and returns the response.
func get(t *testing.T, url, cookie string) *http.Response {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	require.NoError(t, err)
	req.Header.Set("Cookie", cookie)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	t.Cleanup(func() { resp.Body.Close() })
	return resp
}

func TestPerRequestFeedsKeepUsersApart(t *testing.T) {
	up := newUserUpstream(t)
	h := perRequestHandler(t, up, "/status", nil)
	srv := serve(t, h)
	alice := ssetest.Open(t, srv.URL, "Cookie", "alice")
	aliceAgain := ssetest.Open(t, srv.URL, "Cookie", "alice")
	bob := ssetest.Open(t, srv.URL, "Cookie", "bob")
	require.Equal(t, 2, liveFeeds(h), "two tabs of one user share a feed; two users do not")

	for range 3 {
		a, a2, b := alice.NextEvent(t), aliceAgain.NextEvent(t), bob.NextEvent(t)
		require.Contains(t, a.Data, `"user":"alice"`)
		require.Equal(t, a, a2, "two tabs of one user see the same events")
		require.Contains(t, b.Data, `"user":"bob"`)
		up.bump()
	}
}

func TestPerRequestUpstreamDecidesWhoMaySubscribe(t *testing.T) {
	up := newUserUpstream(t)
	up.answer("mallory", http.StatusUnauthorized)
	h := perRequestHandler(t, up, "/status", nil)
	srv := serve(t, h)

	resp := get(t, srv.URL, "mallory")
	require.Equal(t, http.StatusUnauthorized, resp.StatusCode)
	require.NotEqual(t, "text/event-stream", resp.Header.Get("Content-Type"))

	alice := ssetest.Open(t, srv.URL, "Cookie", "alice")
	bob := ssetest.Open(t, srv.URL, "Cookie", "bob")
	require.Contains(t, alice.NextEvent(t).Data, "alice")
	require.Contains(t, bob.NextEvent(t).Data, "bob")

	// Alice's session is revoked: her stream ends, and she gets 403 when
	// she comes back. Bob's stream goes on.
	up.answer("alice", http.StatusForbidden)
	alice.ExpectEnd(t, 5*time.Second)
	require.Equal(t, 1.0, testutil.ToFloat64(metricUpstreamRefusals.WithLabelValues(h.Name, "401")))
	require.Equal(t, 1.0, testutil.ToFloat64(metricUpstreamRefusals.WithLabelValues(h.Name, "403")))
	require.Equal(t, http.StatusForbidden, get(t, srv.URL, "alice").StatusCode)
	up.bump()
	require.Contains(t, bob.NextEvent(t).Data, `"version":1`)
}

func TestPerRequestFailingUpstreamStillStreams(t *testing.T) {
	up := newUserUpstream(t)
	up.answer("alice", http.StatusServiceUnavailable)
	h := perRequestHandler(t, up, "/status", func(h *Handler) { h.Heartbeat = caddy.Duration(20 * time.Millisecond) })
	alice := ssetest.Open(t, serve(t, h).URL, "Cookie", "alice")
	require.Equal(t, http.StatusOK, alice.Response.StatusCode)
	for item := alice.Next(t); !item.IsComment; item = alice.Next(t) {
		require.Nil(t, item.Event, "an event while the upstream fails")
	}
	up.answer("alice", 0)
	for {
		if item := alice.Next(t); item.Event != nil {
			require.Contains(t, item.Event.Data, "alice")
			return
		}
	}
}

func TestPerRequestValuesAreEscapedOrRefused(t *testing.T) {
	up := newUserUpstream(t)
	h := perRequestHandler(t, up, "/orders/{http.request.uri.query.order}/status", nil)
	srv := serve(t, h)
	for _, bad := range []string{"..", ".", ""} {
		resp, err := http.Get(srv.URL + "/?order=" + bad)
		require.NoError(t, err)
		resp.Body.Close()
		require.Equal(t, http.StatusBadRequest, resp.StatusCode, "order %q", bad)
		require.NotEqual(t, "text/event-stream", resp.Header.Get("Content-Type"), "a 400 posing as a stream")
	}
	require.Empty(t, up.paths(), "a refused value reached the upstream")

	// The value "%2F../?a=b#x" stays one path segment.
	ssetest.Open(t, srv.URL+"/?order=%252F..%2F%3Fa%3Db%23x").NextEvent(t)
	require.Equal(t, "/orders/%252F..%2F%3Fa=b%23x/status", up.paths()[0])
}

func TestPerRequestMaxFeeds(t *testing.T) {
	up := newUserUpstream(t)
	h := perRequestHandler(t, up, "/status", func(h *Handler) { h.MaxFeeds = 2 })
	srv := serve(t, h)
	alice := ssetest.Open(t, srv.URL, "Cookie", "alice")
	ssetest.Open(t, srv.URL, "Cookie", "bob")

	resp := get(t, srv.URL, "carol")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	require.True(t, strings.HasPrefix(string(body), "retry: "), "over max_feeds: %q", body)
	require.Equal(t, 2, liveFeeds(h))
	require.Equal(t, 2.0, testutil.ToFloat64(metricFeeds.WithLabelValues(h.Name)))
	require.Equal(t, 1.0, testutil.ToFloat64(metricFeedsOverCapacity.WithLabelValues(h.Name)))
	require.Contains(t, alice.NextEvent(t).Data, "alice", "a live feed suffered from the refusal")
}

func TestPerRequestFeedIsForgottenAfterLinger(t *testing.T) {
	up := newUserUpstream(t)
	h := perRequestHandler(t, up, "/status", nil)
	srv := serve(t, h)
	goroutines := runtime.NumGoroutine()
	for _, user := range []string{"alice", "bob", "carol"} {
		s := ssetest.Open(t, srv.URL, "Cookie", user)
		s.NextEvent(t)
		s.Close()
	}
	waitUntil(t, "every feed forgotten after its linger", func() bool { return liveFeeds(h) == 0 })
	require.Zero(t, testutil.ToFloat64(metricFeeds.WithLabelValues(h.Name)))
	require.Equal(t, 3.0, testutil.ToFloat64(metricFeedsStarted.WithLabelValues(h.Name)))
	require.Equal(t, 3.0, testutil.ToFloat64(metricFeedsDropped.WithLabelValues(h.Name)))
	waitUntil(t, "their goroutines gone", func() bool { return runtime.NumGoroutine() <= goroutines })
	requests := len(up.paths())
	time.Sleep(100 * time.Millisecond)
	require.Equal(t, requests, len(up.paths()), "a forgotten feed still polls")
}
