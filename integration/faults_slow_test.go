package integration

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ssefeed/caddy-ssefeed/internal/ssetest"
)

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

// sorted returns the latencies so far, sorted.
func (l *latencies) sorted() []time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	d := slices.Clone(l.d)
	slices.Sort(d)
	return d
}

// longest returns the longest latency, 0 without events.
func (l *latencies) longest() time.Duration {
	d := l.sorted()
	if len(d) == 0 {
		return 0
	}
	return d[len(d)-1]
}

// String gives the count, median, 99th percentile and maximum.
func (l *latencies) String() string {
	d := l.sorted()
	if len(d) == 0 {
		return "no events"
	}
	return fmt.Sprintf("%d events, p50 %v, p99 %v, max %v", len(d), d[len(d)/2], d[len(d)*99/100], d[len(d)-1])
}

// timedReaders are streams of a numberedUpstream's feed, read in the
// background, that add how long after its production each event came to
// the latencies in force. A gap, or an end before stop, fails the test.
type timedReaders struct {
	phase  atomic.Pointer[latencies]
	wg     sync.WaitGroup
	ctx    context.Context
	cancel context.CancelFunc
}

// startTimedReaders opens n readers of rawURL, recording into into, and
// waits until each has its first event.
func startTimedReaders(t *testing.T, up *numberedUpstream, rawURL string, n int, into *latencies) *timedReaders {
	t.Helper()
	client := newStreamClient(t)
	r := &timedReaders{}
	r.ctx, r.cancel = context.WithCancel(context.Background())
	r.phase.Store(into)
	t.Cleanup(r.stop)
	started := make(chan struct{}, n)
	for i := range n {
		r.wg.Go(func() {
			first := sync.OnceFunc(func() { started <- struct{}{} })
			defer first()
			resp, err := ssetest.Get(r.ctx, client, rawURL)
			if err != nil {
				t.Errorf("reader %d: %v", i, err)
				return
			}
			defer resp.Body.Close()
			events := ssetest.NewReader(resp.Body)
			last := 0
			for {
				item, err := events.Next()
				if err != nil {
					if r.ctx.Err() == nil {
						t.Errorf("reader %d: stream ended after %d: %v", i, last, err)
					}
					return
				}
				if item.Event == nil {
					continue
				}
				id, _ := strconv.Atoi(item.Event.LastEventID)
				r.phase.Load().add(time.Since(up.Born(id)))
				if last == 0 {
					first()
				} else if id != last+1 {
					t.Errorf("reader %d: %d after %d", i, id, last)
				}
				last = id
			}
		})
	}
	for range n {
		<-started
	}
	return r
}

// record makes later events count in into.
func (r *timedReaders) record(into *latencies) { r.phase.Store(into) }

// stop hangs up every reader and waits for them.
func (r *timedReaders) stop() {
	r.cancel()
	r.wg.Wait()
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
		readerCount = 2
	)
	up := newNumberedUpstream(t, 10*time.Millisecond, 32<<10)
	startCaddy(t, `sse_feed /events {
	tail `+up.feedURL()+`
	id /id
	replay_bytes 4MiB
	heartbeat 1s
	name slow
}`, withGlobal("servers {\n\ttimeouts {\n\t\twrite_idle 5s\n\t}\n}"))
	without, with := &latencies{}, &latencies{}
	readers := startTimedReaders(t, up, siteURL+"/events", readerCount, without)
	time.Sleep(3 * time.Second)
	runtime.GC()
	baseline := liveHeap()

	readers.record(with)
	published := up.Produced()
	conns := make([]net.Conn, stalled)
	for i := range conns {
		conns[i] = stalledClient(t, "/events")
	}
	const subscribers = `caddy_sse_feed_subscribers{feed="slow"}`
	expectMetrics(t, 5*time.Second, map[string]float64{subscribers: readerCount + stalled})
	// Sample the live heap, as each garbage collection finds it, until the
	// server drops the stalled clients. A forced collection at each sample
	// would cost the readers more than the stalled clients do.
	var peak uint64
	dropStart := time.Now()
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		if n := metric(c, subscribers); n > readerCount {
			peak = max(peak, liveHeap())
			c.Errorf("%v stalled clients still connected", n-readerCount)
		}
	}, 60*time.Second, 250*time.Millisecond)
	dropped := time.Since(dropStart)
	published = up.Produced() - published
	time.Sleep(2 * time.Second)
	readers.stop()

	t.Logf("readers without stalled clients: %v", without)
	t.Logf("readers with %d stalled clients: %v", stalled, with)
	t.Logf("stalled clients dropped after %v, while %d events of 32 KiB were published; live heap %d MiB before, peak %d MiB",
		dropped.Round(time.Millisecond), published, baseline>>20, peak>>20)
	if bound := baseline + (stalled+1)*replayBytes + 16<<20; peak > bound {
		t.Errorf("live heap peaked at %d MiB, over the bound of %d MiB", peak>>20, bound>>20)
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

// TestStalledReadersHoldBoundedMemory opens 300 clients that never read on
// a feed of 8 KiB events published every 5ms with a 4 MiB replay log: half
// resume with an unknown Last-Event-ID, so that each is owed the whole log,
// and half with an id 200 events old. Each stalled stream may hold what one
// write gathers (256 KiB) and its connection's buffers, never a replay log
// of its own: the heap grows by a bounded amount per stalled client, every
// one is dropped after the write stall bound of 10s and counted as slow,
// and two readers get every event meanwhile.
func TestStalledReadersHoldBoundedMemory(t *testing.T) {
	const (
		stalled     = 300
		readerCount = 2
		// perStalled bounds the heap one stalled client may hold: the
		// 256 KiB of one write plus its connection and stream.
		perStalled = 320 << 10
		// dropWithin is the 10s stall bound with room for the race
		// detector on a busy machine.
		dropWithin = 20 * time.Second
		// burstAfter is how long the arrival burst lasts after the last
		// stalled client arrived, with the race detector, which makes it
		// ten times longer.
		burstAfter = 3 * time.Second
	)
	raiseFileLimit(t, 4*stalled)
	up := newNumberedUpstream(t, 5*time.Millisecond, 8<<10)
	startCaddy(t, `sse_feed /events {
	tail `+up.feedURL()+`
	id /id
	replay_bytes 4MiB
	heartbeat 1s
	name stalled
}`)
	const (
		subscribers = `caddy_sse_feed_subscribers{feed="stalled"}`
		slow        = `caddy_sse_feed_slow_disconnects_total{feed="stalled"}`
	)
	// The readers' latencies: without stalled clients, in the burst of
	// their arrival and of their backlogs' writes (until burstAfter after
	// the last arrived), and while they hold their streams until dropped.
	without, burst, held := &latencies{}, &latencies{}, &latencies{}
	readers := startTimedReaders(t, up, siteURL+"/events", readerCount, without)
	// 4 MiB of 8 KiB events every 5ms fill the log in under 3s.
	time.Sleep(4 * time.Second)
	runtime.GC()
	baseHeap, baseRSS := liveHeap(), vmRSS(t)
	slowBefore := metric(t, slow)

	readers.record(burst)
	connecting := time.Now()
	for i := range stalled {
		id := "unknown-" + strconv.Itoa(i)
		if i%2 == 1 {
			id = strconv.Itoa(up.Produced() - 200)
		}
		stalledClient(t, "/events", "Last-Event-ID", id)
	}
	connected := time.Now()
	// Sample the live heap, as each garbage collection finds it, and RSS
	// until the server has dropped every stalled client.
	peakHeap, peakRSS := baseHeap, baseRSS
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		if time.Since(connected) > burstAfter {
			readers.record(held)
		}
		peakHeap, peakRSS = max(peakHeap, liveHeap()), max(peakRSS, vmRSS(c))
		n := metric(c, subscribers)
		assert.Equal(c, float64(readerCount), n, "subscribers")
	}, dropWithin, 250*time.Millisecond, "stalled clients still connected")
	dropped := time.Since(connected)
	time.Sleep(time.Second)
	readers.stop()
	runtime.GC()
	afterHeap := liveHeap()

	t.Logf("%d stalled clients connected in %v; all dropped %v after the last connected",
		stalled, connected.Sub(connecting).Round(time.Millisecond), dropped.Round(time.Millisecond))
	t.Logf("live heap: %d MiB with the readers only, peak %d MiB with the stalled clients (%d KiB more per stalled client), %d MiB after they were dropped",
		baseHeap>>20, peakHeap>>20, (peakHeap-baseHeap)/stalled>>10, afterHeap>>20)
	t.Logf("RSS: %d MiB with the readers only, peak %d MiB with the stalled clients", baseRSS>>20, peakRSS>>20)
	t.Logf("readers without stalled clients: %v", without)
	t.Logf("readers while %d stalled clients arrived, each owed a backlog: %v", stalled, burst)
	t.Logf("readers while %d stalled clients held their streams: %v", stalled, held)
	if bound := baseHeap + stalled*perStalled; peakHeap > bound {
		t.Errorf("live heap peaked at %d MiB, over the bound of %d MiB: %d MiB and %d KiB per stalled client",
			peakHeap>>20, bound>>20, baseHeap>>20, perStalled>>10)
	}
	assert.Equal(t, float64(stalled), metric(t, slow)-slowBefore, "stalled clients counted as slow disconnects")
	// Generous, for the race detector on a busy machine: readers that
	// waited for stalled clients would wait for the stall bound of 10s.
	assert.Less(t, max(burst.longest(), held.longest()), 5*time.Second, "readers' latency with stalled clients")
}
