package integration

import (
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
)

// manyStreams is how many subscribers the load tests open.
const manyStreams = 1000

// leakSite is a tail feed of up with a short linger.
func leakSite(up *numberedUpstream, extra string) string {
	return `sse_feed /events {
	tail ` + up.feedURL() + `
	id /id
	heartbeat 1s
	linger 500ms
	name leak
}
` + extra
}

// settle waits up to 10s until the goroutines are at most want, failing the
// test if they stay more, and returns their number with the bytes of live
// heap objects.
func settle(t *testing.T, want int) (goroutines int, heap uint64) {
	t.Helper()
	var last atomic.Int64
	assert.EventuallyWithT(t, func(c *assert.CollectT) {
		n := runtime.NumGoroutine()
		last.Store(int64(n))
		assert.LessOrEqual(c, n, want, "goroutines after the streams left")
	}, 10*time.Second, 50*time.Millisecond)
	heapInuse() // a first cycle empties the sync.Pools into their victim caches
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return int(last.Load()), ms.HeapAlloc
}

func TestThousandSubscribersLeaveNoGoroutinesOrHeap(t *testing.T) {
	raiseFileLimit(t, 3*manyStreams)
	up := newNumberedUpstream(t, 50*time.Millisecond, 64)
	startCaddy(t, leakSite(up, ""))
	client := newStreamClient(t)

	// The baseline has the feed running, held by one subscriber.
	keeper := openStream(t, "/events")
	keeper.NextEvent(t)
	const slack = 10
	var openGoroutines int
	round := func() {
		streams := openLiveStreams(t, client, siteURL+"/events", manyStreams)
		waitAllPast(t, streams, up.Produced(), 10*time.Second)
		openGoroutines = runtime.NumGoroutine()
		for _, s := range streams {
			s.cancel()
		}
		waitAllEnded(t, streams, 10*time.Second)
		expectMetrics(t, 10*time.Second, map[string]float64{`caddy_sse_feed_subscribers{feed="leak"}`: 1})
	}
	// A first round warms up what the runtime and net/http keep for reuse.
	baseGoroutines := runtime.NumGoroutine()
	round()
	_, baseHeap := settle(t, baseGoroutines+slack)
	round()
	goroutines, heap := settle(t, baseGoroutines+slack)
	t.Logf("goroutines: %d before, %d with %d more streams, %d after; live heap after a first round %d KiB, after a second %d KiB",
		baseGoroutines, openGoroutines, manyStreams, goroutines, baseHeap>>10, heap>>10)
	if heap > baseHeap+2<<20 {
		t.Errorf("live heap %d KiB after the second round of streams left, %d KiB after the first", heap>>10, baseHeap>>10)
	}
	keeper.NextEvent(t)
}

func TestFeedWithoutSubscribersStopsReadingAfterLinger(t *testing.T) {
	up := newNumberedUpstream(t, 50*time.Millisecond, 64)
	startCaddy(t, leakSite(up, ""))
	s := openStream(t, "/events")
	s.NextEvent(t)
	up.WaitOpen(t, 1, 5*time.Second)

	// Back within the linger: the same upstream connection goes on.
	s.Close()
	time.Sleep(100 * time.Millisecond)
	s = openStream(t, "/events")
	s.NextEvent(t)
	assert.Equal(t, 1, up.Stats().requests, "upstream requests: the first one kept through the linger")

	left := time.Now()
	s.Close()
	up.WaitOpen(t, 0, 5*time.Second)
	t.Logf("upstream connection closed %v after the last subscriber left (linger 500ms)", time.Since(left).Round(time.Millisecond))
}
