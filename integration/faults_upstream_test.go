package integration

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"runtime"
	"slices"
	"sync/atomic"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ssefeed/caddy-ssefeed/internal/ssetest"
)

// The upstream misbehaves: bad bytes, bodies too large, a line or a
// response that never ends or never starts, a redirect elsewhere.

func TestInvalidUTF8BecomesReplacementCharacters(t *testing.T) {
	up := newNDJSONUpstream(t)
	startCaddy(t, `sse_feed /events {
	tail `+up.URL+`
	id /id
	data /body
}`)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	resp, err := ssetest.Get(ctx, http.DefaultClient, siteURL+"/events")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var raw bytes.Buffer
	r := ssetest.NewReader(io.TeeReader(resp.Body, &raw))
	up.WaitConnected(t, 1)
	up.Send("{\"id\":\"1\",\"body\":\"a\xffb\"}\n")
	up.Send("{\"id\":\"2\",\"body\":{\"k\":\"c\xfe\xffd\"}}\n")
	up.Send("{\"id\":\"3\",\"body\":\"fine\"}\n")
	var got []string
	for len(got) < 3 {
		item, err := r.Next()
		if err != nil {
			t.Fatalf("stream ended after %q: %v", got, err)
		}
		if item.Event != nil {
			got = append(got, item.Event.Data)
		}
	}
	if want := []string{"a\uFFFDb", `{"k":"c` + "\uFFFD\uFFFD" + `d"}`, "fine"}; !slices.Equal(got, want) {
		t.Errorf("data %q, want %q", got, want)
	}
	if !utf8.Valid(raw.Bytes()) {
		t.Errorf("the stream is not UTF-8: %q", raw.Bytes())
	}
}

func TestHugePollBodyIsSkipped(t *testing.T) {
	const huge = 50 << 20
	var hugeNow atomic.Bool
	var served, mostWritten atomic.Int64
	var doc atomic.Value
	doc.Store(`{"items":[{"id":"1"}]}`)
	up := newFuncUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		if !hugeNow.Load() {
			_, _ = io.WriteString(w, doc.Load().(string))
			return
		}
		written := 0
		defer func() {
			served.Add(1)
			if int64(written) > mostWritten.Load() {
				mostWritten.Store(int64(written))
			}
		}()
		chunk := bytes.Repeat([]byte("x"), 64<<10)
		_, _ = io.WriteString(w, `{"items":[{"id":"h","pad":"`)
		for written < huge {
			n, err := w.Write(chunk)
			written += n
			if err != nil {
				return
			}
		}
		_, _ = io.WriteString(w, `"}]}`)
	})
	startCaddy(t, `sse_feed /events {
	poll `+up.URL+` 200ms
	items /items
	id /id
	heartbeat 300ms
	name huge
}`)
	s := openStream(t, "/events")
	s.ExpectComments(t, 1)
	baseline := heapInuse()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	hugeNow.Store(true)
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		assert.GreaterOrEqual(c, metric(c, `caddy_sse_feed_upstream_errors_total{feed="huge",reason="too_large"}`), 3.0)
	}, 20*time.Second, 50*time.Millisecond)
	s.ExpectComments(t, 1)
	after := heapInuse()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	doc.Store(`{"items":[{"id":"1"},{"id":"2"}]}`)
	hugeNow.Store(false)
	if ev := s.NextEvent(t); ev.LastEventID != "2" {
		t.Errorf("event %+v after the huge bodies, want id 2", ev)
	}
	polls := max(served.Load(), 1)
	perPoll := (ms.TotalAlloc - before.TotalAlloc) / uint64(polls)
	t.Logf("%d polls of a %d MiB body: the upstream wrote at most %d MiB of one before the feed hung up; %d MiB allocated per poll; heap in use %d MiB before, %d MiB after",
		polls, huge>>20, mostWritten.Load()>>20, perPoll>>20, baseline>>20, after>>20)
	if mostWritten.Load() >= huge {
		t.Errorf("the feed read a whole %d MiB body", huge>>20)
	}
	if after > baseline+32<<20 {
		t.Errorf("heap in use grew from %d to %d MiB", baseline>>20, after>>20)
	}
}

func TestLineThatNeverEndsKeepsStreamsAlive(t *testing.T) {
	release := make(chan struct{})
	var streamed atomic.Int64
	up := newFuncUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Get("since") != "" {
			// A reconnect after the long line: resume.
			writeNDJSON(w, `{"id":"3"}`)
			<-r.Context().Done()
			return
		}
		writeNDJSON(w, `{"id":"1"}`)
		_, _ = io.WriteString(w, `{"id":"2","pad":"`)
		chunk := bytes.Repeat([]byte("x"), 64<<10)
		rc := http.NewResponseController(w)
		for {
			select {
			case <-release:
				writeNDJSON(w, `"}`, `{"id":"3"}`)
				<-r.Context().Done()
				return
			case <-r.Context().Done():
				return
			case <-time.After(5 * time.Millisecond):
			}
			if _, err := w.Write(chunk); err != nil || rc.Flush() != nil {
				return
			}
			streamed.Add(int64(len(chunk)))
		}
	})
	startCaddy(t, `sse_feed /events {
	tail `+up.URL+`?since={sse_feed.last_id}
	id /id
	heartbeat 300ms
	name endless
}`)
	s := openStream(t, "/events")
	if ev := s.NextEvent(t); ev.LastEventID != "1" {
		t.Fatalf("first event %+v", ev)
	}
	baseline := heapInuse()
	for streamed.Load() < 24<<20 {
		s.ExpectComments(t, 1)
	}
	after := heapInuse()
	close(release)
	if ev := s.NextEvent(t); ev.LastEventID != "3" {
		t.Errorf("event %+v after the long line, want id 3", ev)
	}
	t.Logf("a line of %d MiB and counting: heartbeats went on; heap in use %d MiB before, %d MiB after",
		streamed.Load()>>20, baseline>>20, after>>20)
	if after > baseline+24<<20 {
		t.Errorf("heap in use grew from %d to %d MiB while the line went on", baseline>>20, after>>20)
	}
}

func TestResponseThatNeverStartsIsRetried(t *testing.T) {
	var requests atomic.Int64
	answer := make(chan struct{})
	up := newFuncUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		requests.Add(1)
		select {
		case <-answer:
		case <-r.Context().Done():
			return
		}
		writeNDJSON(w, `{"id":"1"}`)
		<-r.Context().Done()
	})
	startCaddy(t, `sse_feed /events {
	tail `+up.URL+`
	id /id
	timeout 300ms
	heartbeat 300ms
}`)
	s := openStream(t, "/events")
	for requests.Load() < 3 {
		s.ExpectComments(t, 1)
	}
	close(answer)
	if ev := s.NextEvent(t); ev.LastEventID != "1" {
		t.Errorf("event %+v, want id 1", ev)
	}
	t.Logf("%d requests timed out before the upstream answered", requests.Load()-1)
}

func TestRedirectToAnotherHostIsRefused(t *testing.T) {
	var elsewhere atomic.Int64
	other := newFuncUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		elsewhere.Add(1)
		writeNDJSON(w, `{"id":"stolen"}`)
	})
	var redirects atomic.Int64
	up := newFuncUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/away":
			redirects.Add(1)
			http.Redirect(w, r, other.URL+"/stream", http.StatusFound)
		case "/moved":
			http.Redirect(w, r, "/stream", http.StatusMovedPermanently)
		default:
			writeNDJSON(w, `{"id":"here"}`)
			<-r.Context().Done()
		}
	})
	startCaddy(t, `sse_feed /away {
	tail `+up.URL+`/away
	id /id
	header Authorization "Bearer secret"
	heartbeat 300ms
	name away
}
sse_feed /moved {
	tail `+up.URL+`/moved
	id /id
	heartbeat 300ms
}`)
	moved := openStream(t, "/moved")
	if ev := moved.NextEvent(t); ev.LastEventID != "here" {
		t.Errorf("same-host redirect: event %+v, want id here", ev)
	}
	away := openStream(t, "/away")
	for redirects.Load() < 2 {
		away.ExpectComments(t, 1)
	}
	if n := elsewhere.Load(); n > 0 {
		t.Errorf("the other host got %d requests", n)
	}
	if v := metric(t, `caddy_sse_feed_upstream_errors_total{feed="away",reason="connect"}`); v < 2 {
		t.Errorf("upstream connect errors = %v, want at least 2", v)
	}
}
