package integration

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ssefeed/caddy-ssefeed/internal/clustertest"
	"github.com/ssefeed/caddy-ssefeed/internal/ssetest"
)

// The cluster tests run several real Caddy processes, nodes, built from the
// checkout, each on loopback ports of its own, sharing one real
// redis-server on a unix socket. Every node loads the same site; only its
// ports and its INSTANCE variable differ, and its feeds send the variable
// upstream as X-Instance, so that the fake upstreams know which node reads
// them.

// startClusterRedis starts a redis-server for the test, or skips the test,
// saying so in the summary line, when there is none.
func startClusterRedis(t *testing.T) *clustertest.Redis {
	t.Helper()
	if testing.Short() {
		t.Skip("runs several caddy processes and redis-server")
	}
	requireProgram(t, "redis-server")
	return clustertest.StartRedis(t)
}

// clusterOption is the cluster subdirective of a feed shared through r,
// with lease.
func clusterOption(r *clustertest.Redis, lease time.Duration) string {
	return fmt.Sprintf("cluster redis {\n\t\taddress %s\n\t\tlease %v\n\t}", r.URL(), lease)
}

// instanceHeader makes a feed tell its upstream which node reads it. The
// placeholder is global, so the feed is the same on every node.
const instanceHeader = "header X-Instance {env.INSTANCE}"

// feedBlock returns an sse_feed block for path with the given options, one
// a line.
func feedBlock(path string, options ...string) string {
	return "sse_feed " + path + " {\n\t" + strings.Join(options, "\n\t") + "\n}\n"
}

// node is one Caddy process of a cluster test.
type node struct {
	name  string // its INSTANCE variable
	url   string // its site
	admin string // its admin endpoint, which serves its metrics
	proc  *process
}

// nodeConfig returns the Caddyfile of a node that serves site on port, with
// its admin endpoint and metrics on adminPort.
func nodeConfig(port, adminPort int, site string) string {
	return fmt.Sprintf(`{
	admin 127.0.0.1:%d
	http_port %d
	auto_https off
	persist_config off
	skip_install_trust
	grace_period 1s
	metrics
}
http://127.0.0.1:%d {
%s
}
`, adminPort, port, port, site)
}

// startNodes starts a node for each name, serving site.
func startNodes(t *testing.T, site string, names ...string) []*node {
	t.Helper()
	nodes := make([]*node, len(names))
	for i, name := range names {
		nodes[i] = startNode(t, name, site)
	}
	return nodes
}

// startNode runs the real binary as the node name, serving site, and waits
// until it answers. If the test fails, the node's log is shown.
func startNode(t *testing.T, name, site string) *node {
	t.Helper()
	port, adminPort := freePort(t), freePort(t)
	n := &node{
		name:  name,
		url:   "http://127.0.0.1:" + strconv.Itoa(port),
		admin: "http://127.0.0.1:" + strconv.Itoa(adminPort),
	}
	// Registered before the process's own cleanup, this runs after it has
	// killed the process, when the output is complete.
	t.Cleanup(func() {
		if t.Failed() && n.proc != nil {
			<-n.proc.exited
			t.Logf("log of node %s:\n%s", name, lastLines(n.proc.output.String(), 60))
		}
	})
	// The process inherits the variable as it starts.
	t.Setenv("INSTANCE", name)
	n.proc = runCaddyfile(t, writeCaddyfile(t, nodeConfig(port, adminPort, site)), n.url+"/")
	return n
}

// signal sends sig to the node's process.
func (n *node) signal(t *testing.T, sig os.Signal) {
	t.Helper()
	require.NoError(t, n.proc.proc.Signal(sig), "signal %v to node %s", sig, n.name)
}

// stop kills the node and returns its log.
func (n *node) stop(t *testing.T) string {
	t.Helper()
	_ = n.proc.proc.Kill()
	<-n.proc.exited
	return n.proc.output.String()
}

// metric scrapes the value of one series from the node, 0 when there is
// none.
func (n *node) metric(t require.TestingT, series string) float64 {
	resp, err := http.Get(n.admin + "/metrics")
	require.NoError(t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, resp.StatusCode, "GET /metrics")
	v, _ := metricValue(string(body), series)
	return v
}

// leaseHolders waits until exactly one node reports that it holds the
// lease of the feed named feed, and returns it.
func leaseHolder(t *testing.T, nodes []*node, feed string) *node {
	t.Helper()
	series := fmt.Sprintf(`caddy_sse_feed_cluster_lease_held{feed=%q}`, feed)
	var holder *node
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		holder = nil
		var held []string
		for _, n := range nodes {
			if n.metric(c, series) == 1 {
				holder = n
				held = append(held, n.name)
			}
		}
		require.Len(c, held, 1, "nodes holding the lease of %s", feed)
	}, 10*time.Second, 50*time.Millisecond)
	return holder
}

// lastLines returns the last n lines of text.
func lastLines(text string, n int) string {
	lines := strings.SplitAfter(text, "\n")
	return strings.Join(lines[max(len(lines)-n, 0):], "")
}

// witness is a fake upstream in front of a handler: it records every
// request, with the node that sent it, and the requests open at once.
type witness struct {
	*httptest.Server
	watched

	requests []witnessed
	open     map[*witnessed]struct{}
	maxOpen  int
}

// witnessed is one request a witness saw.
type witnessed struct {
	instance string // its X-Instance header
	path     string
	query    string
	start    time.Time
}

// newWitness serves next behind a witness. The witness closes its
// connections when the test ends, after calling stop, if not nil, which
// must make next's long responses return.
func newWitness(t *testing.T, next http.Handler, stop func()) *witness {
	w := &witness{open: make(map[*witnessed]struct{})}
	w.Server = httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		req := &witnessed{instance: r.Header.Get("X-Instance"), path: r.URL.Path, query: r.URL.RawQuery, start: time.Now()}
		w.mu.Lock()
		w.requests = append(w.requests, *req)
		w.open[req] = struct{}{}
		w.maxOpen = max(w.maxOpen, len(w.open))
		w.notify()
		w.mu.Unlock()
		defer func() {
			w.mu.Lock()
			delete(w.open, req)
			w.notify()
			w.mu.Unlock()
		}()
		next.ServeHTTP(rw, r)
	}))
	t.Cleanup(func() {
		if stop != nil {
			stop()
		}
		w.Config.SetKeepAlivesEnabled(false)
		w.CloseClientConnections()
		w.Close()
	})
	return w
}

// Requests returns the requests seen so far, in the order they came.
func (w *witness) Requests() []witnessed {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.requests)
}

// MaxOpen returns the most requests that were open at once.
func (w *witness) MaxOpen() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.maxOpen
}

// WaitOpen waits until the open requests, oldest first, are as cond
// wants, described by want, and returns them.
func (w *witness) WaitOpen(t *testing.T, within time.Duration, want string, cond func(open []witnessed) bool) []witnessed {
	t.Helper()
	var open []witnessed
	w.waitUntil(t, within, func() (bool, string) {
		open = open[:0]
		for req := range w.open {
			open = append(open, *req)
		}
		slices.SortFunc(open, func(a, b witnessed) int { return a.start.Compare(b.start) })
		from := make([]string, len(open))
		for i, req := range open {
			from[i] = req.instance
		}
		return cond(open), fmt.Sprintf("upstream requests open from %q, want %s", from, want)
	})
	return open
}

// tailedUpstream returns a numbered NDJSON upstream producing an event
// every period, behind a witness, and the URL a tail resumes from with
// {sse_feed.last_id}.
func tailedUpstream(t *testing.T, period time.Duration) (*numberedUpstream, *witness, string) {
	up := newNumberedUpstream(t, period, 0)
	w := newWitness(t, up.Config.Handler, up.CutAll)
	return up, w, w.URL + "/stream?since={sse_feed.last_id}"
}

// roaming is a crowd of subscribers that hang up at random and come back
// on a random node with their Last-Event-ID, as browsers behind a load
// balancer do.
type roaming struct {
	client  *http.Client
	path    string
	maxStay time.Duration
	roamers []*roamer
	// settled stops the hang-ups: each roamer's next connection stays.
	settled atomic.Bool

	mu sync.Mutex
	up []*node // the nodes roamers connect to
}

// startRoaming starts n roamers reading path, each first on first (nil: a
// random node), then on random nodes among those up, each connection
// lasting up to maxStay. They stop when the test ends.
func startRoaming(t *testing.T, nodes []*node, first *node, path string, n int, maxStay time.Duration) *roaming {
	t.Helper()
	g := &roaming{client: newStreamClient(t), path: path, maxStay: maxStay, up: slices.Clone(nodes)}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	t.Cleanup(func() {
		cancel()
		wg.Wait()
	})
	for range n {
		r := &roamer{seen: make(map[int]bool), visited: make(map[string]bool)}
		g.roamers = append(g.roamers, r)
		wg.Go(func() { r.run(ctx, g, first) })
	}
	return g
}

// SetUp sets the nodes that roamers connect to from now on.
func (g *roaming) SetUp(nodes ...*node) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.up = slices.Clone(nodes)
}

func (g *roaming) pick() *node {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.up[rand.N(len(g.up))]
}

// Settle makes every roamer's next connection its last: it stays.
func (g *roaming) Settle() { g.settled.Store(true) }

// WaitAllPast waits until every roamer has received id.
func (g *roaming) WaitAllPast(t *testing.T, id int, within time.Duration) {
	t.Helper()
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		for i, r := range g.roamers {
			s := r.snapshot()
			require.GreaterOrEqual(c, s.max, id, "roamer %d has received up to id %d (%s)", i, s.max, s)
		}
	}, within, 20*time.Millisecond)
}

// Check fails unless every roamer has received every id from its first to
// its last once, in order, and no reset, and the roamers came back a few
// times each. It logs the totals.
func (g *roaming) Check(t *testing.T) {
	t.Helper()
	var total roamerStats
	for i, r := range g.roamers {
		s := r.snapshot()
		assert.Zero(t, s.lost+s.repeated+s.outOfOrder+s.resets+s.bad, "roamer %d: %s", i, s)
		total.add(s)
	}
	t.Logf("%d roamers: %s", len(g.roamers), total)
	assert.GreaterOrEqual(t, total.connections, 3*len(g.roamers), "connections of %d roamers", len(g.roamers))
}

// roamer is one subscriber of a roaming crowd. It joins the ids it
// receives across its connections.
type roamer struct {
	mu         sync.Mutex
	lastID     string // the Last-Event-ID it sends, as a browser would
	seen       map[int]bool
	first, max int
	stats      roamerStats
	visited    map[string]bool
}

// roamerStats are what roamers saw.
type roamerStats struct {
	received, lost, repeated, outOfOrder, resets, bad int
	connections, failures, nodes                      int
	first, max                                        int
}

func (s roamerStats) String() string {
	return fmt.Sprintf("ids %d to %d: %d events, %d lost, %d repeated, %d out of order, %d resets, %d bad; %d connections (%d failed) to %d nodes",
		s.first, s.max, s.received, s.lost, s.repeated, s.outOfOrder, s.resets, s.bad, s.connections, s.failures, s.nodes)
}

func (s *roamerStats) add(o roamerStats) {
	s.received += o.received
	s.lost += o.lost
	s.repeated += o.repeated
	s.outOfOrder += o.outOfOrder
	s.resets += o.resets
	s.bad += o.bad
	s.connections += o.connections
	s.failures += o.failures
	s.nodes = max(s.nodes, o.nodes)
	if s.first == 0 || o.first > 0 && o.first < s.first {
		s.first = o.first
	}
	s.max = max(s.max, o.max)
}

func (r *roamer) snapshot() roamerStats {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.stats
	s.first, s.max, s.nodes = r.first, r.max, len(r.visited)
	if r.first > 0 {
		s.lost = r.max - r.first + 1 - len(r.seen)
	}
	return s
}

// run connects, reads for a random while and connects again, until ctx
// ends.
func (r *roamer) run(ctx context.Context, g *roaming, first *node) {
	n := first
	for ctx.Err() == nil {
		if n == nil {
			n = g.pick()
		}
		var stay time.Duration
		if !g.settled.Load() {
			stay = time.Millisecond + rand.N(g.maxStay)
		}
		r.connect(ctx, g.client, n, g.path, stay)
		n = nil
	}
}

// connect reads one connection to n for stay, or until ctx ends if stay
// is 0.
func (r *roamer) connect(ctx context.Context, client *http.Client, n *node, path string, stay time.Duration) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if stay > 0 {
		defer time.AfterFunc(stay, cancel).Stop()
	}
	r.mu.Lock()
	lastID := r.lastID
	r.stats.connections++
	r.visited[n.name] = true
	r.mu.Unlock()
	resp, err := ssetest.Get(ctx, client, n.url+path, "Last-Event-ID", lastID)
	if err != nil {
		if ctx.Err() == nil {
			r.mu.Lock()
			r.stats.failures++
			r.mu.Unlock()
			// A node that went away a moment ago: try another soon.
			sleepCtx(ctx, 20*time.Millisecond)
		}
		return
	}
	defer resp.Body.Close()
	reader := ssetest.NewReader(resp.Body)
	for {
		item, err := reader.Next()
		if err != nil {
			return
		}
		if item.Event != nil {
			r.record(*item.Event)
		}
	}
}

// record joins one event to what the roamer received.
func (r *roamer) record(ev ssetest.Event) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lastID = ev.LastEventID
	if ev.Type == "reset" {
		r.stats.resets++
		return
	}
	id, err := strconv.Atoi(ev.LastEventID)
	if err != nil || !ev.HasIDField {
		r.stats.bad++
		return
	}
	r.stats.received++
	switch {
	case r.seen[id]:
		r.stats.repeated++
		return
	case id < r.max:
		r.stats.outOfOrder++
	}
	r.seen[id] = true
	if r.first == 0 || id < r.first {
		r.first = id
	}
	r.max = max(r.max, id)
}

// nextEventWithin returns the stream's next event, waiting up to within;
// the stream must go on sending heartbeats meanwhile, since each item is
// due within 5s.
func nextEventWithin(t *testing.T, s *ssetest.Stream, within time.Duration) ssetest.Event {
	t.Helper()
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		if item := s.Next(t); item.Event != nil {
			return *item.Event
		}
	}
	t.Fatalf("no event within %v", within)
	return ssetest.Event{}
}

// numericID returns the number an event's id holds.
func numericID(t *testing.T, ev ssetest.Event) int {
	t.Helper()
	require.True(t, ev.HasIDField, "event without id: %+v", ev)
	return mustAtoi(t, ev.LastEventID)
}

// writeCaddyfile writes config to a Caddyfile of its own and returns its
// path.
func writeCaddyfile(t *testing.T, config string) string {
	t.Helper()
	file := filepath.Join(t.TempDir(), "Caddyfile")
	require.NoError(t, os.WriteFile(file, []byte(config), 0o600))
	return file
}
