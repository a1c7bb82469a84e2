package source

import (
	"errors"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// runTail runs a Tail of rawURL with header into sink until the test ends,
// and returns its observer.
func runTail(t *testing.T, rawURL string, header map[string][]string, sink *fakeSink, configure func(*Config)) *fakeObserver {
	t.Helper()
	obs := &fakeObserver{}
	tail := &Tail{Config: testConfig(t, rawURL, header, obs)}
	if configure != nil {
		configure(&tail.Config)
	}
	start(t, tail, sink)
	return obs
}

func TestTailBatches(t *testing.T) {
	send := make(chan string)
	u := newTailUpstream(t, streamFrom(send))
	sink := newFakeSink()
	obs := runTail(t, u.URL, nil, sink, nil)

	send <- "[1]\n[2]\n"
	sink.expectBatch(t, "[1]", "[2]")
	// Each line sent alone is published before the next is sent.
	send <- "[3]\n"
	sink.expectBatch(t, "[3]")
	send <- `{"a":`
	send <- "4}\r\n"
	sink.expectBatch(t, `{"a":4}`)
	if requests, errs := obs.calls(); !slices.Equal(requests, []string{"ok"}) || len(errs) != 0 {
		t.Errorf("observed requests %q and errors %q, want one ok and no error", requests, errs)
	}
}

func TestTailSkipsBadLines(t *testing.T) {
	send := make(chan string)
	u := newTailUpstream(t, streamFrom(send))
	sink := newFakeSink()
	obs := runTail(t, u.URL, nil, sink, func(c *Config) { c.MaxBody = 16 })

	send <- "\"a\"\n{bad\n\n[\"" + strings.Repeat("x", 40) + "\"]\n\"b\"\n"
	sink.expectBatch(t, `"a"`, `"b"`)
	// A line followed by one that is skipped is not held back.
	send <- "\"c\"\n[\"" + strings.Repeat("x", 40) + "\"]\n"
	sink.expectBatch(t, `"c"`)
	send <- "\"d\"\nnot json\n"
	sink.expectBatch(t, `"d"`)
	_, errs := obs.calls()
	want := []string{ReasonInvalidJSON, ReasonTooLarge, ReasonTooLarge, ReasonInvalidJSON}
	if !slices.Equal(errs, want) {
		t.Errorf("errors %q, want %q", errs, want)
	}
}

// TestTailReconnects covers a stream that ends, an error answer, a response
// that never starts, and the last id in the URL and header of each request.
func TestTailReconnects(t *testing.T) {
	send := make(chan string)
	u := newTailUpstream(t, func(n int, w http.ResponseWriter, r *http.Request) {
		switch n {
		case 0:
			w.Write([]byte("[1]\n")) // and end the stream
		case 1:
			w.WriteHeader(http.StatusBadGateway)
		case 2:
			hang(w, r)
		default:
			stream(w, r, send)
		}
	})
	sink := newFakeSink()
	sink.setLastID("a b&c")
	obs := runTail(t, u.URL+"/?since={sse_feed.last_id}", map[string][]string{"X-Since": {"{sse_feed.last_id}"}}, sink, func(c *Config) {
		c.Timeout = 100 * time.Millisecond
	})

	sink.expectBatch(t, "[1]")
	send <- "[2]\n"
	sink.expectBatch(t, "[2]")

	requests, errs := obs.calls()
	if want := []string{"ok", "error", "error", "ok"}; !slices.Equal(requests, want) {
		t.Errorf("requests %q, want %q", requests, want)
	}
	if want := []string{ReasonStatus, ReasonConnect}; !slices.Equal(errs, want) {
		t.Errorf("errors %q, want %q", errs, want)
	}
	for n := range 4 {
		r := u.request(t, n)
		if r.URL.RawQuery != "since=a+b%26c" || r.Header.Get("X-Since") != "a+b%26c" {
			t.Errorf("request %d: query %q, header %q; want the escaped last id in both", n, r.URL.RawQuery, r.Header.Get("X-Since"))
		}
	}
}

// TestTailLineNeverEnds sends a line far over max_body without a line
// break: it is skipped and the stream goes on.
func TestTailLineNeverEnds(t *testing.T) {
	send := make(chan string)
	u := newTailUpstream(t, streamFrom(send))
	sink := newFakeSink()
	obs := runTail(t, u.URL, nil, sink, nil)

	chunk := strings.Repeat("x", 1<<20)
	for range 8 {
		send <- chunk
	}
	sink.expectNothing(t)
	send <- "\n[1]\n"
	sink.expectBatch(t, "[1]")
	if _, errs := obs.calls(); !slices.Equal(errs, []string{ReasonTooLarge}) {
		t.Errorf("errors %q, want one %q", errs, ReasonTooLarge)
	}
}

func TestTailRedirect(t *testing.T) {
	send := make(chan string)
	other := newTailUpstream(t, streamFrom(send))
	u := newTailUpstream(t, func(_ int, w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, other.URL, http.StatusFound)
	})
	sink := newFakeSink()
	obs := runTail(t, u.URL, nil, sink, nil)
	waitFor(t, func() bool { u.mu.Lock(); defer u.mu.Unlock(); return len(u.requests) >= 2 })
	sink.expectNothing(t)
	other.mu.Lock()
	defer other.mu.Unlock()
	if n := len(other.requests); n != 0 {
		t.Errorf("the other host got %d requests", n)
	}
	if _, errs := obs.calls(); len(errs) == 0 || errs[0] != ReasonConnect {
		t.Errorf("errors %q, want %q", errs, ReasonConnect)
	}
}

func TestTailPassesInvalidUTF8(t *testing.T) {
	send := make(chan string)
	u := newTailUpstream(t, streamFrom(send))
	sink := newFakeSink()
	runTail(t, u.URL, nil, sink, nil)

	send <- "{\"s\":\"\xff\xfe\"}\n"
	sink.expectBatch(t, "{\"s\":\"\xff\xfe\"}")
}

func TestTailLastIDOnReconnect(t *testing.T) {
	send := make(chan string)
	cut := make(chan struct{})
	u := newTailUpstream(t, func(n int, w http.ResponseWriter, r *http.Request) {
		if n == 0 {
			w.WriteHeader(http.StatusOK)
			http.NewResponseController(w).Flush()
			<-cut
			return
		}
		stream(w, r, send)
	})
	sink := newFakeSink()
	runTail(t, u.URL+"/?since={sse_feed.last_id}", nil, sink, nil)
	waitFor(t, func() bool { u.mu.Lock(); defer u.mu.Unlock(); return len(u.requests) == 1 })
	sink.setLastID("42")
	close(cut)
	send <- "[43]\n"
	sink.expectBatch(t, "[43]")
	if q := u.request(t, 0).URL.RawQuery; q != "since=" {
		t.Errorf("first request query %q, want since=", q)
	}
	if q := u.request(t, 1).URL.RawQuery; q != "since=42" {
		t.Errorf("reconnect query %q, want since=42", q)
	}
}

// TestIdleReader checks that a reader gone silent for the timeout is
// abandoned, and one that keeps sending, however slowly, is not.
func TestIdleReader(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		pr, pw := io.Pipe()
		idle := newIdleReader(pr, time.Minute, func() { pw.CloseWithError(errIdle) })
		defer idle.stop()
		ended := make(chan error, 1)
		go func() {
			_, err := io.Copy(io.Discard, idle)
			ended <- err
		}()
		expectEnded := func(want bool) {
			t.Helper()
			synctest.Wait()
			select {
			case err := <-ended:
				if !want || !errors.Is(err, errIdle) {
					t.Fatalf("read ended with %v at %v", err, time.Now())
				}
			default:
				if want {
					t.Fatalf("read still going at %v", time.Now())
				}
			}
		}

		for range 5 {
			time.Sleep(time.Minute - time.Nanosecond)
			pw.Write([]byte("x"))
		}
		expectEnded(false)
		time.Sleep(time.Minute - time.Nanosecond)
		expectEnded(false)
		time.Sleep(time.Nanosecond)
		expectEnded(true)
	})
}

// TestTailReadTimeout checks that a stream stalled in the middle of a line
// is dropped after the read timeout, counted, logged and made again, and
// that the partial line is not published.
func TestTailReadTimeout(t *testing.T) {
	u := newTailUpstream(t, func(n int, w http.ResponseWriter, r *http.Request) {
		if n == 0 {
			w.Write([]byte("[1]\n[2"))
		} else {
			w.Write([]byte("[3]\n"))
		}
		http.NewResponseController(w).Flush()
		hang(w, r)
	})
	sink := newFakeSink()
	core, logs := observer.New(zapcore.WarnLevel)
	obs := runTail(t, u.URL, nil, sink, func(c *Config) {
		c.ReadTimeout = 100 * time.Millisecond
		c.Logger = zap.New(core)
	})

	sink.expectBatch(t, "[1]")
	sink.expectBatch(t, "[3]")
	requests, errs := obs.calls()
	if !slices.Equal(requests, []string{"ok", "ok"}) || !slices.Equal(errs, []string{ReasonRead}) {
		t.Errorf("observed requests %q and errors %q, want two ok and one %q", requests, errs, ReasonRead)
	}
	warnings := logs.FilterMessage("tail failed; reconnecting").All()
	if len(warnings) != 1 || !strings.Contains(warnings[0].ContextMap()["error"].(string), "read_timeout (100ms)") {
		t.Errorf("warnings %v, want one of the read timeout", warnings)
	}
}
