package ssefeed_test

import (
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ssefeed/caddy-ssefeed/internal/ssetest"
)

func TestTailDeliversEachLineAsItArrives(t *testing.T) {
	up := newNDJSONUpstream(t)
	startCaddy(t, `sse_feed /events {
	tail `+up.URL+`
	id /id
	type /kind
	data /body
}`)
	s := openStream(t, "/events")
	if got := s.Response.Header.Get("Content-Type"); got != "text/event-stream" {
		t.Fatalf("Content-Type = %q", got)
	}
	up.WaitConnected(t, 1)
	for i, line := range []string{`{"id":"a1","kind":"note","body":"hello"}`, `{"id":"a2","kind":"note","body":{"n":2}}`} {
		up.Send(line + "\n")
		ev := s.NextEvent(t)
		want := []string{"hello", `{"n":2}`}[i]
		if ev.Data != want || ev.Type != "note" || ev.LastEventID != []string{"a1", "a2"}[i] {
			t.Fatalf("event %d = %+v, want data %q", i, ev, want)
		}
	}
}

// line returns an NDJSON line with the given id and text body.
func line(id, body string) string {
	return fmt.Sprintf(`{"id":%q,"body":%q}`+"\n", id, body)
}

// idFeed is a tail feed that maps /id and /body, plus extra options.
func idFeed(up *ndjsonUpstream, path string, options ...string) string {
	return fmt.Sprintf("sse_feed %s {\n\ttail %s\n\tid /id\n\tdata /body\n\t%s\n}", path, up.URL, strings.Join(options, "\n\t"))
}

// expectIDs reads len(want) events and fails unless they carry the ids in
// want, in order.
func expectIDs(t *testing.T, s *ssetest.Stream, want ...string) {
	t.Helper()
	for i, ev := range s.NextEvents(t, len(want)) {
		if ev.LastEventID != want[i] || !ev.HasIDField {
			t.Fatalf("event %d = %+v, want id %q", i, ev, want[i])
		}
	}
}

// sendAndExpect sends lines with the given ids one at a time and waits for
// each one's event on every stream before sending the next.
func sendAndExpect(t *testing.T, up *ndjsonUpstream, ids []string, streams ...*ssetest.Stream) {
	t.Helper()
	for _, id := range ids {
		up.Send(line(id, "text of "+id))
		for _, s := range streams {
			expectIDs(t, s, id)
		}
	}
}

// expectStreamHeaders fails unless resp carries the event-stream headers.
func expectStreamHeaders(t *testing.T, resp *http.Response) {
	t.Helper()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("status = %d, want 200", resp.StatusCode)
	}
	for name, want := range map[string]string{
		"Content-Type":      "text/event-stream",
		"Cache-Control":     "no-cache",
		"X-Accel-Buffering": "no",
	} {
		if got := resp.Header.Get(name); got != want {
			t.Errorf("%s = %q, want %q", name, got, want)
		}
	}
}

func TestHeadersArriveBeforeAnyEvent(t *testing.T) {
	t.Run("upstream quiet", func(t *testing.T) {
		up := newNDJSONUpstream(t)
		startCaddy(t, idFeed(up, "/events"))
		s := openStream(t, "/events")
		expectStreamHeaders(t, s.Response)
		up.WaitConnected(t, 1)
		s.ExpectQuiet(t, 200*time.Millisecond)
		sendAndExpect(t, up, []string{"q1"}, s)
	})
	t.Run("upstream down", func(t *testing.T) {
		startCaddy(t, "sse_feed /events {\n\ttail "+ssetest.ClosedURL(t)+"\n\theartbeat 200ms\n}")
		s := openStream(t, "/events")
		expectStreamHeaders(t, s.Response)
		// The stream lives on: heartbeats keep coming while the upstream
		// is down.
		if item := s.Next(t); !item.IsComment {
			t.Fatalf("got %+v, want a heartbeat comment", item)
		}
	})
}

func TestEachEventArrivesBeforeTheNextIsProduced(t *testing.T) {
	up := newNDJSONUpstream(t)
	startCaddy(t, idFeed(up, "/events"))
	s := openStream(t, "/events")
	up.WaitConnected(t, 1)
	// A line written in pieces becomes an event when it is whole.
	up.Send(`{"id":"p1",`)
	s.ExpectQuiet(t, 100*time.Millisecond)
	up.Send(`"body":"pieces"}` + "\n")
	expectIDs(t, s, "p1")
	ids := make([]string, 20)
	for i := range ids {
		ids[i] = fmt.Sprintf("e%d", i)
	}
	sendAndExpect(t, up, ids, s)
	// Lines written together arrive together, in order.
	up.Send(line("b1", "x") + line("b2", "y") + line("b3", "z"))
	expectIDs(t, s, "b1", "b2", "b3")
}

func TestMapsIDsTypesAndData(t *testing.T) {
	up := newNDJSONUpstream(t)
	startCaddy(t, `sse_feed /typed {
	tail `+up.URL+`
	id /id
	type /kind
	data /body
}
sse_feed /fixed {
	tail `+up.URL+`
	event note
}`)
	typed := openStream(t, "/typed")
	fixed := openStream(t, "/fixed")
	up.WaitConnected(t, 2)

	first := `{"id":"m1","kind":"greeting","body":"line1\nline2\r\nline3"}`
	up.Send(first + "\n")
	if ev := typed.NextEvent(t); ev != (ssetest.Event{Type: "greeting", Data: "line1\nline2\nline3", LastEventID: "m1", HasIDField: true}) {
		t.Errorf("typed event = %+v", ev)
	}
	ev := fixed.NextEvent(t)
	if ev.Type != "note" || ev.Data != first || ev.LastEventID == "" || !ev.HasIDField {
		t.Errorf("fixed event = %+v, want type note, data %s and a generated id", ev, first)
	}
	generated := ev.LastEventID

	up.Send(`{ "id": "m2", "body": { "a": 1, "b": [true, null] } }` + "\n")
	if ev := typed.NextEvent(t); ev != (ssetest.Event{Type: "message", Data: `{"a":1,"b":[true,null]}`, LastEventID: "m2", HasIDField: true}) {
		t.Errorf("typed event = %+v", ev)
	}
	ev = fixed.NextEvent(t)
	if want := `{"id":"m2","body":{"a":1,"b":[true,null]}}`; ev.Type != "note" || ev.Data != want || ev.LastEventID == generated || ev.LastEventID == "" {
		t.Errorf("fixed event = %+v, want type note, data %s and a new generated id", ev, want)
	}
}

func TestResumesAfterAKnownID(t *testing.T) {
	for _, tc := range []struct {
		name   string
		path   string
		header []string
	}{
		{"Last-Event-ID header", "/events", []string{"Last-Event-ID", "r1"}},
		{"lastEventId query", "/events?lastEventId=r1", nil},
		{"last_event_id query", "/events?last_event_id=r1", nil},
		{"header before query", "/events?lastEventId=r2", []string{"Last-Event-ID", "r1"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := newNDJSONUpstream(t)
			startCaddy(t, idFeed(up, "/events"))
			live := openStream(t, "/events")
			up.WaitConnected(t, 1)
			sendAndExpect(t, up, []string{"r1", "r2", "r3"}, live)

			// Lines keep coming while the subscriber resumes: it must get
			// each exactly once, in order.
			var more []string
			for i := 4; i <= 40; i++ {
				more = append(more, fmt.Sprintf("r%d", i))
			}
			sent := make(chan struct{})
			go func() {
				defer close(sent)
				for _, id := range more {
					up.Send(line(id, "live"))
					time.Sleep(time.Millisecond)
				}
			}()
			resumed := openStream(t, tc.path, tc.header...)
			<-sent
			expectIDs(t, resumed, append([]string{"r2", "r3"}, more...)...)
			resumed.ExpectQuiet(t, 100*time.Millisecond)
			sendAndExpect(t, up, []string{"r41"}, resumed)
		})
	}
}

func TestResetsOnAnUnknownID(t *testing.T) {
	for _, tc := range []struct{ option, name string }{{"", "reset"}, {"reset_event gone", "gone"}} {
		t.Run(tc.name, func(t *testing.T) {
			up := newNDJSONUpstream(t)
			startCaddy(t, idFeed(up, "/events", tc.option))
			live := openStream(t, "/events")
			up.WaitConnected(t, 1)
			sendAndExpect(t, up, []string{"k1", "k2"}, live)

			s := openStream(t, "/events", "Last-Event-ID", "from-before")
			reset := s.NextEvent(t)
			if reset.Type != tc.name || reset.Data != `{"last_event_id":"from-before"}` || reset.HasIDField {
				t.Fatalf("first event = %+v, want %q with the unknown id and no id field", reset, tc.name)
			}
			expectIDs(t, s, "k1", "k2")
			sendAndExpect(t, up, []string{"k3"}, s, live)
		})
	}
	t.Run("nothing retained", func(t *testing.T) {
		up := newNDJSONUpstream(t)
		startCaddy(t, idFeed(up, "/events"))
		s := openStream(t, "/events", "Last-Event-ID", "from-before")
		// The reset goes out at once, not with the next event.
		if reset := s.NextEvent(t); reset.Type != "reset" {
			t.Fatalf("first event = %+v, want the reset", reset)
		}
		up.WaitConnected(t, 1)
		sendAndExpect(t, up, []string{"k1"}, s)
	})
}

func TestManySubscribersShareOneUpstreamConnection(t *testing.T) {
	up := newNDJSONUpstream(t)
	startCaddy(t, idFeed(up, "/events"))
	streams := make([]*ssetest.Stream, 50)
	for i := range streams {
		streams[i] = openStream(t, "/events")
	}
	up.WaitConnected(t, 1)
	sendAndExpect(t, up, []string{"s1", "s2", "s3", "s4", "s5"}, streams...)
	if n := len(up.Requests()); n != 1 {
		t.Fatalf("upstream got %d requests, want 1", n)
	}
}

func TestHeartbeat(t *testing.T) {
	t.Run("comment", func(t *testing.T) {
		up := newNDJSONUpstream(t)
		startCaddy(t, idFeed(up, "/events", "heartbeat 200ms"))
		s := openStream(t, "/events")
		up.WaitConnected(t, 1)
		sendAndExpect(t, up, []string{"h1"}, s)
		for range 2 {
			if item := s.Next(t); !item.IsComment {
				t.Fatalf("got %+v, want a heartbeat comment", item)
			}
		}
	})
	t.Run("off", func(t *testing.T) {
		up := newNDJSONUpstream(t)
		startCaddy(t, idFeed(up, "/events", "heartbeat off"))
		s := openStream(t, "/events")
		up.WaitConnected(t, 1)
		s.ExpectSilence(t, time.Second)
		sendAndExpect(t, up, []string{"h1"}, s)
	})
	t.Run("event", func(t *testing.T) {
		up := newNDJSONUpstream(t)
		startCaddy(t, idFeed(up, "/events", "heartbeat 200ms", "heartbeat_event ping"))
		s := openStream(t, "/events")
		up.WaitConnected(t, 1)
		up.Send(line("h1", "x"))
		for ev := s.NextEvent(t); !ev.HasIDField; ev = s.NextEvent(t) {
			// Heartbeats may come first on a slow machine.
		}
		if ev := s.NextEvent(t); ev != (ssetest.Event{Type: "ping", Data: "", LastEventID: "h1"}) {
			t.Fatalf("heartbeat = %+v, want a ping with empty data and no id field", ev)
		}
	})
}

func TestRetryAndInitial(t *testing.T) {
	up := newNDJSONUpstream(t)
	startCaddy(t, idFeed(up, "/events", "retry 2500ms", "initial 2"))
	first := openStream(t, "/events")
	if item := first.Next(t); item.Retry != 2500 {
		t.Fatalf("first item = %+v, want retry 2500", item)
	}
	up.WaitConnected(t, 1)
	sendAndExpect(t, up, []string{"i1", "i2", "i3"}, first)

	second := openStream(t, "/events")
	if item := second.Next(t); item.Retry != 2500 {
		t.Fatalf("first item = %+v, want retry 2500", item)
	}
	expectIDs(t, second, "i2", "i3")
	sendAndExpect(t, up, []string{"i4"}, first, second)
}

func TestMaxSubscribersTurnsTheExtraAwayWithRetry(t *testing.T) {
	up := newNDJSONUpstream(t)
	startCaddy(t, idFeed(up, "/events", "max_subscribers 1"))
	first := openStream(t, "/events")
	up.WaitConnected(t, 1)

	extra := openStream(t, "/events")
	expectStreamHeaders(t, extra.Response)
	if item := extra.Next(t); item.Retry <= 0 {
		t.Fatalf("first item = %+v, want a retry field", item)
	}
	extra.ExpectEnd(t, 5*time.Second)
	sendAndExpect(t, up, []string{"x1"}, first)
}

func TestLastIDPlaceholderResumesTheUpstream(t *testing.T) {
	up := newNDJSONUpstream(t)
	startCaddy(t, `sse_feed /events {
	tail `+up.URL+`/feed?since={sse_feed.last_id}
	header X-Since "after {sse_feed.last_id}"
	id /id
}`)
	s := openStream(t, "/events")
	up.WaitConnected(t, 1)
	const id = "a b/&c=ü"
	sendAndExpect(t, up, []string{"first", id}, s)
	up.Disconnect()
	up.WaitConnected(t, 1)

	reqs := up.Requests()
	if len(reqs) != 2 {
		t.Fatalf("upstream got %d requests, want 2", len(reqs))
	}
	if got := reqs[0].URL.RawQuery; got != "since=" {
		t.Errorf("first request query = %q, want since=", got)
	}
	if got := reqs[1].URL.Query().Get("since"); got != id {
		t.Errorf("reconnect since = %q, want %q", got, id)
	}
	if got, want := reqs[1].Header.Get("X-Since"), "after "+url.QueryEscape(id); got != want {
		t.Errorf("reconnect X-Since = %q, want %q", got, want)
	}
	sendAndExpect(t, up, []string{"after-reconnect"}, s)
}

func TestSkipsInvalidAndOversizedLines(t *testing.T) {
	up := newNDJSONUpstream(t)
	startCaddy(t, idFeed(up, "/events", "max_body 64"))
	s := openStream(t, "/events")
	up.WaitConnected(t, 1)
	up.Send("{not json\n")
	sendAndExpect(t, up, []string{"v1"}, s)
	up.Send(line("long", strings.Repeat("x", 100)))
	sendAndExpect(t, up, []string{"v2"}, s)
	if n := len(up.Requests()); n != 1 {
		t.Fatalf("upstream got %d requests, want 1: a bad line must not end the tail", n)
	}
}

func TestReloadKeepsAnUnchangedFeed(t *testing.T) {
	up := newNDJSONUpstream(t)
	feed := "sse_feed /events {\n\ttail " + up.URL + "\n\t%s\n}"
	startCaddy(t, fmt.Sprintf(feed, "heartbeat 10s"))
	s := openStream(t, "/events")
	up.WaitConnected(t, 1)
	up.Send(`{"n":1}` + "\n")
	before := s.NextEvent(t)

	// Another route and another heartbeat leave the feed as it is.
	startCaddy(t, fmt.Sprintf(feed, "heartbeat 20s")+"\nrespond /other \"other\"")
	up.Send(`{"n":2}` + "\n")
	after := s.NextEvent(t)
	prefix, n, _ := strings.Cut(before.LastEventID, "-")
	if after.Data != `{"n":2}` || after.LastEventID != prefix+"-"+fmt.Sprint(mustAtoi(t, n)+1) {
		t.Fatalf("after the reload got %+v, want the id after %q", after, before.LastEventID)
	}
	if n := len(up.Requests()); n != 1 {
		t.Fatalf("upstream got %d requests, want 1", n)
	}

	// A changed feed ends the old streams so that clients reconnect.
	startCaddy(t, fmt.Sprintf(feed, "id /n"))
	s.ExpectEnd(t, 3*time.Second)
}

func TestUnloadEndsStreams(t *testing.T) {
	up := newNDJSONUpstream(t)
	startCaddy(t, idFeed(up, "/events", "heartbeat off"))
	s := openStream(t, "/events")
	up.WaitConnected(t, 1)
	sendAndExpect(t, up, []string{"u1"}, s)
	startCaddy(t, `respond "no feed here"`)
	s.ExpectEnd(t, 3*time.Second)
	up.WaitConnected(t, 0)
}

// TestLatency logs how long an event takes from the upstream writing its
// line to the client having it. It asserts no timing.
func TestLatency(t *testing.T) {
	up := newNDJSONUpstream(t)
	startCaddy(t, idFeed(up, "/events"))
	s := openStream(t, "/events")
	up.WaitConnected(t, 1)
	latencies := make([]time.Duration, 200)
	for i := range latencies {
		id := fmt.Sprintf("l%d", i)
		start := time.Now()
		up.Send(line(id, "latency"))
		expectIDs(t, s, id)
		latencies[i] = time.Since(start)
	}
	slices.Sort(latencies)
	t.Logf("upstream line to client event over %d events: p50 %v, p99 %v, max %v",
		len(latencies), latencies[len(latencies)/2], latencies[len(latencies)*99/100], latencies[len(latencies)-1])
}

func mustAtoi(t *testing.T, s string) int {
	t.Helper()
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatalf("%q is not a number: %v", s, err)
	}
	return n
}
