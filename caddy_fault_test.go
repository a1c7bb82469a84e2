package ssefeed_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/caddyserver/caddy/v2/caddytest"

	"github.com/ssefeed/caddy-ssefeed/internal/ssetest"
)

// numberedUpstream is an NDJSON upstream whose events are numbered 1, 2, 3,
// ... at a steady rate whether or not anyone reads them. A request resumes
// after the id in its since query parameter, or starts with the next event
// when since is empty, so a tail that sends {sse_feed.last_id} loses nothing
// across reconnects. On demand it cuts its connections, in the middle of a
// line or between lines, and answers 503 for a while.
type numberedUpstream struct {
	*httptest.Server
	padding string

	mu        sync.Mutex
	produced  int
	born      []time.Time   // born[i] is when id i+1 was produced
	grew      chan struct{} // closed and replaced when produced grows
	cut       chan struct{} // closed and replaced to cut every connection
	changed   chan struct{} // closed and replaced when open changes
	failUntil time.Time
	maxLife   time.Duration // cut each connection at a random moment within it; 0: never
	open      int
	requests  int
	refused   int
	cuts      int
}

// newNumberedUpstream starts an upstream producing one event every period,
// each line padded with padding bytes.
func newNumberedUpstream(t *testing.T, period time.Duration, padding int) *numberedUpstream {
	u := &numberedUpstream{
		padding: strings.Repeat("x", padding),
		grew:    make(chan struct{}),
		cut:     make(chan struct{}),
		changed: make(chan struct{}),
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
	u.requests++
	if time.Now().Before(u.failUntil) {
		u.refused++
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
	u.cuts++
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
	close(u.changed)
	u.changed = make(chan struct{})
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

// WaitOpen waits until exactly n connections are open.
func (u *numberedUpstream) WaitOpen(t *testing.T, n int, within time.Duration) {
	t.Helper()
	deadline := time.After(within)
	for {
		u.mu.Lock()
		open, changed := u.open, u.changed
		u.mu.Unlock()
		if open == n {
			return
		}
		select {
		case <-changed:
		case <-deadline:
			t.Fatalf("upstream has %d open connections, want %d", open, n)
		}
	}
}

// getStream opens an event stream on the test site with client, sending
// lastID as Last-Event-ID unless it is empty.
func getStream(ctx context.Context, client *http.Client, path, lastID string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, siteURL+path, nil)
	if err != nil {
		return nil, err
	}
	if lastID != "" {
		req.Header.Set("Last-Event-ID", lastID)
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		return nil, fmt.Errorf("status %d", resp.StatusCode)
	}
	return resp, nil
}

// newStreamClient returns a client for many concurrent streams, closed
// with the test. Each stream has a connection of its own: one that the
// server ended is not reused, so that a reload closing idle connections
// cannot fail the next request.
func newStreamClient(t *testing.T) *http.Client {
	transport := &http.Transport{DisableKeepAlives: true}
	t.Cleanup(transport.CloseIdleConnections)
	return &http.Client{Transport: transport}
}

// faultDuration is how long the fault-injection test runs: 20s, or the
// duration in SSEFEED_FAULT_DURATION.
func faultDuration(t *testing.T) time.Duration {
	v := os.Getenv("SSEFEED_FAULT_DURATION")
	if v == "" {
		return 20 * time.Second
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		t.Fatalf("SSEFEED_FAULT_DURATION: %v", err)
	}
	return d
}

const (
	faultPeriod      = 20 * time.Millisecond
	faultReplay      = 400
	faultSubscribers = 120
)

// faultSite is the site of the fault-injection test: version changes the
// feed, extra changes the config outside it.
func faultSite(up *numberedUpstream, version int, extra string) string {
	return fmt.Sprintf(`sse_feed /events {
	tail %s&v=%d
	id /id
	replay %d
	heartbeat 1s
	linger 1s
}
%s`, up.feedURL(), version, faultReplay, extra)
}

// reloadLog records the reloads of a test with their times.
type reloadLog struct {
	mu      sync.Mutex
	reloads []reload
}

type reload struct {
	start, end  time.Time
	feedChanged bool
}

// do loads site and records the reload.
func (l *reloadLog) do(t *testing.T, load func(), feedChanged bool) {
	start := time.Now()
	load()
	l.mu.Lock()
	defer l.mu.Unlock()
	l.reloads = append(l.reloads, reload{start, time.Now(), feedChanged})
}

// around reports whether a reload was under way between from and to, give
// or take a second for streams of the old config that were still writing.
// With feedChanged, only reloads that changed the feed count.
func (l *reloadLog) around(from, to time.Time, feedChanged bool) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, r := range l.reloads {
		if (r.feedChanged || !feedChanged) && from.Before(r.end.Add(time.Second)) && to.After(r.start) {
			return true
		}
	}
	return false
}

// faultStats counts what subscribers saw.
type faultStats struct {
	events, conns       int
	lost, repeated      int
	resets, feedResets  int // resets after an eviction / across a changed feed
	longAbsences        int
	serverEnds, dropped int
	connectErrors       int
	evictedEnds         int // streams ended because a burst evicted their cursor
}

func (s *faultStats) add(o faultStats) {
	s.events += o.events
	s.conns += o.conns
	s.lost += o.lost
	s.repeated += o.repeated
	s.resets += o.resets
	s.feedResets += o.feedResets
	s.longAbsences += o.longAbsences
	s.serverEnds += o.serverEnds
	s.dropped += o.dropped
	s.connectErrors += o.connectErrors
	s.evictedEnds += o.evictedEnds
}

// faultSubscriber is one client of the fault-injection test: it checks that
// the ids it sees, joined across its connections, are the upstream's
// sequence, with a gap or a step back only right after a reset that was due.
type faultSubscriber struct {
	name    string
	reloads *reloadLog
	report  func(format string, args ...any)
	front   *atomic.Int64 // the newest id any subscriber has seen

	last       int       // last id seen; 0 before the first
	lastAt     time.Time // when it was seen
	resetFrom  int       // the id a reset was answered to, until the next event; 0: none
	resetAt    time.Time
	serverEnds []time.Time
	// evictionResets are when the subscriber got a reset because its id
	// had been evicted.
	evictionResets []time.Time
	stats          faultStats
}

// connect reads one connection until ctx ends, the server ends the stream,
// or, when until > 0, an id of at least until arrives. It returns whether
// the server ended the stream.
func (s *faultSubscriber) connect(ctx context.Context, client *http.Client, until int) bool {
	lastID := ""
	if s.last > 0 {
		lastID = strconv.Itoa(s.last)
	}
	resp, err := getStream(ctx, client, "/events", lastID)
	if err != nil {
		// A connection refused or reset, as happens when 120 clients come
		// back at once or a reload hands over: EventSource, like this test,
		// tries again. What it must not cost is an event, which the ids
		// check.
		if ctx.Err() == nil {
			s.stats.connectErrors++
		}
		return false
	}
	defer resp.Body.Close()
	s.stats.conns++
	r := ssetest.NewReader(resp.Body)
	for sawEvent := false; ; {
		item, err := r.Next()
		if err != nil {
			if ctx.Err() != nil {
				return false
			}
			s.serverEnds = append(s.serverEnds, time.Now())
			return true
		}
		ev := item.Event
		switch {
		case ev == nil:
			continue
		case ev.Type == "reset":
			s.reset(!sawEvent, lastID, ev.Data)
			sawEvent = true
			continue
		}
		sawEvent = true
		id, err := strconv.Atoi(ev.LastEventID)
		if err != nil {
			s.report("%s: event with id %q", s.name, ev.LastEventID)
			continue
		}
		s.event(id)
		if until > 0 && id >= until {
			return false
		}
	}
}

func (s *faultSubscriber) reset(first bool, lastID, data string) {
	switch {
	case !first:
		s.report("%s: reset in the middle of a stream", s.name)
	case lastID == "":
		s.report("%s: reset without a Last-Event-ID", s.name)
	case data != `{"last_event_id":"`+lastID+`"}`:
		s.report("%s: reset data %s for Last-Event-ID %s", s.name, data, lastID)
	}
	s.resetFrom, s.resetAt = s.last, time.Now()
}

func (s *faultSubscriber) event(id int) {
	s.stats.events++
	switch {
	case s.resetFrom > 0 && s.reloads.around(s.lastAt, s.resetAt, true):
		// The feed changed: its new log never had the id.
		s.stats.feedResets++
	case s.resetFrom > 0 && id > s.resetFrom:
		// The id the subscriber brought was evicted: the oldest
		// retained event is newer.
		s.stats.resets++
		s.evictionResets = append(s.evictionResets, s.resetAt)
	case s.resetFrom > 0:
		s.report("%s: reset after %d although the log still had it (next %d)", s.name, s.resetFrom, id)
		s.stats.repeated++
	case s.last == 0 || id == s.last+1:
	case id > s.last+1:
		s.report("%s: lost %d..%d", s.name, s.last+1, id-1)
		s.stats.lost += id - s.last - 1
	default:
		s.report("%s: %d after %d", s.name, id, s.last)
		s.stats.repeated++
	}
	s.last, s.lastAt, s.resetFrom = id, time.Now(), 0
	for front := s.front.Load(); int64(id) > front; front = s.front.Load() {
		if s.front.CompareAndSwap(front, int64(id)) {
			break
		}
	}
}

// run connects, hangs up at random moments and reconnects, until ctx ends;
// then it reconnects once more and reads until the id final() returns.
func (s *faultSubscriber) run(ctx context.Context, client *http.Client, final func() int) {
	sleepCtx(ctx, rand.N(time.Second))
	for ctx.Err() == nil {
		connCtx, cancel := context.WithTimeout(ctx, 100*time.Millisecond+rand.N(3*time.Second))
		s.connect(connCtx, client, 0)
		cancel()
		pause := rand.N(300 * time.Millisecond)
		sleepCtx(ctx, pause)
		if rand.N(10) == 0 {
			// Away until the feed has published more than the replay
			// window holds, as the others see: the log has moved on.
			s.stats.longAbsences++
			for ctx.Err() == nil && int(s.front.Load()) <= s.last+faultReplay+10 {
				sleepCtx(ctx, 100*time.Millisecond)
			}
		}
	}
	target := final()
	catchUp, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for catchUp.Err() == nil && s.last < target {
		s.connect(catchUp, client, target)
	}
	if s.last < target {
		s.report("%s: reached %d, not %d, after the faults stopped", s.name, s.last, target)
	}
}

// sleepCtx sleeps for d or until ctx ends.
func sleepCtx(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

// TestFaultDeliveryExactlyOnce runs an upstream that cuts its connections
// and answers 503 for a while, reloads Caddy with the feed unchanged and
// changed, and checks that every subscriber, hanging up and resuming at
// random, sees each id exactly once and in order, with a reset only when it
// was away longer than the replay window or the feed changed.
func TestFaultDeliveryExactlyOnce(t *testing.T) {
	duration := faultDuration(t)
	up := newNumberedUpstream(t, faultPeriod, 64)
	up.CutWithin(2 * time.Second)
	tester := startCaddy(t, faultSite(up, 1, ""))
	client := newStreamClient(t)
	reloads := &reloadLog{}
	load := func(site string) func() {
		return func() { tester.InitServer(caddyfile(site), "caddyfile") }
	}

	var failures []string
	var failMu sync.Mutex
	report := func(format string, args ...any) {
		failMu.Lock()
		defer failMu.Unlock()
		failures = append(failures, fmt.Sprintf(format, args...))
	}

	ctx, stop := context.WithTimeout(context.Background(), duration)
	defer stop()
	var target int
	targetSet := make(chan struct{})
	final := func() int {
		<-targetSet
		return target
	}
	var front atomic.Int64
	subscribers := make([]*faultSubscriber, faultSubscribers)
	var wg sync.WaitGroup
	for i := range subscribers {
		s := &faultSubscriber{name: fmt.Sprintf("subscriber %d", i), reloads: reloads, report: report, front: &front}
		subscribers[i] = s
		wg.Go(func() { s.run(ctx, client, final) })
	}

	// Faults: every 1 to 3 s cut every connection, and half the time answer
	// 503 for 0.5 to 2 s first; the first time always, for 3 s, so that a
	// reconnect surely meets it. Connections also end at random within 2 s
	// on their own.
	var faultsDone sync.WaitGroup
	faultsDone.Go(func() {
		for i := 0; ; i++ {
			sleepCtx(ctx, time.Second+rand.N(2*time.Second))
			if ctx.Err() != nil {
				return
			}
			switch {
			case i == 0:
				up.FailFor(3 * time.Second)
			case rand.N(2) == 0:
				up.FailFor(500*time.Millisecond + rand.N(1500*time.Millisecond))
			}
			up.CutAll()
		}
	})
	// Reloads at a quarter, half and three quarters of the run: changed,
	// then unchanged twice, which leaves the second half of the run to
	// absences longer than the replay window that end in a reset.
	faultsDone.Go(func() {
		for i, step := range []struct {
			version int
			extra   string
		}{{2, `respond /other "one"`}, {2, `respond /other "two"`}, {2, `respond /other "three"`}} {
			sleepCtx(ctx, duration/4)
			if ctx.Err() != nil {
				return
			}
			reloads.do(t, load(faultSite(up, step.version, step.extra)), i == 0)
		}
	})

	// A probe certain to come back after its id has left the log: it takes
	// one event halfway through, after the changed reload, and returns with
	// it once every subscriber has caught up, hundreds of events later.
	var probeID string
	faultsDone.Go(func() {
		sleepCtx(ctx, duration/2)
		resp, err := getStream(ctx, client, "/events", "")
		if err != nil {
			return
		}
		defer resp.Body.Close()
		if ev, err := ssetest.NewReader(resp.Body).NextEvent(); err == nil {
			probeID = ev.LastEventID
		}
	})

	<-ctx.Done()
	faultsDone.Wait()
	up.CutWithin(0)
	target = up.Produced() + 10
	close(targetSet)
	wg.Wait()
	expectEvictionReset(t, client, probeID, target)

	var total faultStats
	for _, s := range subscribers {
		for _, at := range s.serverEnds {
			// A burst bigger than the replay log, such as the backlog an
			// upstream sends after an outage, evicts what even a fast
			// subscriber had not read yet: it is disconnected and, as SPEC
			// says, resumes with a reset.
			evicted := slices.ContainsFunc(s.evictionResets, func(r time.Time) bool {
				return !r.Before(at) && r.Sub(at) < 3*time.Second
			})
			if evicted {
				s.stats.evictedEnds++
			} else if !reloads.around(at, at, true) {
				s.stats.dropped++
				report("%s: stream ended by the server at %v outside a feed change", s.name, at.Format(time.TimeOnly+".000"))
			}
		}
		s.stats.serverEnds = len(s.serverEnds)
		total.add(s.stats)
	}
	up.mu.Lock()
	produced, requests, refused, cuts := up.produced, up.requests, up.refused, up.cuts
	up.mu.Unlock()
	t.Logf("%v, %d subscribers: upstream produced %d events, answered %d requests (%d with 503), cut %d connections; %d reloads",
		duration, faultSubscribers, produced, requests, refused, cuts, len(reloads.reloads))
	t.Logf("delivered %d events over %d connections; lost %d, repeated %d; %d resets after eviction, %d across the changed feed; %d absences longer than the replay window; %d streams ended by the server (%d for a burst that evicted their place, %d otherwise outside a feed change); %d connection attempts failed and were retried",
		total.events, total.conns, total.lost, total.repeated, total.resets, total.feedResets, total.longAbsences, total.serverEnds, total.evictedEnds, total.dropped, total.connectErrors)
	for i, f := range failures {
		if i == 20 {
			t.Errorf("... and %d more", len(failures)-20)
			break
		}
		t.Error(f)
	}
	if len(reloads.reloads) != 3 {
		t.Errorf("%d reloads, want 3", len(reloads.reloads))
	}
	if total.feedResets == 0 {
		t.Error("no subscriber came back across the changed feed")
	}
	if refused == 0 || cuts == 0 {
		t.Errorf("the upstream faults were not exercised: %d refused, %d cut", refused, cuts)
	}
}

// expectEvictionReset resumes from probeID, which must be more than the
// replay window older than the feed's newest id, target, and expects the
// reset event and then the oldest retained event, newer than probeID.
func expectEvictionReset(t *testing.T, client *http.Client, probeID string, target int) {
	t.Helper()
	probe, err := strconv.Atoi(probeID)
	if err != nil || target-probe <= faultReplay {
		t.Fatalf("the probe took id %q, not one more than %d events before %d", probeID, faultReplay, target)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := getStream(ctx, client, "/events", probeID)
	if err != nil {
		t.Fatalf("the probe could not come back: %v", err)
	}
	defer resp.Body.Close()
	r := ssetest.NewReader(resp.Body)
	reset, err := r.NextEvent()
	if err != nil || reset.Type != "reset" || reset.Data != `{"last_event_id":"`+probeID+`"}` {
		t.Fatalf("back with evicted id %s: first event %+v (%v), want the reset", probeID, reset, err)
	}
	next, err := r.NextEvent()
	if id, _ := strconv.Atoi(next.LastEventID); err != nil || id <= probe+1 {
		t.Fatalf("after the reset for %s: event %+v (%v), want the oldest retained, newer than %d", probeID, next, err, probe+1)
	}
}

// startCaddyWithServers is startCaddy with options for Caddy's servers
// global block, such as timeouts.
func startCaddyWithServers(t *testing.T, servers, site string) *caddytest.Tester {
	t.Helper()
	config := strings.Replace(caddyfile(site), "\tskip_install_trust\n",
		"\tskip_install_trust\n\tservers {\n"+servers+"\n\t}\n", 1)
	tester := caddytest.NewTester(t)
	tester.InitServer(config, "caddyfile")
	return tester
}

// adminMetric returns the sample of metric with exactly the given labels
// (as Prometheus writes them, e.g. `feed="slow"`) from Caddy's admin
// /metrics, or 0 when there is none.
func adminMetric(t *testing.T, metric, labels string) float64 {
	t.Helper()
	resp, err := http.Get("http://localhost:2999/metrics")
	if err != nil {
		t.Fatalf("reading metrics: %v", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading metrics: %v", err)
	}
	prefix := metric + "{" + labels + "} "
	for line := range strings.Lines(string(body)) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), prefix); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("metric %s: %v", line, err)
			}
			return f
		}
	}
	return 0
}

// waitMetric waits until cond holds for the metric's sample.
func waitMetric(t *testing.T, metric, labels string, within time.Duration, cond func(float64) bool) float64 {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		v := adminMetric(t, metric, labels)
		if cond(v) {
			return v
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s{%s} = %v after %v", metric, labels, v, within)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// heapInuse returns the heap in use after a garbage collection.
func heapInuse() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse
}

// latencies collects delivery latencies.
type latencies struct {
	mu sync.Mutex
	d  []time.Duration
}

func (l *latencies) add(d time.Duration) {
	l.mu.Lock()
	l.d = append(l.d, d)
	l.mu.Unlock()
}

// String gives the count, median, 99th percentile and maximum.
func (l *latencies) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.d) == 0 {
		return "no events"
	}
	d := slices.Clone(l.d)
	slices.Sort(d)
	return fmt.Sprintf("%d events, p50 %v, p99 %v, max %v", len(d), d[len(d)/2], d[len(d)*99/100], d[len(d)-1])
}

// stalledClient opens a stream over a raw TCP connection with a tiny
// receive buffer and never reads it.
func stalledClient(t *testing.T, path, lastID string) net.Conn {
	t.Helper()
	dialer := net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		var err error
		if cerr := c.Control(func(fd uintptr) {
			err = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096)
		}); cerr != nil {
			return cerr
		}
		return err
	}}
	conn, err := dialer.Dial("tcp", "127.0.0.1:9080")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	request := "GET " + path + " HTTP/1.1\r\nHost: localhost:9080\r\n"
	if lastID != "" {
		request += "Last-Event-ID: " + lastID + "\r\n"
	}
	if _, err := io.WriteString(conn, request+"\r\n"); err != nil {
		t.Fatal(err)
	}
	return conn
}

// TestSlowSubscriberIsDroppedWithoutDelayingOthers measures two readers'
// delivery before and while three clients stop reading a feed of large
// events: every event reaches the readers, the heap stays within the replay
// log's bounds, and each stalled client is dropped and resumes with its
// Last-Event-ID.
func TestSlowSubscriberIsDroppedWithoutDelayingOthers(t *testing.T) {
	const (
		replayBytes = 4 << 20
		stalled     = 3
		readers     = 2
	)
	up := newNumberedUpstream(t, 10*time.Millisecond, 32<<10)
	startCaddyWithServers(t, "\t\ttimeouts {\n\t\t\twrite_idle 5s\n\t\t}", `sse_feed /events {
	tail `+up.feedURL()+`
	id /id
	replay_bytes 4MiB
	heartbeat 1s
	name slow
}`)
	client := newStreamClient(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	var phase atomic.Pointer[latencies]
	without, with := &latencies{}, &latencies{}
	phase.Store(without)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	started := make(chan struct{}, readers)
	for i := range readers {
		wg.Go(func() {
			resp, err := getStream(ctx, client, "/events", "")
			if err != nil {
				t.Errorf("reader %d: %v", i, err)
				return
			}
			defer resp.Body.Close()
			r := ssetest.NewReader(resp.Body)
			last := 0
			for {
				item, err := r.Next()
				if err != nil {
					if ctx.Err() == nil {
						t.Errorf("reader %d: stream ended after %d: %v", i, last, err)
					}
					return
				}
				if item.Event == nil {
					continue
				}
				id, _ := strconv.Atoi(item.Event.LastEventID)
				phase.Load().add(time.Since(up.Born(id)))
				if last == 0 {
					started <- struct{}{}
				} else if id != last+1 {
					t.Errorf("reader %d: %d after %d", i, id, last)
				}
				last = id
			}
		})
	}
	for range readers {
		<-started
	}
	time.Sleep(3 * time.Second)
	baseline := heapInuse()

	phase.Store(with)
	published := up.Produced()
	conns := make([]net.Conn, stalled)
	for i := range conns {
		conns[i] = stalledClient(t, "/events", "")
	}
	waitMetric(t, "caddy_sse_feed_subscribers", `feed="slow"`, 5*time.Second, func(v float64) bool { return v == readers+stalled })
	// Sample the heap until the server drops the stalled clients.
	var peak uint64
	dropStart := time.Now()
	for adminMetric(t, "caddy_sse_feed_subscribers", `feed="slow"`) > readers {
		if time.Since(dropStart) > 60*time.Second {
			t.Fatal("stalled clients still connected after 60s")
		}
		peak = max(peak, heapInuse())
		time.Sleep(250 * time.Millisecond)
	}
	dropped := time.Since(dropStart)
	published = up.Produced() - published
	time.Sleep(2 * time.Second)
	cancel()
	wg.Wait()

	t.Logf("readers without stalled clients: %v", without)
	t.Logf("readers with %d stalled clients: %v", stalled, with)
	t.Logf("stalled clients dropped after %v, while %d events of 32 KiB were published; heap in use %d MiB before, peak %d MiB",
		dropped.Round(time.Millisecond), published, baseline>>20, peak>>20)
	if bound := baseline + (stalled+1)*replayBytes + 16<<20; peak > bound {
		t.Errorf("heap in use peaked at %d MiB, over the bound of %d MiB", peak>>20, bound>>20)
	}

	// Each stalled client got a prefix of the stream, then the end; it
	// resumes with the last id it got.
	for i, conn := range conns {
		_ = conn.SetReadDeadline(time.Now().Add(20 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatalf("stalled client %d: %v", i, err)
		}
		r := ssetest.NewReader(resp.Body)
		lastID := ""
		for {
			item, err := r.Next()
			if err != nil {
				if os.IsTimeout(err) {
					t.Fatalf("stalled client %d: stream not ended", i)
				}
				break
			}
			if item.Event != nil {
				lastID = item.Event.LastEventID
			}
		}
		if lastID == "" {
			continue // dropped before its first whole event
		}
		s := openStream(t, "/events", "Last-Event-ID", lastID)
		ev := s.NextEvent(t)
		if ev.Type == "reset" {
			ev = s.NextEvent(t)
		} else if want := strconv.Itoa(mustAtoi(t, lastID) + 1); ev.LastEventID != want {
			t.Errorf("stalled client %d resumed after %s with %s, want %s", i, lastID, ev.LastEventID, want)
		}
		t.Logf("stalled client %d: last id %s, resumed with %s", i, lastID, ev.LastEventID)
		s.Close()
	}
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

// expectComments waits for n comments on s, failing on an event.
func expectComments(t *testing.T, s *ssetest.Stream, n int) {
	t.Helper()
	for n > 0 {
		item := s.Next(t)
		if item.Event != nil {
			t.Fatalf("unexpected event %+v", *item.Event)
		}
		if item.IsComment {
			n--
		}
	}
}

func TestInvalidUTF8BecomesReplacementCharacters(t *testing.T) {
	up := newNDJSONUpstream(t)
	startCaddy(t, `sse_feed /events {
	tail `+up.URL+`
	id /id
	data /body
}`)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	resp, err := getStream(ctx, http.DefaultClient, "/events", "")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var raw bytes.Buffer
	r := ssetest.NewReader(io.TeeReader(resp.Body, &raw))
	up.WaitConnected(t, 1)
	up.Send("{\"id\":\"1\",\"body\":\"a\xffb\"}\n")
	up.Send("{\"id\":\"2\",\"body\":{\"k\":\"c\xfe\xffd\"}}\n")
	up.Send("{\"id\":\"3\",\"body\":\"fine\"}\n")
	var got []string
	for len(got) < 3 {
		item, err := r.Next()
		if err != nil {
			t.Fatalf("stream ended after %q: %v", got, err)
		}
		if item.Event != nil {
			got = append(got, item.Event.Data)
		}
	}
	if want := []string{"a\uFFFDb", `{"k":"c` + "\uFFFD\uFFFD" + `d"}`, "fine"}; !slices.Equal(got, want) {
		t.Errorf("data %q, want %q", got, want)
	}
	if !utf8.Valid(raw.Bytes()) {
		t.Errorf("the stream is not UTF-8: %q", raw.Bytes())
	}
}

func TestHugePollBodyIsSkipped(t *testing.T) {
	const huge = 50 << 20
	var hugeNow atomic.Bool
	var served, mostWritten atomic.Int64
	var doc atomic.Value
	doc.Store(`{"items":[{"id":"1"}]}`)
	up := newFuncUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		if !hugeNow.Load() {
			_, _ = io.WriteString(w, doc.Load().(string))
			return
		}
		written := 0
		defer func() {
			served.Add(1)
			if int64(written) > mostWritten.Load() {
				mostWritten.Store(int64(written))
			}
		}()
		chunk := bytes.Repeat([]byte("x"), 64<<10)
		_, _ = io.WriteString(w, `{"items":[{"id":"h","pad":"`)
		for written < huge {
			n, err := w.Write(chunk)
			written += n
			if err != nil {
				return
			}
		}
		_, _ = io.WriteString(w, `"}]}`)
	})
	startCaddy(t, `sse_feed /events {
	poll `+up.URL+` 200ms
	items /items
	id /id
	heartbeat 300ms
	name huge
}`)
	s := openStream(t, "/events")
	expectComments(t, s, 1)
	baseline := heapInuse()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	hugeNow.Store(true)
	waitMetric(t, "caddy_sse_feed_upstream_errors_total", `feed="huge",reason="too_large"`, 20*time.Second, func(v float64) bool { return v >= 3 })
	expectComments(t, s, 1)
	after := heapInuse()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	doc.Store(`{"items":[{"id":"1"},{"id":"2"}]}`)
	hugeNow.Store(false)
	if ev := s.NextEvent(t); ev.LastEventID != "2" {
		t.Errorf("event %+v after the huge bodies, want id 2", ev)
	}
	polls := max(served.Load(), 1)
	perPoll := (ms.TotalAlloc - before.TotalAlloc) / uint64(polls)
	t.Logf("%d polls of a %d MiB body: the upstream wrote at most %d MiB of one before the feed hung up; %d MiB allocated per poll; heap in use %d MiB before, %d MiB after",
		polls, huge>>20, mostWritten.Load()>>20, perPoll>>20, baseline>>20, after>>20)
	if mostWritten.Load() >= huge {
		t.Errorf("the feed read a whole %d MiB body", huge>>20)
	}
	if after > baseline+32<<20 {
		t.Errorf("heap in use grew from %d to %d MiB", baseline>>20, after>>20)
	}
}

func TestLineThatNeverEndsKeepsStreamsAlive(t *testing.T) {
	release := make(chan struct{})
	var streamed atomic.Int64
	up := newFuncUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Get("since") != "" {
			// A reconnect after the long line: resume.
			writeNDJSON(w, `{"id":"3"}`)
			<-r.Context().Done()
			return
		}
		writeNDJSON(w, `{"id":"1"}`)
		_, _ = io.WriteString(w, `{"id":"2","pad":"`)
		chunk := bytes.Repeat([]byte("x"), 64<<10)
		rc := http.NewResponseController(w)
		for {
			select {
			case <-release:
				writeNDJSON(w, `"}`, `{"id":"3"}`)
				<-r.Context().Done()
				return
			case <-r.Context().Done():
				return
			case <-time.After(5 * time.Millisecond):
			}
			if _, err := w.Write(chunk); err != nil || rc.Flush() != nil {
				return
			}
			streamed.Add(int64(len(chunk)))
		}
	})
	startCaddy(t, `sse_feed /events {
	tail `+up.URL+`?since={sse_feed.last_id}
	id /id
	heartbeat 300ms
	name endless
}`)
	s := openStream(t, "/events")
	if ev := s.NextEvent(t); ev.LastEventID != "1" {
		t.Fatalf("first event %+v", ev)
	}
	baseline := heapInuse()
	for streamed.Load() < 24<<20 {
		expectComments(t, s, 1)
	}
	after := heapInuse()
	close(release)
	if ev := s.NextEvent(t); ev.LastEventID != "3" {
		t.Errorf("event %+v after the long line, want id 3", ev)
	}
	t.Logf("a line of %d MiB and counting: heartbeats went on; heap in use %d MiB before, %d MiB after",
		streamed.Load()>>20, baseline>>20, after>>20)
	if after > baseline+24<<20 {
		t.Errorf("heap in use grew from %d to %d MiB while the line went on", baseline>>20, after>>20)
	}
}

func TestResponseThatNeverStartsIsRetried(t *testing.T) {
	var requests atomic.Int64
	answer := make(chan struct{})
	up := newFuncUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		requests.Add(1)
		select {
		case <-answer:
		case <-r.Context().Done():
			return
		}
		writeNDJSON(w, `{"id":"1"}`)
		<-r.Context().Done()
	})
	startCaddy(t, `sse_feed /events {
	tail `+up.URL+`
	id /id
	timeout 300ms
	heartbeat 300ms
}`)
	s := openStream(t, "/events")
	for requests.Load() < 3 {
		expectComments(t, s, 1)
	}
	close(answer)
	if ev := s.NextEvent(t); ev.LastEventID != "1" {
		t.Errorf("event %+v, want id 1", ev)
	}
	t.Logf("%d requests timed out before the upstream answered", requests.Load()-1)
}

func TestRedirectToAnotherHostIsRefused(t *testing.T) {
	var elsewhere atomic.Int64
	other := newFuncUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		elsewhere.Add(1)
		writeNDJSON(w, `{"id":"stolen"}`)
	})
	var redirects atomic.Int64
	up := newFuncUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/away":
			redirects.Add(1)
			http.Redirect(w, r, other.URL+"/stream", http.StatusFound)
		case "/moved":
			http.Redirect(w, r, "/stream", http.StatusMovedPermanently)
		default:
			writeNDJSON(w, `{"id":"here"}`)
			<-r.Context().Done()
		}
	})
	startCaddy(t, `sse_feed /away {
	tail `+up.URL+`/away
	id /id
	header Authorization "Bearer secret"
	heartbeat 300ms
	name away
}
sse_feed /moved {
	tail `+up.URL+`/moved
	id /id
	heartbeat 300ms
}`)
	moved := openStream(t, "/moved")
	if ev := moved.NextEvent(t); ev.LastEventID != "here" {
		t.Errorf("same-host redirect: event %+v, want id here", ev)
	}
	away := openStream(t, "/away")
	for redirects.Load() < 2 {
		expectComments(t, away, 1)
	}
	if n := elsewhere.Load(); n > 0 {
		t.Errorf("the other host got %d requests", n)
	}
	if v := adminMetric(t, "caddy_sse_feed_upstream_errors_total", `feed="away",reason="connect"`); v < 2 {
		t.Errorf("upstream connect errors = %v, want at least 2", v)
	}
}
