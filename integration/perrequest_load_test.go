package integration

import (
	"context"
	"fmt"
	"io"
	"math"
	"net/http"
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

// TestPerRequestFeedsAreForgottenAfterLinger opens 5,000 distinct
// per-request feeds, each with one subscriber that takes the first event
// and leaves. After the linger every feed is forgotten, and the goroutines
// and the live heap are back to within a small margin of before.
func TestPerRequestFeedsAreForgottenAfterLinger(t *testing.T) {
	const (
		feeds   = 5000
		warmup  = 500
		workers = 32
		slack   = 10
	)
	raiseFileLimit(t, 8*workers)
	var polls atomic.Int64
	up := newFuncUpstream(t, func(w http.ResponseWriter, _ *http.Request) {
		polls.Add(1)
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"v":1}`)
	})
	startCaddy(t, `sse_feed /feed {
	poll `+up.URL+`/u/{query.u} 1s
	linger 200ms
	max_feeds 10000
	name abandoned
}`)
	client := newStreamClient(t)
	const live = `caddy_sse_feed_feeds{feed="abandoned"}`
	// visit opens the feeds from to to-1, workers at a time, each for its
	// first event.
	visit := func(from, to int) {
		next := atomic.Int64{}
		next.Store(int64(from))
		var wg sync.WaitGroup
		for range workers {
			wg.Go(func() {
				for i := int(next.Add(1)) - 1; i < to; i = int(next.Add(1)) - 1 {
					if err := firstEvent(client, siteURL+"/feed?u="+strconv.Itoa(i)); err != nil {
						t.Errorf("feed %d: %v", i, err)
						return
					}
				}
			})
		}
		wg.Wait()
	}
	// A first round warms up what the runtime, net/http and Caddy keep for
	// reuse.
	visit(0, warmup)
	expectMetrics(t, 10*time.Second, map[string]float64{live: 0})
	time.Sleep(500 * time.Millisecond)
	baseGoroutines, baseHeap := settle(t, math.MaxInt)

	start := time.Now()
	visit(warmup, warmup+feeds)
	took := time.Since(start)
	openGoroutines, peak := runtime.NumGoroutine(), metric(t, live)
	expectMetrics(t, 10*time.Second, map[string]float64{live: 0})
	forgotten := time.Since(start)
	goroutines, heap := settle(t, baseGoroutines+slack)
	t.Logf("%d feeds opened and left in %v, %d still live at the end, all forgotten %v after the first opened; %d upstream requests in all",
		feeds, took.Round(time.Millisecond), int(peak), forgotten.Round(time.Millisecond), polls.Load())
	t.Logf("goroutines: %d before, %d as the last feeds lingered, %d after; live heap %d KiB before, %d KiB after",
		baseGoroutines, openGoroutines, goroutines, baseHeap>>10, heap>>10)
	if heap > baseHeap+1<<20 {
		t.Errorf("live heap %d KiB after %d feeds were forgotten, %d KiB before: more than 1 MiB left", heap>>10, feeds, baseHeap>>10)
	}
}

// firstEvent opens a stream of rawURL, reads its first event and leaves.
func firstEvent(client *http.Client, rawURL string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := ssetest.Get(ctx, client, rawURL)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, err = ssetest.NewReader(resp.Body).NextEvent()
	return err
}

func TestPerRequestMaxFeeds(t *testing.T) {
	up := newAccounts(t, "u1", "u2", "u3")
	startCaddy(t, userFeed(up, "/bearer", "Authorization", "name capped", "max_feeds 2"))
	bearer := func(user string) *ssetest.Stream { return openStream(t, "/bearer", "Authorization", "Bearer "+user) }
	streams := map[*ssetest.Stream]string{bearer("u1"): "u1", bearer("u2"): "u2"}
	expectUserEvents(t, 1, streams)

	// A third user would need a third feed: the over-capacity answer, and
	// no upstream request.
	extra := bearer("u3")
	expectStreamHeaders(t, extra.Response)
	item := extra.Next(t)
	require.Positive(t, item.Retry, "first item %+v, want a retry field", item)
	extra.ExpectEnd(t, 5*time.Second)
	// A user with a live feed still joins it.
	tab := bearer("u1")
	expectUserEvents(t, 1, map[*ssetest.Stream]string{tab: "u1"})
	streams[tab] = "u1"
	up.add("u1", "u2")
	expectUserEvents(t, 2, streams)
	assert.Empty(t, up.requestsOf("u3"), "upstream requests with u3's token")
	expectMetrics(t, time.Second, map[string]float64{
		`caddy_sse_feed_feeds{feed="capped"}`:               2,
		`caddy_sse_feed_feeds_refused_total{feed="capped"}`: 1,
	})
}

// loadUpstream answers {"v":1} to every request: the first request for
// each path at once, later ones after a delay that the test sets. It
// records when each request arrived and the most it served at once.
type loadUpstream struct {
	URL   string
	delay atomic.Int64 // nanoseconds

	mu          sync.Mutex
	seen        map[string]bool
	arrivals    []time.Time
	inFlight    int
	maxInFlight int
}

func newLoadUpstream(t *testing.T) *loadUpstream {
	u := &loadUpstream{seen: make(map[string]bool)}
	u.URL = newFuncUpstream(t, u.serve).URL
	return u
}

func (u *loadUpstream) serve(w http.ResponseWriter, r *http.Request) {
	u.mu.Lock()
	u.arrivals = append(u.arrivals, time.Now())
	u.inFlight++
	u.maxInFlight = max(u.maxInFlight, u.inFlight)
	first := !u.seen[r.URL.Path]
	u.seen[r.URL.Path] = true
	u.mu.Unlock()
	defer func() {
		u.mu.Lock()
		u.inFlight--
		u.mu.Unlock()
	}()
	if !first {
		select {
		case <-time.After(time.Duration(u.delay.Load())):
		case <-r.Context().Done():
			return
		}
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = io.WriteString(w, `{"v":1}`)
}

// arrivalsSince returns the arrival times from from on.
func (u *loadUpstream) arrivalsSince(from time.Time) []time.Time {
	u.mu.Lock()
	defer u.mu.Unlock()
	var since []time.Time
	for _, a := range u.arrivals {
		if !a.Before(from) {
			since = append(since, a)
		}
	}
	return since
}

// takeMaxInFlight returns the most requests served at once since the last
// call, and starts counting again.
func (u *loadUpstream) takeMaxInFlight() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	n := u.maxInFlight
	u.maxInFlight = u.inFlight
	return n
}

// TestPerRequestThousandFeedsSpreadAndLimitRequests keeps 1,000 per-request
// feeds live on a 1s interval. Their polls are spread over the interval, not
// bunched where the subscribers arrived; and when the upstream slows down,
// no more than max_concurrent_requests are in flight at once.
func TestPerRequestThousandFeedsSpreadAndLimitRequests(t *testing.T) {
	const (
		feeds    = 1000
		limit    = 64
		interval = time.Second
		buckets  = 10
		measured = 3 // intervals
	)
	raiseFileLimit(t, 5*feeds)
	up := newLoadUpstream(t)
	up.delay.Store(int64(10 * time.Millisecond))
	startCaddy(t, fmt.Sprintf(`sse_feed /feed {
	poll %s/u/{query.u} %v
	max_concurrent_requests %d
	max_feeds %d
	linger 200ms
	name thousand
}`, up.URL, interval, limit, feeds))
	urls := make([]string, feeds)
	for i := range urls {
		urls[i] = siteURL + "/feed?u=" + strconv.Itoa(i)
	}
	start := time.Now()
	streams := openLiveStreamsOf(t, newStreamClient(t), urls)
	opened := time.Since(start)
	defer func() {
		for _, s := range streams {
			s.cancel()
		}
	}()
	openingMax := up.takeMaxInFlight()

	// From two intervals on, each feed polls once an interval, at an
	// offset of its own.
	time.Sleep(2 * interval)
	from := time.Now()
	time.Sleep(measured * interval)
	arrivals := up.arrivalsSince(from)
	var histogram [buckets]int
	for _, a := range arrivals {
		histogram[a.Sub(from)%interval*buckets/interval]++
	}
	least, most := slices.Min(histogram[:]), slices.Max(histogram[:])
	t.Logf("%d feeds opened in %v, at most %d upstream requests in flight meanwhile", feeds, opened.Round(time.Millisecond), openingMax)
	t.Logf("%d upstream requests in %d intervals; by offset in the interval, in %d buckets: %v (least %d, most %d, even would be %d)",
		len(arrivals), measured, buckets, histogram, least, most, len(arrivals)/buckets)
	assert.Greater(t, len(arrivals), measured*feeds*8/10, "upstream requests in %d intervals", measured)
	assert.Greater(t, least, len(arrivals)/buckets/3, "requests in the emptiest tenth of the interval: %v", histogram)

	// A slow upstream: 1,000 polls a second that take 200ms each would be
	// 200 in flight without the limit.
	up.delay.Store(int64(200 * time.Millisecond))
	up.takeMaxInFlight()
	time.Sleep(2 * interval)
	slowMax := up.takeMaxInFlight()
	t.Logf("with 200ms answers, at most %d upstream requests in flight (max_concurrent_requests %d)", slowMax, limit)
	assert.LessOrEqual(t, slowMax, limit, "upstream requests in flight")
	assert.GreaterOrEqual(t, slowMax, limit*3/4, "upstream requests in flight: the limit was never approached")
}
