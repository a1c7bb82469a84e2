package integration

import (
	"compress/gzip"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ssefeed/caddy-ssefeed/internal/ssetest"
)

// accounts is a per-user API: it answers each user, known by the session
// cookie or the bearer token its request carries, with that user's items,
// and 401 to a request with no known user's credential.
type accounts struct {
	*jsonUpstream

	mu    sync.Mutex
	items map[string]int // the items each known user has, numbered from 1
}

// newAccounts starts an accounts API whose users have one item each.
func newAccounts(t *testing.T, users ...string) *accounts {
	t.Helper()
	a := &accounts{jsonUpstream: newJSONUpstream(t, jsonAnswer{}), items: make(map[string]int)}
	for _, user := range users {
		a.items[user] = 1
	}
	a.SetFunc(a.answer)
	return a
}

// userOf returns the user that a request's credential names, or "".
func userOf(h http.Header) string {
	if user, ok := strings.CutPrefix(h.Get("Cookie"), "session="); ok {
		return user
	}
	user, _ := strings.CutPrefix(h.Get("Authorization"), "Bearer ")
	return user
}

func (a *accounts) answer(r *http.Request) jsonAnswer {
	a.mu.Lock()
	defer a.mu.Unlock()
	user := userOf(r.Header)
	n, ok := a.items[user]
	if !ok {
		return jsonAnswer{Status: http.StatusUnauthorized, Body: `{"error":"unauthorized"}`}
	}
	elems := make([]string, n)
	for i := range elems {
		elems[i] = fmt.Sprintf(`{"id":"%s-%d","user":%q}`, user, i+1, user)
	}
	return jsonAnswer{Body: `{"items":[` + strings.Join(elems, ",") + `]}`}
}

// add gives each user one more item.
func (a *accounts) add(users ...string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, user := range users {
		a.items[user]++
	}
}

// revoke makes the API refuse user's credential from now on.
func (a *accounts) revoke(user string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	delete(a.items, user)
}

// requestsOf returns the answered requests that carried user's credential.
func (a *accounts) requestsOf(user string) []upstreamRequest {
	return slices.DeleteFunc(a.Requests(), func(r upstreamRequest) bool { return userOf(r.Header) != user })
}

// userFeed is a site body with a per-user item feed of up on path: the
// upstream is up's path, with the subscriber's header of the given name
// forwarded as it came. Each event's id is the item's, its data the user.
func userFeed(up *accounts, path, header string, options ...string) string {
	return fmt.Sprintf(`sse_feed %s {
	poll %s%s 200ms
	header %s {header.%s}
	items /items
	id /id
	data /user
	initial 10
	linger 200ms
	%s
}`, path, up.URL, path, header, header, strings.Join(options, "\n\t"))
}

// expectUserEvents reads one event of each stream: item n of the stream's
// user.
func expectUserEvents(t *testing.T, n int, streams map[*ssetest.Stream]string) {
	t.Helper()
	for s, user := range streams {
		require.Equal(t, ssetest.Event{Type: "message", Data: user, LastEventID: fmt.Sprintf("%s-%d", user, n), HasIDField: true},
			s.NextEvent(t), "%s's stream", user)
	}
}

// getStatus GETs path on the test site with the header pairs and returns
// the status, closing the body. An answer other than 200 must not pose as
// an event stream.
func getStatus(t *testing.T, path string, header ...string) int {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, siteURL+path, nil)
	require.NoError(t, err)
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		assert.NotEqual(t, "text/event-stream", resp.Header.Get("Content-Type"), "the content type of a %d", resp.StatusCode)
	}
	return resp.StatusCode
}

func TestPerRequestFeedPerUser(t *testing.T) {
	up := newAccounts(t, "alice", "bob", "carol", "dave")
	startCaddy(t, userFeed(up, "/cookie", "Cookie", "name cookie")+"\n"+
		userFeed(up, "/bearer", "Authorization", "name bearer"))
	cookie := func(user string) *ssetest.Stream { return openStream(t, "/cookie", "Cookie", "session="+user) }
	bearer := func(user string) *ssetest.Stream { return openStream(t, "/bearer", "Authorization", "Bearer "+user) }
	streams := map[*ssetest.Stream]string{
		cookie("alice"): "alice",
		cookie("alice"): "alice", // a second tab
		cookie("bob"):   "bob",
		bearer("carol"): "carol",
		bearer("dave"):  "dave",
	}
	start := time.Now()
	expectUserEvents(t, 1, streams)
	for n := 2; n <= 4; n++ {
		up.add("alice", "bob", "carol", "dave")
		expectUserEvents(t, n, streams)
	}
	for s := range streams {
		s.ExpectQuiet(t, 10*time.Millisecond)
	}
	expectMetrics(t, time.Second, map[string]float64{
		`caddy_sse_feed_feeds{feed="cookie"}`:               2,
		`caddy_sse_feed_feeds{feed="bearer"}`:               2,
		`caddy_sse_feed_feeds_started_total{feed="cookie"}`: 2,
		`caddy_sse_feed_feeds_started_total{feed="bearer"}`: 2,
	})

	// Two tabs of one user share one upstream poll: alice's feed polls as
	// often as bob's.
	time.Sleep(time.Second)
	alice, bob := len(up.requestsOf("alice")), len(up.requestsOf("bob"))
	t.Logf("in %v at a 200ms interval: %d upstream requests with alice's cookie (two tabs), %d with bob's (one)",
		time.Since(start).Round(time.Millisecond), alice, bob)
	assert.GreaterOrEqual(t, bob, 5, "bob's polls")
	assert.LessOrEqual(t, alice, bob+2, "alice's polls, for two tabs")
	for _, r := range up.Requests() {
		_, cookie := r.Header["Cookie"]
		_, auth := r.Header["Authorization"]
		require.True(t, cookie != auth, "an upstream request with a cookie %v and an authorization %v: %v", cookie, auth, r.Header)
		require.Equal(t, cookie, strings.HasPrefix(r.RequestURI, "/cookie"), "%s with %v", r.RequestURI, r.Header)
	}
}

func TestPerRequestUpstreamDecides(t *testing.T) {
	up := newAccounts(t, "carol", "dave")
	startCaddy(t, userFeed(up, "/bearer", "Authorization", "name decides"))
	require.Equal(t, http.StatusUnauthorized, getStatus(t, "/bearer", "Authorization", "Bearer mallory"))
	require.Len(t, up.requestsOf("mallory"), 1, "upstream requests with mallory's token")

	carol := openStream(t, "/bearer", "Authorization", "Bearer carol")
	dave := openStream(t, "/bearer", "Authorization", "Bearer dave")
	expectUserEvents(t, 1, map[*ssetest.Stream]string{carol: "carol", dave: "dave"})

	// A token revoked later ends its user's stream, and the reconnection
	// is refused; another user's stream goes on.
	up.revoke("carol")
	carol.ExpectEnd(t, 3*time.Second)
	require.Equal(t, http.StatusUnauthorized, getStatus(t, "/bearer", "Authorization", "Bearer carol"))
	up.add("dave")
	expectUserEvents(t, 2, map[*ssetest.Stream]string{dave: "dave"})
	expectMetrics(t, time.Second, map[string]float64{
		`caddy_sse_feed_upstream_refusals_total{feed="decides",status="401"}`: 3,
		`caddy_sse_feed_feeds{feed="decides"}`:                                1,
	})
	time.Sleep(500 * time.Millisecond)
	assert.Len(t, up.requestsOf("mallory"), 1, "upstream requests with mallory's token")
}

// hostileValues are request values that try to change the upstream
// request's host, path structure or query structure, to be expanded once
// more, or to split a header.
var hostileValues = []string{
	"..", ".", "", "%2F", "%252F", "/", "a/../..", "@evil.example", "evil.example:80", "#x", "?a=b&c=d", "a=b&c=d",
	"{env.HOME}", "{http.request.header.Cookie}", "{query.case}", "\\{x\\}", "a\r\nX-Injected: 1", "\x00\x7f",
	"ü 日本 +%", strings.Repeat("a", 8<<10), strings.Repeat("a", 8<<10+1),
}

// TestPerRequestHostileValues puts each hostile value in a path segment, a
// query value and a header value, and checks the upstream's request: the
// configured host, its path segments and query parameters as configured,
// each carrying the value as it came, never expanded again; header values
// without control characters. Values that would make a path segment
// empty, "." or "..", and values over 8 KiB, get 400.
func TestPerRequestHostileValues(t *testing.T) {
	up := newJSONUpstream(t, jsonAnswer{Body: `{"ok":true}`})
	startCaddy(t, fmt.Sprintf(`sse_feed /path {
	poll %[1]s/users/{query.x}/feed?q={query.x}&case={query.case} 1s
	header X-Value {query.x}
	linger 100ms
}
sse_feed /query {
	poll %[1]s/search?q={query.x}&case={query.case} 1s
	header X-Value "v={query.x}"
	linger 100ms
}`, up.URL))
	host := strings.TrimPrefix(up.URL, "http://")
	for i, value := range hostileValues {
		for _, place := range []string{"path", "query"} {
			c := place + strconv.Itoa(i)
			status := getStatus(t, "/"+place+"?case="+c+"&x="+url.QueryEscape(value), "Cookie", "secret=s3cr3t")
			refused := len(value) > 8<<10 || place == "path" && (value == "" || value == "." || value == "..")
			if refused {
				assert.Equal(t, http.StatusBadRequest, status, "%s %q", place, value)
				continue
			}
			require.Equal(t, http.StatusOK, status, "%s %q", place, value)
			r := waitRequest(t, up, func(r upstreamRequest) bool { return strings.HasSuffix(r.RawQuery, "&case="+c) })
			assert.Equal(t, host, r.Host, "%s %q: host", place, value)
			target, rawQuery, _ := strings.Cut(r.RequestURI, "?")
			query, err := url.ParseQuery(rawQuery)
			require.NoError(t, err, "%s %q: query %q", place, value, rawQuery)
			assert.Equal(t, url.Values{"q": {value}, "case": {c}}, query, "%s %q: query %q", place, value, rawQuery)
			header := strings.Map(func(r rune) rune {
				if r < ' ' && r != '\t' || r == 0x7f {
					return -1
				}
				return r
			}, value)
			if place == "path" {
				segments := strings.Split(target, "/")
				require.Len(t, segments, 4, "%s %q: path %q", place, value, target)
				assert.Equal(t, []string{"", "users", segments[2], "feed"}, segments, "%s %q: path %q", place, value, target)
				segment, err := url.PathUnescape(segments[2])
				require.NoError(t, err)
				assert.Equal(t, value, segment, "%s %q: path segment %q", place, value, segments[2])
			} else {
				assert.Equal(t, "/search", target, "%s %q", place, value)
				header = "v=" + header
			}
			assert.Equal(t, []string{header}, r.Header.Values("X-Value"), "%s %q: header", place, value)
			assert.Empty(t, r.Header.Values("X-Injected"), "%s %q: a header made of the value", place, value)
		}
	}
}

// waitRequest waits until up has answered a request that match accepts,
// and returns it.
func waitRequest(t *testing.T, up *jsonUpstream, match func(upstreamRequest) bool) upstreamRequest {
	t.Helper()
	var found upstreamRequest
	up.waitUntil(t, 5*time.Second, func() (bool, string) {
		i := slices.IndexFunc(up.requests, match)
		if i < 0 {
			return false, fmt.Sprintf("none of the %d upstream requests matches", len(up.requests))
		}
		found = up.requests[i]
		return true, ""
	})
	return found
}

func TestPerRequestReload(t *testing.T) {
	up := newAccounts(t, "alice", "bob")
	site := func(options ...string) string {
		return userFeed(up, "/cookie", "Cookie", append(options, "name reloaded")...)
	}
	caddy := startCaddy(t, site())
	open := func() map[*ssetest.Stream]string {
		return map[*ssetest.Stream]string{
			openStream(t, "/cookie", "Cookie", "session=alice"): "alice",
			openStream(t, "/cookie", "Cookie", "session=bob"):   "bob",
		}
	}
	streams := open()
	expectUserEvents(t, 1, streams)

	// Another route, and a handler option that leaves the feeds as they
	// are: the streams go on, on their feeds.
	caddy.reload(site("heartbeat 5s") + "\nrespond /other \"other\"")
	up.add("alice", "bob")
	expectUserEvents(t, 2, streams)
	expectMetrics(t, time.Second, map[string]float64{`caddy_sse_feed_feeds_started_total{feed="reloaded"}`: 2})

	// The feeds changed: the streams end, so that their clients reconnect
	// to the new config.
	caddy.reload(site("heartbeat 5s", "max_feeds 100"))
	for s := range streams {
		s.ExpectEnd(t, 3*time.Second)
	}
	streams = open()
	expectUserEvents(t, 1, streams)
	expectUserEvents(t, 2, streams)
}

func TestPerRequestBehindEncodeAndOverH2C(t *testing.T) {
	t.Run("gzip", func(t *testing.T) {
		up := newAccounts(t, "alice")
		startCaddy(t, "encode gzip\n"+userFeed(up, "/cookie", "Cookie"))
		gunzip := func(r io.Reader) (io.Reader, error) { return gzip.NewReader(r) }
		s := ssetest.OpenWith(t, http.DefaultClient, gunzip, siteURL+"/cookie", "Accept-Encoding", "gzip", "Cookie", "session=alice")
		require.Equal(t, "gzip", s.Response.Header.Get("Content-Encoding"))
		streams := map[*ssetest.Stream]string{s: "alice"}
		expectUserEvents(t, 1, streams)
		up.add("alice")
		expectUserEvents(t, 2, streams)
	})
	t.Run("h2c", func(t *testing.T) {
		up := newAccounts(t, "alice", "bob")
		startCaddy(t, userFeed(up, "/cookie", "Cookie"), withGlobal("servers {\n\tprotocols h1 h2c\n}"))
		protocols := new(http.Protocols)
		protocols.SetUnencryptedHTTP2(true)
		transport := &http.Transport{Protocols: protocols}
		t.Cleanup(transport.CloseIdleConnections)
		client := &http.Client{Transport: transport}
		// Two users, streams multiplexed by one HTTP/2 client.
		streams := map[*ssetest.Stream]string{
			ssetest.OpenWith(t, client, nil, siteURL+"/cookie", "Cookie", "session=alice"): "alice",
			ssetest.OpenWith(t, client, nil, siteURL+"/cookie", "Cookie", "session=bob"):   "bob",
		}
		for s := range streams {
			require.Equal(t, 2, s.Response.ProtoMajor, "protocol %s", s.Response.Proto)
		}
		expectUserEvents(t, 1, streams)
		up.add("alice", "bob")
		expectUserEvents(t, 2, streams)
	})
}
