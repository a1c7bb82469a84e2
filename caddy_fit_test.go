package ssefeed_test

import (
	"compress/gzip"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"
	"github.com/klauspost/compress/zstd"
	"github.com/quic-go/quic-go/http3"

	"github.com/ssefeed/caddy-ssefeed/internal/ssetest"
)

// These tests fit the module into the Caddy configs users have: behind
// encode, over HTTP/2 and HTTP/3, with metrics, CORS and auth.

const (
	tlsURL     = "https://localhost:9443"
	metricsURL = "http://localhost:2999/metrics"
)

// tailSite is a site body with a tail feed of upstream on /events.
func tailSite(upstream, options string) string {
	return `sse_feed /events {
	tail ` + upstream + `
	id /id
	data /body
	` + options + `
}`
}

// caddyfileWith is caddyfile with extra global options.
func caddyfileWith(globals, site string) string {
	return strings.Replace(caddyfile(site), "{\n", "{\n"+globals+"\n", 1)
}

// startCaddyConfig loads a whole Caddyfile.
func startCaddyConfig(t *testing.T, config string) *caddytest.Tester {
	t.Helper()
	tester := caddytest.NewTester(t)
	tester.InitServer(config, "caddyfile")
	return tester
}

// expectLive sends n lines upstream, one at a time, and checks that each
// becomes an event on every stream before the next line is sent. It logs
// how long each event took.
func expectLive(t *testing.T, up *ndjsonUpstream, prefix string, n int, streams ...*ssetest.Stream) {
	t.Helper()
	for i := 1; i <= n; i++ {
		id := prefix + strconv.Itoa(i)
		sent := time.Now()
		up.Send(fmt.Sprintf(`{"id":%q,"body":"event %d"}`+"\n", id, i))
		for j, s := range streams {
			ev := s.NextEvent(t)
			if ev.LastEventID != id || ev.Data != fmt.Sprintf("event %d", i) {
				t.Fatalf("stream %d: event %+v, want id %q", j, ev, id)
			}
			t.Logf("stream %d: event %s arrived %v after its upstream line", j, id, time.Since(sent))
		}
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
			startCaddy(t, "encode gzip zstd\n"+tailSite(up.URL, ""))
			s := ssetest.OpenWith(t, http.DefaultClient, tc.decode, siteURL+"/events", "Accept-Encoding", tc.encoding)
			if got := s.Response.Header.Get("Content-Encoding"); got != tc.encoding {
				t.Fatalf("Content-Encoding = %q, want %q", got, tc.encoding)
			}
			if got := s.Response.Header.Get("Content-Type"); got != "text/event-stream" {
				t.Fatalf("Content-Type = %q", got)
			}
			up.WaitConnected(t, 1)
			expectLive(t, up, tc.encoding+"-", 5, s)
		})
	}
}

func TestHTTP2Cleartext(t *testing.T) {
	up := newNDJSONUpstream(t)
	startCaddyConfig(t, caddyfileWith("servers {\n\tprotocols h1 h2c\n}", tailSite(up.URL, "")))
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
		if s.Response.ProtoMajor != 2 {
			t.Fatalf("protocol %s, want HTTP/2", s.Response.Proto)
		}
		expectNoConnectionHeaders(t, s.Response)
	}
	up.WaitConnected(t, 1)
	expectLive(t, up, "h2c-", 3, streams...)
}

// waitForCertificate waits until Caddy serves a certificate on 9443: tls
// internal issues it in the background after the config loads.
func waitForCertificate(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		conn, err := tls.Dial("tcp", "localhost:9443", &tls.Config{InsecureSkipVerify: true})
		if err == nil {
			conn.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no TLS handshake on 9443 within 10s: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// tlsSite is a Caddyfile with the test's HTTP site and an HTTPS site on
// 9443 with a certificate from Caddy's internal CA, serving site.
func tlsSite(globals, site string) string {
	return caddyfileWith("auto_https disable_redirects\n"+globals, site) +
		"https://localhost:9443 {\n\ttls internal\n" + site + "\n}\n"
}

func TestHTTP2OverTLS(t *testing.T) {
	up := newNDJSONUpstream(t)
	startCaddyConfig(t, tlsSite("", tailSite(up.URL, "")))
	waitForCertificate(t)
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
	startCaddyConfig(t, tlsSite("servers {\n\tprotocols h1 h2 h3\n}", tailSite(up.URL, "")))
	waitForCertificate(t)
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
	if s.Response.ProtoMajor != major {
		t.Fatalf("protocol %s, want HTTP/%d", s.Response.Proto, major)
	}
	expectNoConnectionHeaders(t, s.Response)
	up.WaitConnected(t, 1)
	expectLive(t, up, fmt.Sprintf("h%d-", major), 3, s)
}

// scrape returns the text of the admin endpoint's /metrics.
func scrape(t *testing.T) string {
	t.Helper()
	resp, err := http.Get(metricsURL)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %d %v", metricsURL, resp.StatusCode, err)
	}
	return string(body)
}

// expectMetrics checks that the scraped text has each series, written as in
// the exposition format, with its value; values are waited for, since some
// are counted after the event that the test sees.
func expectMetrics(t *testing.T, want map[string]float64) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		text := scrape(t)
		var wrong []string
		for series, value := range want {
			got, ok := metricValue(text, series)
			if !ok || got != value {
				wrong = append(wrong, fmt.Sprintf("%s = %v (present: %v), want %v", series, got, ok, value))
			}
		}
		if len(wrong) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("metrics:\n%s\nscraped:\n%s", strings.Join(wrong, "\n"), grepLines(text, "caddy_sse_feed_"))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// metricValue finds the value of one series in exposition text.
func metricValue(text, series string) (float64, bool) {
	for line := range strings.Lines(text) {
		if rest, ok := strings.CutPrefix(line, series+" "); ok {
			v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64)
			return v, err == nil
		}
	}
	return 0, false
}

// grepLines returns the lines of text that start with prefix.
func grepLines(text, prefix string) string {
	var b strings.Builder
	for line := range strings.Lines(text) {
		if strings.HasPrefix(line, prefix) {
			b.WriteString(line)
		}
	}
	return b.String()
}

func TestMetricsThroughAdminEndpointAcrossReloads(t *testing.T) {
	up := newNDJSONUpstream(t)
	site := func(heartbeat string) string {
		return tailSite(up.URL, "name fit_metrics\n\theartbeat "+heartbeat)
	}
	tester := startCaddyConfig(t, caddyfileWith("metrics", site("10s")))

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
	expectMetrics(t, want)
	text := scrape(t)
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
	tester.InitServer(caddyfileWith("metrics", site("11s")), "caddyfile")
	expectLive(t, up, "after-reload-", 1, first, hit, reset)
	want["caddy_sse_feed_events_published_total"+feed] = 4
	expectMetrics(t, want)
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
	startCaddy(t, fmt.Sprintf(corsSnippet, tailSite(up.URL, "")))

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
	startCaddy(t, basicAuthSnippet+tailSite(up.URL, ""))

	expectUnauthorized(t, up)

	s := ssetest.Open(t, "http://alice:secret@localhost:9080/events")
	if s.Response.StatusCode != http.StatusOK {
		t.Fatalf("with credentials: status %d", s.Response.StatusCode)
	}
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
	startCaddy(t, fmt.Sprintf(forwardAuthSnippet, auth.Listener.Addr())+tailSite(up.URL, ""))

	expectUnauthorized(t, up)

	s := openStream(t, "/events", "Cookie", "session=ok")
	if s.Response.StatusCode != http.StatusOK {
		t.Fatalf("with a session: status %d", s.Response.StatusCode)
	}
	up.WaitConnected(t, 1)
	expectLive(t, up, "forward-", 2, s)
}
