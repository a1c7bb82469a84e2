package source

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/iotest"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/ssefeed/caddy-ssefeed/internal/ssetest"
)

// readLines reads r to its end with a LineReader and returns the lines and
// how many were too long.
func readLines(t *testing.T, r io.Reader, max int64) (lines []string, tooLong int) {
	t.Helper()
	lr := NewLineReader(r, max)
	for {
		line, err := lr.Next()
		switch {
		case errors.Is(err, errLineTooLong):
			tooLong++
		case errors.Is(err, io.EOF):
			return lines, tooLong
		case err != nil:
			t.Fatalf("Next: %v", err)
		default:
			if int64(len(line)) > max {
				t.Fatalf("line of %d bytes over max %d: %q", len(line), max, line)
			}
			lines = append(lines, string(line))
		}
	}
}

func TestLineReader(t *testing.T) {
	tests := []struct {
		name    string
		input   string
		max     int64
		lines   []string
		tooLong int
	}{
		{"LF", "{}\n[1]\n", 8, []string{"{}", "[1]"}, 0},
		{"CRLF", "{}\r\n[1]\r\n", 8, []string{"{}", "[1]"}, 0},
		{"no final newline", "{}\n[1]", 8, []string{"{}", "[1]"}, 0},
		{"empty lines", "\n\n{}\n\n", 8, []string{"", "", "{}", ""}, 0},
		{"white space trimmed", " \t{} \t\n", 8, []string{"{}"}, 0},
		{"line at max", "12345678\n", 8, []string{"12345678"}, 0},
		{"line at max with CRLF", "12345678\r\n", 8, []string{"12345678"}, 0},
		{"line over max skipped", "123456789\n[2]\n", 8, []string{"[2]"}, 1},
		{"line over max with CRLF skipped", "123456789\r\n[2]\r\n", 8, []string{"[2]"}, 1},
		{"CR inside a line counts", "1234567\r8\n", 8, nil, 1},
		{"CRLF split by the buffer", strings.Repeat("x", 64<<10-1) + "\r\n[1]\n", 64<<10 - 1, []string{strings.Repeat("x", 64<<10-1), "[1]"}, 0},
		{"CR split from a longer line by the buffer", strings.Repeat("x", 64<<10-1) + "\rx\n[1]\n", 64<<10 - 1, []string{"[1]"}, 1},
		{"unterminated line at max", "{}\n12345678", 8, []string{"{}", "12345678"}, 0},
		{"unterminated line over max", "{}\n123456789", 8, []string{"{}"}, 1},
		{"unterminated line at max with CR", "{}\n12345678\r", 8, []string{"{}", "12345678"}, 0},
		{"long line never ends", "[1]\n" + strings.Repeat("x", 200<<10), 1 << 10, []string{"[1]"}, 1},
		{"long line over the buffer then a line", strings.Repeat("x", 200<<10) + "\n[3]\n", 1 << 10, []string{"[3]"}, 1},
		{"empty input", "", 8, nil, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, r := range []io.Reader{strings.NewReader(tt.input), iotest.OneByteReader(strings.NewReader(tt.input))} {
				lines, tooLong := readLines(t, r, tt.max)
				if !slices.Equal(lines, tt.lines) || tooLong != tt.tooLong {
					t.Errorf("got %.80q and %d too long, want %.80q and %d", lines, tooLong, tt.lines, tt.tooLong)
				}
			}
		})
	}
}

func TestLineBuffered(t *testing.T) {
	lr := NewLineReader(strings.NewReader("[1]\n[2]\n[3]"), 8)
	for _, want := range []bool{true, false} {
		if _, err := lr.Next(); err != nil {
			t.Fatal(err)
		}
		if got := lr.LineBuffered(); got != want {
			t.Fatalf("LineBuffered = %v, want %v", got, want)
		}
	}
}

// FuzzLineReader checks the LineReader against a plain split of the input:
// it never panics, never returns a line over max, and returns exactly the
// trimmed lines that fit without their line break, in order.
func FuzzLineReader(f *testing.F) {
	f.Add([]byte("{}\n[1]\r\n\n  \"x\"  \n"), uint8(4))
	f.Add([]byte("12345\n123\n1234"), uint8(4))
	f.Add([]byte("\r\r\n\xff\xfe\n\x00"), uint8(1))
	f.Add([]byte(strings.Repeat("a", 300)+"\nb"), uint8(0))
	f.Fuzz(func(t *testing.T, input []byte, maxLen uint8) {
		max := int64(maxLen % 64)
		var want []string
		wantTooLong := 0
		pieces := bytes.Split(input, []byte("\n"))
		if len(pieces[len(pieces)-1]) == 0 {
			pieces = pieces[:len(pieces)-1] // the input ends with LF, or is empty
		}
		for _, p := range pieces {
			if int64(len(bytes.TrimSuffix(p, []byte("\r")))) > max {
				wantTooLong++
			} else {
				want = append(want, string(bytes.TrimSpace(p)))
			}
		}
		lines, tooLong := readLines(t, bytes.NewReader(input), max)
		if !slices.Equal(lines, want) || tooLong != wantTooLong {
			t.Fatalf("got %q and %d too long, want %q and %d", lines, tooLong, want, wantTooLong)
		}
	})
}

func TestBackoffDelay(t *testing.T) {
	b := Backoff{Initial: 100 * time.Millisecond, Max: time.Second}
	tests := []struct {
		attempt    int
		retryAfter time.Duration
		min, max   time.Duration
	}{
		{1, 0, 50 * time.Millisecond, 100 * time.Millisecond},
		{2, 0, 100 * time.Millisecond, 200 * time.Millisecond},
		{3, 0, 200 * time.Millisecond, 400 * time.Millisecond},
		{5, 0, 500 * time.Millisecond, time.Second},    // 1.6s capped at Max
		{1000, 0, 500 * time.Millisecond, time.Second}, // no overflow
		{1, 30 * time.Second, 30 * time.Second, 30 * time.Second},
		{1, time.Hour, maxRetryAfter, maxRetryAfter},
		{4, 10 * time.Millisecond, 400 * time.Millisecond, 800 * time.Millisecond},
	}
	for _, tt := range tests {
		for range 200 {
			if d := b.Delay(tt.attempt, tt.retryAfter); d < tt.min || d > tt.max {
				t.Fatalf("Delay(%d, %v) = %v, want within [%v, %v]", tt.attempt, tt.retryAfter, d, tt.min, tt.max)
			}
		}
	}
}

func TestParseRetryAfter(t *testing.T) {
	now := time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC)
	tests := []struct {
		value string
		want  time.Duration
	}{
		{"", 0},
		{"120", 2 * time.Minute},
		{"0", 0},
		{"-5", 0},
		{"soon", 0},
		{"99999999999999", maxRetryAfter},
		{now.Add(90 * time.Second).Format(http.TimeFormat), 90 * time.Second},
		{now.Add(-time.Hour).Format(http.TimeFormat), 0},
		{"Sun, 01 Jun 2025 12:05:00 GMT", 5 * time.Minute},
	}
	for _, tt := range tests {
		if got := parseRetryAfter(tt.value, now); got != tt.want {
			t.Errorf("parseRetryAfter(%q) = %v, want %v", tt.value, got, tt.want)
		}
	}
}

// FuzzRetryAfter checks that no Retry-After value makes a negative delay or
// one longer than maxRetryAfter.
func FuzzRetryAfter(f *testing.F) {
	f.Add("120")
	f.Add("-1")
	f.Add("99999999999999999999")
	f.Add("Fri, 31 Dec 9999 23:59:59 GMT")
	f.Add("Mon, 01 Jan 0001 00:00:00 GMT")
	now := time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC)
	b := Backoff{Initial: time.Second, Max: time.Minute}
	f.Fuzz(func(t *testing.T, value string) {
		ra := parseRetryAfter(value, now)
		if ra < 0 {
			t.Fatalf("parseRetryAfter(%q) = %v", value, ra)
		}
		if d := b.Delay(1, ra); d < 0 || d > maxRetryAfter {
			t.Fatalf("Delay with Retry-After %q = %v", value, d)
		}
	})
}

func TestRedirectStaysOnOrigin(t *testing.T) {
	tests := []struct {
		from, to string
		follow   bool
	}{
		{"https://h/a", "https://h/b", true},
		{"https://h/a", "https://h:443/b", true},
		{"http://h:80/a", "http://h/b", true},
		{"https://H.example/a", "https://h.EXAMPLE/b", true},
		{"http://[::1]/a", "http://[::1]:80/b", true},
		{"https://h/a", "http://h/b", false},
		{"https://h/a", "http://h:443/b", false},
		{"https://h:8443/a", "http://h:8443/b", false},
		{"http://h/a", "https://h/b", false},
		{"https://h/a", "https://h:8443/b", false},
		{"https://h/a", "https://other/b", false},
		{"https://h/a", "https://h.other/b", false},
	}
	client := newClient(0)
	for _, tt := range tests {
		from := httptest.NewRequest(http.MethodGet, tt.from, nil)
		to := httptest.NewRequest(http.MethodGet, tt.to, nil)
		err := client.CheckRedirect(to, []*http.Request{from})
		if tt.follow && err != nil || !tt.follow && !errors.Is(err, errRedirect) {
			t.Errorf("redirect from %s to %s: %v, want followed %v", tt.from, tt.to, err, tt.follow)
		}
	}
}

// TestSecretsNeverLogged checks that a secret expanded into the URL's path
// or query from the environment appears in no logged message or field,
// whether the upstream cannot be reached or redirects elsewhere with the
// secret in the new URL.
func TestSecretsNeverLogged(t *testing.T) {
	const secret = "s3cr3t-t0k3n"
	t.Setenv("SSEFEED_TEST_TOKEN", secret)
	const template = "/feed/{env.SSEFEED_TEST_TOKEN}?key={env.SSEFEED_TEST_TOKEN}"
	elsewhere := httptest.NewServer(http.NotFoundHandler())
	defer elsewhere.Close()
	redirecting := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, elsewhere.URL+r.URL.RequestURI(), http.StatusFound)
	}))
	defer redirecting.Close()
	upstreams := map[string]string{"unreachable": ssetest.ClosedURL(t), "redirect": redirecting.URL}

	for upstream, base := range upstreams {
		for _, kind := range kinds {
			t.Run(upstream+" "+kind, func(t *testing.T) {
				core, logs := observer.New(zapcore.DebugLevel)
				c := testConfig(t, base+template, map[string][]string{"Authorization": {"Bearer {env.SSEFEED_TEST_TOKEN}"}}, &fakeObserver{})
				c.Logger = zap.New(core)
				stop := start(t, newSource(kind, c), newFakeSink())
				waitFor(t, func() bool { return logs.FilterMessageSnippet("failed").Len() > 0 })
				stop()
				for _, entry := range logs.All() {
					fields := fmt.Sprint(entry.ContextMap())
					if strings.Contains(entry.Message+fields, secret) {
						t.Errorf("logged the secret: %s %s", entry.Message, fields)
					}
					if !strings.Contains(fields, c.Redacted) {
						t.Errorf("logged no redacted URL: %s %s", entry.Message, fields)
					}
				}
			})
		}
	}
}

// TestStopIsNoFault checks that a source stopped in the middle of a request
// or a stream counts no upstream error and tells its sink of no answer it
// did not get.
func TestStopIsNoFault(t *testing.T) {
	awaiting := func(_ int, w http.ResponseWriter, r *http.Request) { hang(w, r) }
	tests := []struct {
		name, kind string
		respond    func(n int, w http.ResponseWriter, r *http.Request)
		requests   []string
		calls      []sinkCall
	}{
		{"poll awaiting an answer", "poll", awaiting, nil, nil},
		{"tail awaiting headers", "tail", awaiting, nil, nil},
		{"tail streaming", "tail", streamFrom(nil), []string{"ok"}, []sinkCall{answered(http.StatusOK)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			u := newTailUpstream(t, tt.respond)
			obs := &fakeObserver{}
			sink := newFakeSink()
			stop := start(t, newSource(tt.kind, testConfig(t, u.URL, nil, obs)), sink)
			waitFor(t, func() bool { u.mu.Lock(); defer u.mu.Unlock(); return len(u.requests) == 1 })
			if tt.requests != nil {
				waitFor(t, func() bool { requests, _ := obs.calls(); return len(requests) > 0 })
			}
			stop()
			requests, errs := obs.calls()
			if !slices.Equal(requests, tt.requests) || len(errs) != 0 {
				t.Errorf("observed requests %q and errors %q, want %q and none", requests, errs, tt.requests)
			}
			require.Equal(t, tt.calls, sink.takeCalls())
		})
	}
}

// TestAnswered checks what each source tells its sink of each kind of
// answer, request after request (a poll) or connection after connection (a
// tail): a poll's status comes after its document, a tail's before its
// lines, a network error or a timeout is status 0, and nothing is
// published empty.
func TestAnswered(t *testing.T) {
	const ok, notModified = http.StatusOK, http.StatusNotModified
	tests := []struct {
		name    string
		respond func(n int, w http.ResponseWriter, r *http.Request) // nil: the connection is refused
		// requests is the number of polls or connections made.
		requests   int
		poll, tail []sinkCall
	}{
		{"200 new", func(n int, w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "[%d]", n)
		}, 2,
			[]sinkCall{published("[0]"), answered(ok), published("[1]"), answered(ok)},
			[]sinkCall{answered(ok), published("[0]"), answered(ok), published("[1]")}},
		{"200 unchanged", func(n int, w http.ResponseWriter, r *http.Request) {
			w.Write([]byte("[1]"))
		}, 2,
			[]sinkCall{published("[1]"), answered(ok), answered(ok)},
			[]sinkCall{answered(ok), published("[1]"), answered(ok), published("[1]")}},
		{"304", func(n int, w http.ResponseWriter, r *http.Request) {
			if n > 0 {
				w.WriteHeader(notModified)
				return
			}
			w.Header().Set("ETag", `"v1"`)
			w.Write([]byte("[1]"))
		}, 2,
			[]sinkCall{published("[1]"), answered(ok), answered(notModified)},
			[]sinkCall{answered(ok), published("[1]"), answered(notModified)}},
		{"200 not JSON", func(n int, w http.ResponseWriter, r *http.Request) {
			w.Write([]byte("{bad"))
		}, 1, []sinkCall{answered(ok)}, []sinkCall{answered(ok)}},
		{"401", func(n int, w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(http.StatusUnauthorized)
		}, 1, []sinkCall{answered(http.StatusUnauthorized)}, []sinkCall{answered(http.StatusUnauthorized)}},
		{"503", func(n int, w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Retry-After", "120")
			w.WriteHeader(http.StatusServiceUnavailable)
		}, 1, []sinkCall{answered(http.StatusServiceUnavailable)}, []sinkCall{answered(http.StatusServiceUnavailable)}},
		{"no answer in time", func(n int, w http.ResponseWriter, r *http.Request) {
			hang(w, r)
		}, 1, []sinkCall{answered(0)}, []sinkCall{answered(0)}},
		{"connection refused", nil, 1, []sinkCall{answered(0)}, []sinkCall{answered(0)}},
	}
	for _, tt := range tests {
		for _, kind := range kinds {
			t.Run(tt.name+" "+kind, func(t *testing.T) {
				upstream := ssetest.ClosedURL(t)
				if tt.respond != nil {
					upstream = newTailUpstream(t, tt.respond).URL
				}
				c := testConfig(t, upstream, nil, &fakeObserver{})
				c.Timeout = 300 * time.Millisecond
				sink := newFakeSink()
				ctx := context.Background()
				want := tt.tail
				if kind == "poll" {
					want = tt.poll
					p := &Poll{Config: c}
					client := p.newClient()
					defer client.CloseIdleConnections()
					for range tt.requests {
						p.poll(ctx, client, sink)
					}
				} else {
					tail := &Tail{Config: c}
					client := newClient(c.Timeout)
					defer client.CloseIdleConnections()
					for range tt.requests {
						tail.stream(ctx, client, sink)
					}
				}
				require.Equal(t, want, sink.takeCalls())
			})
		}
	}
}

// TestStopClosesConnections checks that the upstream sees its connection
// closed as soon as Run returns, not after the client's idle timeout:
// both sources stop while waiting to make the next request, their
// connection idle and ready for reuse.
func TestStopClosesConnections(t *testing.T) {
	closed := make(chan struct{}, 10)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("[1]")) // a document, or a stream of one line that ends
	}))
	srv.Config.ConnState = func(_ net.Conn, state http.ConnState) {
		if state == http.StateClosed {
			closed <- struct{}{}
		}
	}
	srv.Start()
	defer srv.Close()

	c := testConfig(t, srv.URL, nil, &fakeObserver{})
	c.Backoff = Backoff{Initial: time.Hour, Max: time.Hour}
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			sink := newFakeSink()
			stop := start(t, newSource(kind, c), sink)
			sink.expectBatch(t, "[1]")
			stop()
			select {
			case <-closed:
			case <-time.After(5 * time.Second):
				t.Fatal("the upstream's connection still open 5s after Run returned")
			}
		})
	}
}

// TestLimitBoundsRequestsInFlight starts many pollers on one limit against
// an upstream that holds each request until the test lets it go: the
// upstream never has more requests at once than the limit, and every poller
// gets its answer.
func TestLimitBoundsRequestsInFlight(t *testing.T) {
	const pollers, limit = 20, 3
	var mu sync.Mutex
	inFlight, most := 0, 0
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		inFlight++
		most = max(most, inFlight)
		mu.Unlock()
		select {
		case <-release:
		case <-r.Context().Done():
		}
		mu.Lock()
		inFlight--
		mu.Unlock()
		w.Write([]byte(`{"v":1}`))
	}))
	defer srv.Close()

	c := testConfig(t, srv.URL, nil, &fakeObserver{})
	c.Limit = make(chan struct{}, limit)
	sinks := make([]*fakeSink, pollers)
	for i := range sinks {
		sinks[i] = newFakeSink()
		start(t, newSource("poll", c), sinks[i])
	}
	waitFor(t, func() bool { mu.Lock(); defer mu.Unlock(); return inFlight >= limit })
	for range pollers {
		release <- struct{}{}
	}
	for _, sink := range sinks {
		sink.expectCalls(t, published(`{"v":1}`), answered(http.StatusOK))
	}
	mu.Lock()
	defer mu.Unlock()
	require.Equal(t, limit, most, "most requests in flight at once")
}

// TestLimitFreeWhileTailing checks that a tail gives its slot back once its
// response's headers arrived: with a limit of one, a poll is answered while
// the tail streams.
func TestLimitFreeWhileTailing(t *testing.T) {
	send := make(chan string)
	streaming := newTailUpstream(t, streamFrom(send))
	document := newPollUpstream(t, `{"v":1}`)
	limit := make(chan struct{}, 1)

	tailSink := newFakeSink()
	runTail(t, streaming.URL, nil, tailSink, func(c *Config) { c.Limit = limit })
	send <- "[1]\n"
	tailSink.expectBatch(t, "[1]")

	c := testConfig(t, document.URL, nil, &fakeObserver{})
	c.Limit = limit
	pollSink := newFakeSink()
	start(t, newSource("poll", c), pollSink)
	pollSink.expectBatch(t, `{"v":1}`)
}

// TestLimitWaitEndsWithContext checks that a source waiting for a slot
// stops when its context ends, having sent no request and told its sink
// nothing.
func TestLimitWaitEndsWithContext(t *testing.T) {
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			u := newTailUpstream(t, streamFrom(nil))
			c := testConfig(t, u.URL, nil, &fakeObserver{})
			c.Limit = make(chan struct{}, 1)
			c.Limit <- struct{}{} // taken by another source
			sink := newFakeSink()
			stop := start(t, newSource(kind, c), sink)
			stop()
			u.mu.Lock()
			defer u.mu.Unlock()
			require.Empty(t, u.requests)
			require.Empty(t, sink.takeCalls())
		})
	}
}
