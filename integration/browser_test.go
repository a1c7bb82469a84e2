package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// browserPage opens an EventSource on /events, passing on its own
// lastEventId query parameter, and records what JavaScript sees.
const browserPage = `<!doctype html>
<meta charset="utf-8">
<title>sse_feed</title>
<script>
const seen = {events: [], resets: [], pings: 0, opens: 0, errors: 0};
const last = new URLSearchParams(location.search).get("lastEventId");
const source = new EventSource("/events" + (last ? "?lastEventId=" + encodeURIComponent(last) : ""));
source.onopen = () => seen.opens++;
source.onerror = () => seen.errors++;
source.addEventListener("note", e => seen.events.push(e.lastEventId + "=" + e.data));
source.addEventListener("reset", e => seen.resets.push(JSON.parse(e.data).last_event_id));
source.addEventListener("ping", () => seen.pings++);
</script>
`

// browserSeen mirrors the page's record.
type browserSeen struct {
	Events []string `json:"events"`
	Resets []string `json:"resets"`
	Pings  int      `json:"pings"`
	Opens  int      `json:"opens"`
	Errors int      `json:"errors"`
}

// newBrowser starts headless Chromium with a fresh profile. Without
// Chromium the test is skipped (see requireProgram).
func newBrowser(t *testing.T) context.Context {
	t.Helper()
	path := requireProgram(t, "chromium")
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(context.Background(),
		chromedp.ExecPath(path),
		chromedp.Headless,
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		chromedp.NoDefaultBrowserCheck,
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.UserDataDir(t.TempDir()),
	)
	ctx, cancel := chromedp.NewContext(allocCtx)
	t.Cleanup(func() {
		cancel()
		cancelAlloc()
	})
	require.NoError(t, chromedp.Do(ctx), "starting chromium")
	return ctx
}

// waitSeen polls the page's record until ok accepts it, and returns it.
func waitSeen(t *testing.T, ctx context.Context, what string, ok func(browserSeen) bool) browserSeen {
	t.Helper()
	return waitPage(t, ctx, "seen", what, ok)
}

// waitPage evaluates the JavaScript expression expr on the page until ok
// accepts its value, read as JSON into a T, and returns that value.
func waitPage[T any](t *testing.T, ctx context.Context, expr, what string, ok func(T) bool) T {
	t.Helper()
	var seen T
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		raw, err := chromedp.Run(ctx, chromedp.Evaluate[string](`JSON.stringify(`+expr+`)`))
		require.NoError(c, err, "reading the page")
		var now T
		require.NoError(c, json.Unmarshal([]byte(raw), &now))
		if !ok(now) {
			c.Errorf("the page saw %+v", now)
			return
		}
		seen = now
	}, 10*time.Second, 50*time.Millisecond, "waiting for %s", what)
	return seen
}

// cuttingProxy forwards TCP connections to Caddy and can cut them all, as a
// load balancer or a mobile network does. It records the bytes each
// connection sent first (the request head), to see what the browser asked.
type cuttingProxy struct {
	net.Listener
	target string

	mu       sync.Mutex
	conns    []net.Conn
	requests []string
	wg       sync.WaitGroup
}

func newCuttingProxy(t *testing.T, target string) *cuttingProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &cuttingProxy{Listener: ln, target: target}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(func() {
		ln.Close()
		p.Cut()
		p.wg.Wait()
	})
	return p
}

func (p *cuttingProxy) accept() {
	defer p.wg.Done()
	for {
		client, err := p.Accept()
		if err != nil {
			return
		}
		server, err := net.Dial("tcp", p.target)
		if err != nil {
			client.Close()
			continue
		}
		p.mu.Lock()
		p.conns = append(p.conns, client, server)
		p.mu.Unlock()
		p.wg.Add(2)
		go func() {
			defer p.wg.Done()
			defer server.Close()
			p.copyRecording(server, client)
		}()
		go func() {
			defer p.wg.Done()
			defer client.Close()
			_, _ = io.Copy(client, server)
		}()
	}
}

// copyRecording copies a client's bytes to the server, recording each
// request head (a browser may send several on one connection).
func (p *cuttingProxy) copyRecording(dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			p.mu.Lock()
			p.requests = append(p.requests, string(buf[:n]))
			p.mu.Unlock()
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// Cut closes every connection through the proxy.
func (p *cuttingProxy) Cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}

// Requests returns the request heads seen so far.
func (p *cuttingProxy) Requests() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.requests)
}

// TestBrowserEventSource drives a real EventSource. The server side ends the
// connection by a proxy in front of Caddy cutting it: the way streams end
// in the field (load balancers, idle timeouts, networks), while the feed and
// its replay log go on. The browser must reconnect by itself, send
// Last-Event-ID, and miss nothing. (A reload that changes the feed would
// also end the stream, but then a new feed with a new log answers, so the
// browser gets a reset instead.)
func TestBrowserEventSource(t *testing.T) {
	ctx := newBrowser(t)
	up := newNDJSONUpstream(t)
	root := t.TempDir()
	if err := os.WriteFile(filepath.Join(root, "index.html"), []byte(browserPage), 0o644); err != nil {
		t.Fatal(err)
	}
	startCaddy(t, fmt.Sprintf(`root * %s
file_server
sse_feed /events {
	tail %s
	id /id
	data /body
	event note
	retry 200ms
	heartbeat 500ms
	heartbeat_event ping
}`, root, up.URL))
	proxy := newCuttingProxy(t, "127.0.0.1:9080")
	// The site is http://localhost:9080; its host matcher ignores the port.
	page := fmt.Sprintf("http://localhost:%d/", proxy.Addr().(*net.TCPAddr).Port)

	if err := chromedp.Do(ctx, chromedp.Navigate(page)); err != nil {
		t.Fatal(err)
	}
	waitSeen(t, ctx, "the stream to open", func(s browserSeen) bool { return s.Opens == 1 })
	up.WaitConnected(t, 1)
	send := func(id string) { up.Send(fmt.Sprintf(`{"id":%q,"body":"data of %s"}`+"\n", id, id)) }
	want := func(ids ...string) []string {
		var events []string
		for _, id := range ids {
			events = append(events, id+"=data of "+id)
		}
		return events
	}
	send("b1")
	send("b2")
	waitSeen(t, ctx, "b1 and b2", func(s browserSeen) bool { return slices.Equal(s.Events, want("b1", "b2")) })
	waitSeen(t, ctx, "a heartbeat event", func(s browserSeen) bool { return s.Pings > 0 })

	proxy.Cut()
	send("b3") // published while the browser is away
	seen := waitSeen(t, ctx, "the reconnection", func(s browserSeen) bool { return s.Opens == 2 })
	if seen.Errors == 0 {
		t.Errorf("the page saw no error event for the cut: %+v", seen)
	}
	send("b4")
	waitSeen(t, ctx, "b3 from the replay log and b4 live", func(s browserSeen) bool {
		return len(s.Events) >= 4
	})
	seen = waitSeen(t, ctx, "every event once", func(s browserSeen) bool { return true })
	if !slices.Equal(seen.Events, want("b1", "b2", "b3", "b4")) {
		t.Errorf("the page saw %q, want b1..b4 each once", seen.Events)
	}
	if !slices.ContainsFunc(proxy.Requests(), func(head string) bool {
		return bytes.Contains(bytes.ToLower([]byte(head)), []byte("\r\nlast-event-id: b2\r\n"))
	}) {
		t.Errorf("no request with Last-Event-ID: b2 among:\n%s", strings.Join(proxy.Requests(), "\n"))
	}

	// An id the feed does not know: the reset listener fires, then the
	// retained events follow.
	if err := chromedp.Do(ctx, chromedp.Navigate(page+"?lastEventId=unknown")); err != nil {
		t.Fatal(err)
	}
	seen = waitSeen(t, ctx, "a reset and the retained events", func(s browserSeen) bool { return len(s.Events) >= 4 })
	if !slices.Equal(seen.Resets, []string{"unknown"}) || !slices.Equal(seen.Events, want("b1", "b2", "b3", "b4")) {
		t.Errorf("after an unknown id the page saw resets %q and events %q", seen.Resets, seen.Events)
	}
}

// userPage opens an EventSource on /orders with the token of its own token
// query parameter, which the feed forwards as a bearer token, and records
// what JavaScript sees.
const userPage = `<!doctype html>
<meta charset="utf-8">
<title>sse_feed per user</title>
<script>
const token = new URLSearchParams(location.search).get("token");
const source = new EventSource("/orders?token=" + encodeURIComponent(token));
const seen = {events: [], opens: 0, errors: 0};
source.onopen = () => seen.opens++;
source.onerror = () => seen.errors++;
source.onmessage = e => seen.events.push(e.lastEventId);
</script>
`

// userSeen mirrors the user page's record, with the EventSource's
// readyState.
type userSeen struct {
	Events []string `json:"events"`
	Opens  int      `json:"opens"`
	Errors int      `json:"errors"`
	State  int      `json:"state"`
}

// eventSourceClosed is EventSource.CLOSED, the readyState of a source that
// gave up for good.
const eventSourceClosed = 2

// TestBrowserPerUserFeedRefused drives a real EventSource on a per-user
// feed whose upstream refuses a token with 401: the browser gets the 401,
// closes the source for good and never asks again, so the upstream sees no
// further request with the token; a token revoked while its stream is open
// ends the stream, and the browser's reconnection is refused the same way.
func TestBrowserPerUserFeedRefused(t *testing.T) {
	ctx := newBrowser(t)
	up := newAccounts(t, "erin")
	root := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(root, "index.html"), []byte(userPage), 0o644))
	startCaddy(t, fmt.Sprintf(`root * %s
file_server
sse_feed /orders {
	poll %s/orders 200ms
	header Authorization "Bearer {query.token}"
	items /items
	id /id
	data /user
	initial 10
	retry 200ms
	linger 200ms
}`, root, up.URL))
	page := func(token string) {
		require.NoError(t, chromedp.Do(ctx, chromedp.Navigate(siteURL+"/?token="+token)))
	}
	// expectGaveUp waits until the page's source is closed for good, then
	// checks that the upstream sees no more requests with the token for
	// ten times the retry.
	expectGaveUp := func(token string, opens int) {
		t.Helper()
		waitPage(t, ctx, "Object.assign({state: source.readyState}, seen)", token+"'s source closed",
			func(s userSeen) bool { return s.State == eventSourceClosed && s.Errors > 0 && s.Opens == opens })
		requests := len(up.requestsOf(token))
		time.Sleep(2 * time.Second)
		assert.Len(t, up.requestsOf(token), requests, "upstream requests with %s's token after the source closed", token)
		last := up.requestsOf(token)[requests-1]
		assert.Equal(t, http.StatusUnauthorized, last.Status, "the last answer to %s's token", token)
	}

	page("mallory")
	expectGaveUp("mallory", 0)
	require.Len(t, up.requestsOf("mallory"), 1, "upstream requests with mallory's token")

	page("erin")
	waitPage(t, ctx, "seen", "erin's first event", func(s userSeen) bool { return slices.Equal(s.Events, []string{"erin-1"}) })
	up.add("erin")
	waitPage(t, ctx, "seen", "erin's second event", func(s userSeen) bool { return slices.Equal(s.Events, []string{"erin-1", "erin-2"}) })
	up.revoke("erin")
	expectGaveUp("erin", 1)
}
