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
// and the live heap are back to within a small margin of before. The
// flush_interval gives each feed a pacer, which must end with it too.
func TestPerRequestFeedsAreForgottenAfterLinger(t *testing.T) {
	const (
		feeds   = 5000
		warmup  = 2000
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
	flush_interval 50ms
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
	// reuse, and grows their maps of connections to what the second needs:
	// maps do not shrink.
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
// records when each request for each path arrived, and the most requests
// it served at once.
type loadUpstream struct {
	URL   string
	delay atomic.Int64 // nanoseconds

	mu          sync.Mutex
	arrivals    map[string][]time.Time
	inFlight    int
	maxInFlight int
}

func newLoadUpstream(t *testing.T) *loadUpstream {
	u := &loadUpstream{arrivals: make(map[string][]time.Time)}
	u.URL = newFuncUpstream(t, u.serve).URL
	return u
}

func (u *loadUpstream) serve(w http.ResponseWriter, r *http.Request) {
	u.mu.Lock()
	first := len(u.arrivals[r.URL.Path]) == 0
	u.arrivals[r.URL.Path] = append(u.arrivals[r.URL.Path], time.Now())
	u.inFlight++
	u.maxInFlight = max(u.maxInFlight, u.inFlight)
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

// arrivalsOf returns the arrival times of the requests for each path.
func (u *loadUpstream) arrivalsOf() map[string][]time.Time {
	u.mu.Lock()
	defer u.mu.Unlock()
	arrivals := make(map[string][]time.Time, len(u.arrivals))
	for path, times := range u.arrivals {
		arrivals[path] = slices.Clone(times)
	}
	return arrivals
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
// feeds live on a 1s interval. Their polls are spread over the interval:
// each feed's polls settle at an offset of its own, not where its
// subscriber arrived; and when the upstream slows down, no more than
// max_concurrent_requests are in flight at once.
func TestPerRequestThousandFeedsSpreadAndLimitRequests(t *testing.T) {
	const (
		feeds    = 1000
		limit    = 64
		interval = time.Second
		buckets  = 10
		measured = 3 // intervals
		// shifted is how far, at least, a poll's offset in the interval
		// counts as moved from the first poll's: much more than the
		// drift of a few answers' time, a quarter of the interval.
		shifted = interval / 4
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

	// From two intervals on, each feed polls once an interval.
	time.Sleep(2 * interval)
	from := time.Now()
	time.Sleep(measured * interval)
	var histogram [buckets]int
	total, moved := 0, 0
	for path, times := range up.arrivalsOf() {
		i := slices.IndexFunc(times, from.Before)
		if i < 0 {
			t.Errorf("no poll of %s in %d intervals", path, measured)
			continue
		}
		for _, a := range times[i:] {
			histogram[a.Sub(from)%interval*buckets/interval]++
			total++
		}
		// How far the feed's offset in the interval moved from that of
		// its first poll, which followed its subscriber's arrival.
		offset := times[i].Sub(times[0]) % interval
		if min(offset, interval-offset) > shifted {
			moved++
		}
	}
	least, most := slices.Min(histogram[:]), slices.Max(histogram[:])
	t.Logf("%d feeds opened in %v, at most %d upstream requests in flight meanwhile", feeds, opened.Round(time.Millisecond), openingMax)
	t.Logf("%d upstream requests in %d intervals; by offset in the interval, in %d buckets: %v (least %d, most %d, even would be %d)",
		total, measured, buckets, histogram, least, most, total/buckets)
	t.Logf("%d of %d feeds poll at an offset more than %v away from their first poll's (half would, spread at random)", moved, feeds, shifted)
	assert.Greater(t, total, measured*feeds*8/10, "upstream requests in %d intervals", measured)
	assert.Greater(t, least, total/buckets/3, "requests in the emptiest tenth of the interval: %v", histogram)
	assert.Greater(t, moved, feeds/4, "feeds whose polls moved away from their first poll's offset")

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
