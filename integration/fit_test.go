package integration

import (
	"compress/gzip"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/quic-go/quic-go/http3"
	"github.com/stretchr/testify/require"

	"github.com/ssefeed/caddy-ssefeed/internal/ssetest"
)

// These tests fit the module into the Caddy configs users have: behind
// encode, over HTTP/2 and HTTP/3, with metrics, CORS and auth.

// expectLive sends n lines upstream, with ids prefix1 to prefixN, one at a
// time, and checks that each becomes an event on every stream before the
// next line is sent. It logs how long each event took.
func expectLive(t *testing.T, up *ndjsonUpstream, prefix string, n int, streams ...*ssetest.Stream) {
	t.Helper()
	ids := make([]string, n)
	for i := range ids {
		ids[i] = fmt.Sprintf("%s%d", prefix, i+1)
	}
	for i, d := range sendAndExpect(t, up, ids, streams...) {
		t.Logf("event %s was on every stream %v after its upstream line", ids[i], d)
	}
}

// expectNoConnectionHeaders fails if an HTTP/2 or HTTP/3 response carries
// headers that only HTTP/1.1 may have.
func expectNoConnectionHeaders(t *testing.T, resp *http.Response) {
	t.Helper()
	for _, name := range []string{"Connection", "Keep-Alive", "Transfer-Encoding", "Upgrade", "Proxy-Connection"} {
		if v, ok := resp.Header[name]; ok {
			t.Errorf("%s response has %s: %q", resp.Proto, name, v)
		}
	}
	if len(resp.TransferEncoding) > 0 {
		t.Errorf("%s response has transfer encodings %q", resp.Proto, resp.TransferEncoding)
	}
}

func TestEncodeFlushesEachEvent(t *testing.T) {
	for _, tc := range []struct {
		encoding string
		decode   func(io.Reader) (io.Reader, error)
	}{
		{"gzip", func(r io.Reader) (io.Reader, error) { return gzip.NewReader(r) }},
		{"zstd", func(r io.Reader) (io.Reader, error) {
			// The decoder's own goroutines are not needed for a stream.
			d, err := zstd.NewReader(r, zstd.WithDecoderConcurrency(1))
			if err != nil {
				return nil, err
			}
			return d.IOReadCloser(), nil
		}},
	} {
		t.Run(tc.encoding, func(t *testing.T) {
			up := newNDJSONUpstream(t)
			startCaddy(t, "encode gzip zstd\n"+tailFeed(up.URL))
			s := ssetest.OpenWith(t, http.DefaultClient, tc.decode, siteURL+"/events", "Accept-Encoding", tc.encoding)
			require.Equal(t, tc.encoding, s.Response.Header.Get("Content-Encoding"))
			require.Equal(t, "text/event-stream", s.Response.Header.Get("Content-Type"))
			up.WaitConnected(t, 1)
			expectLive(t, up, tc.encoding+"-", 5, s)
		})
	}
}

func TestHTTP2Cleartext(t *testing.T) {
	up := newNDJSONUpstream(t)
	startCaddy(t, tailFeed(up.URL), withGlobal("servers {\n\tprotocols h1 h2c\n}"))
	protocols := new(http.Protocols)
	protocols.SetUnencryptedHTTP2(true)
	transport := &http.Transport{Protocols: protocols}
	t.Cleanup(transport.CloseIdleConnections)
	client := &http.Client{Transport: transport}

	// Two streams share one connection: what keeps a browser under its limit
	// of six HTTP/1.1 connections per origin.
	streams := []*ssetest.Stream{
		ssetest.OpenWith(t, client, nil, siteURL+"/events"),
		ssetest.OpenWith(t, client, nil, siteURL+"/events"),
	}
	for _, s := range streams {
		require.Equal(t, 2, s.Response.ProtoMajor, "protocol %s", s.Response.Proto)
		expectNoConnectionHeaders(t, s.Response)
	}
	up.WaitConnected(t, 1)
	expectLive(t, up, "h2c-", 3, streams...)
}

func TestHTTP2OverTLS(t *testing.T) {
	up := newNDJSONUpstream(t)
	startCaddy(t, tailFeed(up.URL), withTLS())
	// The test trusts any certificate; the internal CA is not installed.
	transport := &http.Transport{
		TLSClientConfig:   &tls.Config{InsecureSkipVerify: true},
		ForceAttemptHTTP2: true,
	}
	t.Cleanup(transport.CloseIdleConnections)
	expectLiveOverTLS(t, up, transport, 2)
}

func TestHTTP3(t *testing.T) {
	up := newNDJSONUpstream(t)
	startCaddy(t, tailFeed(up.URL), withTLS(), withGlobal("servers {\n\tprotocols h1 h2 h3\n}"))
	transport := &http3.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}
	t.Cleanup(func() { transport.Close() })
	expectLiveOverTLS(t, up, transport, 3)
}

// expectLiveOverTLS opens the TLS site's feed through transport, checks that
// it speaks HTTP/major without connection-specific headers, and that events
// arrive live.
func expectLiveOverTLS(t *testing.T, up *ndjsonUpstream, transport http.RoundTripper, major int) {
	t.Helper()
	s := ssetest.OpenWith(t, &http.Client{Transport: transport}, nil, tlsURL+"/events")
	require.Equal(t, major, s.Response.ProtoMajor, "protocol %s", s.Response.Proto)
	expectNoConnectionHeaders(t, s.Response)
	up.WaitConnected(t, 1)
	expectLive(t, up, fmt.Sprintf("h%d-", major), 3, s)
}

func TestMetricsThroughAdminEndpointAcrossReloads(t *testing.T) {
	up := newNDJSONUpstream(t)
	site := func(heartbeat string) string {
		return tailFeed(up.URL, "name fit_metrics", "heartbeat "+heartbeat)
	}
	caddy := startCaddy(t, site("10s"), withGlobal("metrics"))

	first := openStream(t, "/events")
	up.WaitConnected(t, 1)
	expectLive(t, up, "m", 2, first)
	hit := openStream(t, "/events", "Last-Event-ID", "m1")
	if ev := hit.NextEvent(t); ev.LastEventID != "m2" {
		t.Fatalf("resumed at %+v, want m2", ev)
	}
	reset := openStream(t, "/events", "Last-Event-ID", "gone")
	for _, want := range []string{"", "m1", "m2"} {
		if ev := reset.NextEvent(t); ev.LastEventID != want || want == "" && ev.Type != "reset" {
			t.Fatalf("reset stream: event %+v, want a reset and then the retained events", ev)
		}
	}
	up.Send("{not json\n")
	expectLive(t, up, "after-error-", 1, first, hit, reset)

	const feed = `{feed="fit_metrics"}`
	want := map[string]float64{
		"caddy_sse_feed_subscribers" + feed:                                              3,
		"caddy_sse_feed_events_published_total" + feed:                                   3,
		`caddy_sse_feed_resumptions_total{feed="fit_metrics",result="hit"}`:              1,
		`caddy_sse_feed_resumptions_total{feed="fit_metrics",result="reset"}`:            1,
		`caddy_sse_feed_upstream_errors_total{feed="fit_metrics",reason="invalid_json"}`: 1,
	}
	expectMetrics(t, 5*time.Second, want)
	text := scrapeMetrics(t)
	if _, ok := metricValue(text, "caddy_sse_feed_bytes_written_total"+feed); !ok {
		t.Errorf("no bytes written series:\n%s", grepLines(text, "caddy_sse_feed_"))
	}
	for line := range strings.Lines(grepLines(text, "caddy_sse_feed_")) {
		for _, label := range []string{"id=", "url=", "host=", "remote="} {
			if strings.Contains(line, label) {
				t.Errorf("series with an unbounded label: %s", line)
			}
		}
	}

	// A reload with a new registry and the feed unchanged: the streams go on
	// and the counts are still there.
	caddy.reload(site("11s"))
	expectLive(t, up, "after-reload-", 1, first, hit, reset)
	want["caddy_sse_feed_events_published_total"+feed] = 4
	expectMetrics(t, 5*time.Second, want)
}

// The README's CORS snippet: a page on another origin opens an EventSource
// with credentials and may resume with Last-Event-ID. The route keeps the
// written order, so that the preflight is answered before sse_feed, which
// answers GET only.
const corsSnippet = `route /events {
	header {
		Access-Control-Allow-Origin "https://app.example.com"
		Access-Control-Allow-Credentials "true"
		Access-Control-Allow-Headers "Last-Event-ID, Cache-Control"
		Vary Origin
	}
	@preflight method OPTIONS
	respond @preflight 204
	%s
}
`

func TestCORSSnippet(t *testing.T) {
	up := newNDJSONUpstream(t)
	startCaddy(t, fmt.Sprintf(corsSnippet, tailFeed(up.URL)))

	req, err := http.NewRequest(http.MethodOptions, siteURL+"/events", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Origin", "https://app.example.com")
	req.Header.Set("Access-Control-Request-Method", "GET")
	req.Header.Set("Access-Control-Request-Headers", "last-event-id")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		t.Errorf("preflight status %d, want 204", resp.StatusCode)
	}
	expectCORS(t, resp)

	s := openStream(t, "/events", "Origin", "https://app.example.com", "Last-Event-ID", "unknown")
	expectCORS(t, s.Response)
	if ev := s.NextEvent(t); ev.Type != "reset" {
		t.Fatalf("first event %+v, want a reset", ev)
	}
	up.WaitConnected(t, 1)
	expectLive(t, up, "cors-", 1, s)
}

func expectCORS(t *testing.T, resp *http.Response) {
	t.Helper()
	h := resp.Header
	if got := h.Get("Access-Control-Allow-Origin"); got != "https://app.example.com" {
		t.Errorf("Access-Control-Allow-Origin = %q", got)
	}
	if got := h.Get("Access-Control-Allow-Credentials"); got != "true" {
		t.Errorf("Access-Control-Allow-Credentials = %q", got)
	}
	if got := h.Get("Access-Control-Allow-Headers"); !strings.Contains(strings.ToLower(got), "last-event-id") {
		t.Errorf("Access-Control-Allow-Headers = %q, want Last-Event-ID in it", got)
	}
}

// The README's basic_auth snippet; the hash is of "secret".
const basicAuthSnippet = `basic_auth /events {
	alice $2a$10$kcC6MSM7.K/EkCpMzcMlrukatdTNtZI7f5MUFSUK96ifVPZWRKuGa
}
`

// expectUnauthorized fails unless a GET of /events without credentials is
// answered 401 and starts no upstream reader.
func expectUnauthorized(t *testing.T, up *ndjsonUpstream) {
	t.Helper()
	resp, err := http.Get(siteURL + "/events")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("without credentials: status %d, want 401", resp.StatusCode)
	}
	if len(up.Requests()) != 0 {
		t.Fatal("an unauthorized request started the feed")
	}
}

func TestBasicAuthInFront(t *testing.T) {
	up := newNDJSONUpstream(t)
	startCaddy(t, basicAuthSnippet+tailFeed(up.URL))

	expectUnauthorized(t, up)

	s := ssetest.Open(t, "http://alice:secret@localhost:9080/events") // fails unless 200
	up.WaitConnected(t, 1)
	expectLive(t, up, "auth-", 2, s)
}

// The README's forward_auth snippet, with the auth service's address.
const forwardAuthSnippet = `forward_auth /events %s {
	uri /verify
	copy_headers Remote-User
}
`

func TestForwardAuthInFront(t *testing.T) {
	auth := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if c, err := r.Cookie("session"); err != nil || c.Value != "ok" {
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		w.Header().Set("Remote-User", "alice")
	}))
	t.Cleanup(auth.Close)
	up := newNDJSONUpstream(t)
	startCaddy(t, fmt.Sprintf(forwardAuthSnippet, auth.Listener.Addr())+tailFeed(up.URL))

	expectUnauthorized(t, up)

	s := openStream(t, "/events", "Cookie", "session=ok") // fails unless 200
	up.WaitConnected(t, 1)
	expectLive(t, up, "forward-", 2, s)
}
