package integration

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ssefeed/caddy-ssefeed/internal/ssetest"
)

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

// do loads site into caddy and records the reload.
func (l *reloadLog) do(caddy *caddyServer, site string, feedChanged bool) {
	start := time.Now()
	caddy.reload(site)
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
	resp, err := ssetest.Get(ctx, client, siteURL+"/events", "Last-Event-ID", lastID)
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
		// A burst larger than the log evicted the place of a stream that
		// waited: the reset must name the last id it got.
		if data != `{"last_event_id":"`+strconv.Itoa(s.last)+`"}` {
			s.report("%s: reset in the middle of a stream with data %s after %d", s.name, data, s.last)
		}
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
	caddy := startCaddy(t, faultSite(up, 1, ""))
	client := newStreamClient(t)
	reloads := &reloadLog{}

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
			reloads.do(caddy, faultSite(up, step.version, step.extra), i == 0)
		}
	})

	// A probe certain to come back after its id has left the log: halfway
	// through, it takes the newest id that a subscriber has seen, and
	// returns with it once every subscriber has caught up, hundreds of
	// events later. An event of its own could be long in coming: the
	// faults may keep the upstream down until the run ends.
	var probeID string
	faultsDone.Go(func() {
		sleepCtx(ctx, duration/2)
		probeID = strconv.FormatInt(front.Load(), 10)
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
			// subscriber had not read yet: it is disconnected and, as the
			// README's Guarantees say, resumes with a reset.
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
	produced, upstream := up.Produced(), up.Stats()
	t.Logf("%v, %d subscribers: upstream produced %d events, answered %d requests (%d with 503), cut %d connections; %d reloads",
		duration, faultSubscribers, produced, upstream.requests, upstream.refused, upstream.cuts, len(reloads.reloads))
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
	if upstream.refused == 0 || upstream.cuts == 0 {
		t.Errorf("the upstream faults were not exercised: %d refused, %d cut", upstream.refused, upstream.cuts)
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
	resp, err := ssetest.Get(ctx, client, siteURL+"/events", "Last-Event-ID", probeID)
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
