package ssefeed_test

import (
	"context"
	"fmt"
	"net/http"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ssefeed/caddy-ssefeed/internal/ssetest"
)

// manyStreams is how many subscribers the load tests open.
const manyStreams = 1000

// raiseFileLimit lifts the soft limit on open files to the hard one: the
// load tests hold thousands of sockets, both ends in this process.
func raiseFileLimit(t *testing.T, need uint64) {
	t.Helper()
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if lim.Cur >= need {
		return
	}
	lim.Cur = min(max(need, lim.Cur), lim.Max)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil || lim.Cur < need {
		t.Skipf("cannot open %d files (limit %d): %v", need, lim.Cur, err)
	}
}

// liveStream is one of many streams, read in the background.
type liveStream struct {
	last   atomic.Int64 // the last event id received
	ended  chan struct{}
	cancel context.CancelFunc
}

// openLiveStreams opens n streams of rawURL with client and reads them in
// the background until they end or the test does.
func openLiveStreams(t *testing.T, client *http.Client, rawURL string, n int) []*liveStream {
	t.Helper()
	streams := make([]*liveStream, n)
	errs := make(chan error, n)
	var opening sync.WaitGroup
	gate := make(chan struct{}, 32)
	for i := range streams {
		ctx, cancel := context.WithCancel(context.Background())
		s := &liveStream{ended: make(chan struct{}), cancel: cancel}
		streams[i] = s
		t.Cleanup(cancel)
		gate <- struct{}{}
		opening.Go(func() {
			defer func() { <-gate }()
			req, err := http.NewRequestWithContext(ctx, http.MethodGet, rawURL, nil)
			if err != nil {
				errs <- err
				close(s.ended)
				return
			}
			resp, err := client.Do(req)
			if err != nil {
				errs <- err
				close(s.ended)
				return
			}
			go s.read(resp)
		})
	}
	opening.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("opening a stream: %v", err)
	}
	return streams
}

func (s *liveStream) read(resp *http.Response) {
	defer close(s.ended)
	defer resp.Body.Close()
	r := ssetest.NewReader(resp.Body)
	for {
		item, err := r.Next()
		if err != nil {
			return
		}
		if item.Event != nil {
			id, _ := strconv.Atoi(item.Event.LastEventID)
			s.last.Store(int64(id))
		}
	}
}

// waitAllPast waits until every stream has received an id above id.
func waitAllPast(t *testing.T, streams []*liveStream, id int, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for i, s := range streams {
		for s.last.Load() <= int64(id) {
			select {
			case <-s.ended:
				t.Fatalf("stream %d ended at id %d, waiting for one past %d", i, s.last.Load(), id)
			case <-time.After(10 * time.Millisecond):
			}
			if time.Now().After(deadline) {
				t.Fatalf("stream %d at id %d, not past %d after %v", i, s.last.Load(), id, within)
			}
		}
	}
}

// waitAllEnded waits until every stream has ended and returns how long it
// took.
func waitAllEnded(t *testing.T, streams []*liveStream, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	timeout := time.After(within)
	for i, s := range streams {
		select {
		case <-s.ended:
		case <-timeout:
			t.Fatalf("stream %d still open after %v", i, within)
		}
	}
	return time.Since(start)
}

// settle waits until the goroutines are at most want, and returns their
// number with the bytes of live heap objects.
func settle(want int, within time.Duration) (goroutines int, heap uint64) {
	deadline := time.Now().Add(within)
	for {
		goroutines = runtime.NumGoroutine()
		if goroutines <= want || time.Now().After(deadline) {
			heapInuse() // a first cycle empties the sync.Pools into their victim caches
			runtime.GC()
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			return goroutines, ms.HeapAlloc
		}
		time.Sleep(50 * time.Millisecond)
	}
}

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
		waitMetric(t, "caddy_sse_feed_subscribers", `feed="leak"`, 10*time.Second, func(v float64) bool { return v == 1 })
	}
	// A first round warms up what the runtime and net/http keep for reuse.
	baseGoroutines, _ := settle(0, 0)
	round()
	_, baseHeap := settle(baseGoroutines+slack, 10*time.Second)
	round()
	goroutines, heap := settle(baseGoroutines+slack, 10*time.Second)
	t.Logf("goroutines: %d before, %d with %d more streams, %d after; live heap after a first round %d KiB, after a second %d KiB",
		baseGoroutines, openGoroutines, manyStreams, goroutines, baseHeap>>10, heap>>10)
	if goroutines > baseGoroutines+slack {
		t.Errorf("%d goroutines after the streams left, %d before", goroutines, baseGoroutines)
	}
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
	up.mu.Lock()
	requests := up.requests
	up.mu.Unlock()
	if requests != 1 {
		t.Errorf("%d upstream requests, want the first one kept through the linger", requests)
	}

	left := time.Now()
	s.Close()
	up.WaitOpen(t, 0, 5*time.Second)
	t.Logf("upstream connection closed %v after the last subscriber left (linger 500ms)", time.Since(left).Round(time.Millisecond))
}

func TestReloadUnderLoad(t *testing.T) {
	raiseFileLimit(t, 3*manyStreams)
	up := newNumberedUpstream(t, 50*time.Millisecond, 64)
	tester := startCaddy(t, leakSite(up, ""))
	client := newStreamClient(t)
	streams := openLiveStreams(t, client, siteURL+"/events", manyStreams)
	waitAllPast(t, streams, up.Produced(), 10*time.Second)

	// Unchanged feed, changed config: every stream goes on.
	start := time.Now()
	tester.InitServer(caddyfile(leakSite(up, `respond /other "reloaded"`)), "caddyfile")
	unchanged := time.Since(start)
	waitAllPast(t, streams, up.Produced(), 10*time.Second)
	up.WaitOpen(t, 1, time.Second)

	// A config without the feed: every stream ends, and so does the reader.
	start = time.Now()
	tester.InitServer(caddyfile(`respond /events "gone"`), "caddyfile")
	dropped := time.Since(start)
	ended := waitAllEnded(t, streams, 5*time.Second)
	up.WaitOpen(t, 0, 5*time.Second)
	t.Logf("%d streams: reload with the feed unchanged took %v and kept them all; reload without the feed took %v, and all ended %v after it returned",
		manyStreams, unchanged.Round(time.Millisecond), dropped.Round(time.Millisecond), ended.Round(time.Millisecond))
}

// TestStopEndsThousandStreamsAndExits runs the real binary, with Caddy's
// default eternal grace period, on ports of its own, opens a thousand
// streams and runs `caddy stop`: the process must exit within seconds.
func TestStopEndsThousandStreamsAndExits(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the caddy binary")
	}
	raiseFileLimit(t, 3*manyStreams)
	dir := t.TempDir()
	bin := filepath.Join(dir, "caddy-ssefeed")
	if out, err := exec.Command("go", "build", "-o", bin, "./cmd/caddy").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	up := newNumberedUpstream(t, 50*time.Millisecond, 64)
	config := filepath.Join(dir, "Caddyfile")
	writeFile(t, config, fmt.Sprintf(`{
	admin localhost:2996
	http_port 9082
	https_port 9445
	persist_config off
	skip_install_trust
}
http://localhost:9082 {
	sse_feed /events {
		tail %s
		id /id
	}
}
`, up.feedURL()))
	caddy := startProcess(t, t.TempDir(), bin, "run", "--config", config)
	waitServing(t, "http://localhost:9082/", caddy)
	streams := openLiveStreams(t, newStreamClient(t), "http://localhost:9082/events", manyStreams)
	waitAllPast(t, streams, up.Produced(), 10*time.Second)

	start := time.Now()
	if out, err := exec.Command(bin, "stop", "--address", "localhost:2996").CombinedOutput(); err != nil {
		t.Fatalf("caddy stop: %v\n%s", err, out)
	}
	select {
	case <-caddy.exited:
	case <-time.After(5 * time.Second):
		t.Fatalf("caddy still running 5s after stop with %d open streams", manyStreams)
	}
	exit := time.Since(start)
	if caddy.err != nil {
		t.Errorf("caddy exited with %v\n%s", caddy.err, caddy.output.String())
	}
	waitAllEnded(t, streams, time.Second)
	t.Logf("caddy stop with %d open streams: the process exited %v after the stop command started", manyStreams, exit.Round(time.Millisecond))
}
