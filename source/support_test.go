package source

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/stretchr/testify/require"

	"github.com/ssefeed/caddy-ssefeed/target"
)

// fakeObserver records what a source reports.
type fakeObserver struct {
	mu       sync.Mutex
	requests []string
	errors   []string
}

func (o *fakeObserver) UpstreamRequest(result string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.requests = append(o.requests, result)
}

func (o *fakeObserver) UpstreamError(reason string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.errors = append(o.errors, reason)
}

// calls returns copies of the results and reasons recorded so far.
func (o *fakeObserver) calls() (requests, errors []string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return slices.Clone(o.requests), slices.Clone(o.errors)
}

// sinkCall is one call a source made to its sink: Answered(status), or
// Publish(values).
type sinkCall struct {
	answered bool
	status   int
	values   []string
}

// answered is the call Answered(status).
func answered(status int) sinkCall { return sinkCall{answered: true, status: status} }

// published is the call Publish(values).
func published(values ...string) sinkCall { return sinkCall{values: values} }

// fakeSink records the calls a source makes, passes each published batch
// on, and serves a settable last id.
type fakeSink struct {
	batches chan []string

	mu     sync.Mutex
	lastID string
	calls  []sinkCall
}

func newFakeSink() *fakeSink {
	return &fakeSink{batches: make(chan []string, 100)}
}

func (s *fakeSink) Answered(status int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.calls = append(s.calls, answered(status))
}

func (s *fakeSink) Publish(values []json.RawMessage) {
	batch := make([]string, len(values))
	for i, v := range values {
		batch[i] = string(v)
	}
	s.mu.Lock()
	s.calls = append(s.calls, published(batch...))
	s.mu.Unlock()
	s.batches <- batch
}

func (s *fakeSink) LastID() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastID
}

func (s *fakeSink) setLastID(id string) {
	s.mu.Lock()
	s.lastID = id
	s.mu.Unlock()
}

// takeCalls returns the calls made since the last takeCalls.
func (s *fakeSink) takeCalls() []sinkCall {
	s.mu.Lock()
	defer s.mu.Unlock()
	calls := s.calls
	s.calls = nil
	return calls
}

// expectCalls waits up to 5s for as many calls as want, and fails the test
// unless they are want. It forgets them.
func (s *fakeSink) expectCalls(t *testing.T, want ...sinkCall) {
	t.Helper()
	waitFor(t, func() bool { s.mu.Lock(); defer s.mu.Unlock(); return len(s.calls) >= len(want) })
	require.Equal(t, want, s.takeCalls())
}

// next returns the next published batch, failing the test if none comes
// within 5s.
func (s *fakeSink) next(t *testing.T) []string {
	t.Helper()
	select {
	case b := <-s.batches:
		return b
	case <-time.After(5 * time.Second):
		t.Fatal("nothing published within 5s")
		return nil
	}
}

// expectBatch fails the test unless the next published batch is want.
func (s *fakeSink) expectBatch(t *testing.T, want ...string) {
	t.Helper()
	if got := s.next(t); !slices.Equal(got, want) {
		t.Fatalf("published %q, want %q", got, want)
	}
}

// expectNothing fails the test if anything was published.
func (s *fakeSink) expectNothing(t *testing.T) {
	t.Helper()
	select {
	case b := <-s.batches:
		t.Fatalf("published %q, want nothing", b)
	default:
	}
}

// testConfig returns a config for a request to rawURL with header, both
// templates without request placeholders, with small limits and fast
// retries.
func testConfig(t testing.TB, rawURL string, header map[string][]string, obs Observer) Config {
	t.Helper()
	tmpl, err := target.Parse(rawURL, header)
	if err != nil {
		t.Fatal(err)
	}
	bound, err := tmpl.Bind(nil)
	if err != nil {
		t.Fatal(err)
	}
	return Config{
		Target:   bound,
		Redacted: tmpl.Redacted(),
		Timeout:  2 * time.Second,
		MaxBody:  1 << 10,
		Backoff:  Backoff{Initial: 10 * time.Millisecond, Max: 50 * time.Millisecond},
		Logger:   zap.NewNop(),
		Observer: obs,
	}
}

// runner is what Poll and Tail have in common.
type runner interface {
	Run(ctx context.Context, sink Sink)
}

// start runs src into sink until the returned stop is called or the test
// ends. stop ends the run and waits for Run to return.
func start(t *testing.T, src runner, sink Sink) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		src.Run(ctx, sink)
	}()
	stop = func() {
		cancel()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Error("Run did not return after its context ended")
		}
	}
	t.Cleanup(stop)
	return stop
}

// kinds names the sources for newSource.
var kinds = []string{"poll", "tail"}

// newSource returns a Tail of c, or a Poll of c that waits an hour between
// polls.
func newSource(kind string, c Config) runner {
	if kind == "poll" {
		return &Poll{Config: c, Interval: time.Hour}
	}
	return &Tail{Config: c}
}

// tailUpstream answers request number n (from 0) with respond(n, w, r) and
// records the requests.
type tailUpstream struct {
	*httptest.Server

	mu       sync.Mutex
	requests []*http.Request
}

func newTailUpstream(t *testing.T, respond func(n int, w http.ResponseWriter, r *http.Request)) *tailUpstream {
	u := &tailUpstream{}
	u.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u.mu.Lock()
		n := len(u.requests)
		u.requests = append(u.requests, r.Clone(context.Background()))
		u.mu.Unlock()
		respond(n, w, r)
	}))
	t.Cleanup(u.Close)
	return u
}

// request returns request number n, failing the test if it has not come.
func (u *tailUpstream) request(t *testing.T, n int) *http.Request {
	t.Helper()
	u.mu.Lock()
	defer u.mu.Unlock()
	if n >= len(u.requests) {
		t.Fatalf("the upstream got %d requests, want at least %d", len(u.requests), n+1)
	}
	return u.requests[n]
}

// stream writes and flushes each chunk from send as it comes, until send is
// closed or the client goes away.
func stream(w http.ResponseWriter, r *http.Request, send <-chan string) {
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	http.NewResponseController(w).Flush()
	for {
		select {
		case chunk, ok := <-send:
			if !ok {
				return
			}
			w.Write([]byte(chunk))
			http.NewResponseController(w).Flush()
		case <-r.Context().Done():
			return
		}
	}
}

// hang blocks until the client goes away, without answering.
func hang(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() }

// streamFrom returns a respond function that streams send on every request.
func streamFrom(send <-chan string) func(int, http.ResponseWriter, *http.Request) {
	return func(_ int, w http.ResponseWriter, r *http.Request) { stream(w, r, send) }
}

// waitFor waits up to 5s for cond.
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 5s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}
