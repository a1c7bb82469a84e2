package integration

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
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
	startCaddy(t, `sse_feed /events {
	tail `+up.feedURL()+`
	id /id
	replay_bytes 4MiB
	heartbeat 1s
	name slow
}`, withGlobal("servers {\n\ttimeouts {\n\t\twrite_idle 5s\n\t}\n}"))
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
			resp, err := ssetest.Get(ctx, client, siteURL+"/events")
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
		conns[i] = stalledClient(t, "/events")
	}
	const subscribers = `caddy_sse_feed_subscribers{feed="slow"}`
	expectMetrics(t, 5*time.Second, map[string]float64{subscribers: readers + stalled})
	// Sample the heap until the server drops the stalled clients.
	var peak uint64
	dropStart := time.Now()
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		if n := metric(c, subscribers); n > readers {
			peak = max(peak, heapInuse())
			c.Errorf("%v stalled clients still connected", n-readers)
		}
	}, 60*time.Second, 250*time.Millisecond)
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
