package integration

import (
	"fmt"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

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
	require.Equal(t, "text/event-stream", s.Response.Header.Get("Content-Type"))
	up.WaitConnected(t, 1)
	up.Send(`{"id":"a1","kind":"note","body":"hello"}` + "\n")
	require.Equal(t, ssetest.Event{Type: "note", Data: "hello", LastEventID: "a1", HasIDField: true}, s.NextEvent(t))
	up.Send(`{"id":"a2","kind":"note","body":{"n":2}}` + "\n")
	require.Equal(t, ssetest.Event{Type: "note", Data: `{"n":2}`, LastEventID: "a2", HasIDField: true}, s.NextEvent(t))
}

func TestHeadersArriveBeforeAnyEvent(t *testing.T) {
	t.Run("upstream quiet", func(t *testing.T) {
		up := newNDJSONUpstream(t)
		startCaddy(t, tailFeed(up.URL))
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
	startCaddy(t, tailFeed(up.URL))
	s := openStream(t, "/events")
	up.WaitConnected(t, 1)
	// A line written in pieces becomes an event when it is whole.
	up.Send(`{"id":"p1",`)
	s.ExpectQuiet(t, 100*time.Millisecond)
	up.Send(`"body":"pieces"}` + "\n")
	s.ExpectIDs(t, "p1")
	ids := make([]string, 20)
	for i := range ids {
		ids[i] = fmt.Sprintf("e%d", i)
	}
	sendAndExpect(t, up, ids, s)
	// Lines written together arrive together, in order.
	up.Send(line("b1", "x") + line("b2", "y") + line("b3", "z"))
	s.ExpectIDs(t, "b1", "b2", "b3")
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
	assert.Equal(t, ssetest.Event{Type: "greeting", Data: "line1\nline2\nline3", LastEventID: "m1", HasIDField: true}, typed.NextEvent(t), "typed event")
	ev := fixed.NextEvent(t)
	if ev.Type != "note" || ev.Data != first || ev.LastEventID == "" || !ev.HasIDField {
		t.Errorf("fixed event = %+v, want type note, data %s and a generated id", ev, first)
	}
	generated := ev.LastEventID

	up.Send(`{ "id": "m2", "body": { "a": 1, "b": [true, null] } }` + "\n")
	assert.Equal(t, ssetest.Event{Type: "message", Data: `{"a":1,"b":[true,null]}`, LastEventID: "m2", HasIDField: true}, typed.NextEvent(t), "typed event")
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
			startCaddy(t, tailFeed(up.URL))
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
			resumed.ExpectIDs(t, append([]string{"r2", "r3"}, more...)...)
			resumed.ExpectQuiet(t, 100*time.Millisecond)
			sendAndExpect(t, up, []string{"r41"}, resumed)
		})
	}
}

func TestResetsOnAnUnknownID(t *testing.T) {
	for _, tc := range []struct{ option, name string }{{"", "reset"}, {"reset_event gone", "gone"}} {
		t.Run(tc.name, func(t *testing.T) {
			up := newNDJSONUpstream(t)
			startCaddy(t, tailFeed(up.URL, tc.option))
			live := openStream(t, "/events")
			up.WaitConnected(t, 1)
			sendAndExpect(t, up, []string{"k1", "k2"}, live)

			s := openStream(t, "/events", "Last-Event-ID", "from-before")
			require.Equal(t, ssetest.Event{Type: tc.name, Data: `{"last_event_id":"from-before"}`, LastEventID: ""}, s.NextEvent(t),
				"the first event: the reset with the unknown id and no id field")
			s.ExpectIDs(t, "k1", "k2")
			sendAndExpect(t, up, []string{"k3"}, s, live)
		})
	}
	t.Run("nothing retained", func(t *testing.T) {
		up := newNDJSONUpstream(t)
		startCaddy(t, tailFeed(up.URL))
		s := openStream(t, "/events", "Last-Event-ID", "from-before")
		// The reset goes out at once, not with the next event.
		if reset := s.NextEvent(t); reset.Type != "reset" {
			t.Fatalf("first event = %+v, want the reset", reset)
		}
		up.WaitConnected(t, 1)
		sendAndExpect(t, up, []string{"k1"}, s)
	})
}

func TestFlushIntervalDeliversEveryEventOnceInOrder(t *testing.T) {
	up := newNDJSONUpstream(t)
	startCaddy(t, tailFeed(up.URL, "flush_interval 50ms"))
	streams := make([]*ssetest.Stream, 10)
	for i := range streams {
		streams[i] = openStream(t, "/events")
	}
	up.WaitConnected(t, 1)
	ids := make([]string, 60)
	for i := range ids {
		ids[i] = fmt.Sprintf("f%d", i)
		up.Send(line(ids[i], "x"))
		time.Sleep(2 * time.Millisecond) // lines over a few intervals
	}
	for _, s := range streams {
		s.ExpectIDs(t, ids...)
	}
	resumed := openStream(t, "/events", "Last-Event-ID", ids[29])
	resumed.ExpectIDs(t, ids[30:]...)
	up.Send(line("last", "x"))
	for _, s := range append(streams, resumed) {
		s.ExpectIDs(t, "last")
	}
}

func TestManySubscribersShareOneUpstreamConnection(t *testing.T) {
	up := newNDJSONUpstream(t)
	startCaddy(t, tailFeed(up.URL))
	streams := make([]*ssetest.Stream, 50)
	for i := range streams {
		streams[i] = openStream(t, "/events")
	}
	up.WaitConnected(t, 1)
	sendAndExpect(t, up, []string{"s1", "s2", "s3", "s4", "s5"}, streams...)
	require.Len(t, up.Requests(), 1, "upstream requests")
}

func TestHeartbeat(t *testing.T) {
	t.Run("comment", func(t *testing.T) {
		up := newNDJSONUpstream(t)
		startCaddy(t, tailFeed(up.URL, "heartbeat 200ms"))
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
		startCaddy(t, tailFeed(up.URL, "heartbeat off"))
		s := openStream(t, "/events")
		up.WaitConnected(t, 1)
		s.ExpectSilence(t, time.Second)
		sendAndExpect(t, up, []string{"h1"}, s)
	})
	t.Run("event", func(t *testing.T) {
		up := newNDJSONUpstream(t)
		startCaddy(t, tailFeed(up.URL, "heartbeat 200ms", "heartbeat_event ping"))
		s := openStream(t, "/events")
		up.WaitConnected(t, 1)
		up.Send(line("h1", "x"))
		for ev := s.NextEvent(t); !ev.HasIDField; ev = s.NextEvent(t) {
			// Heartbeats may come first on a slow machine.
		}
		require.Equal(t, ssetest.Event{Type: "ping", Data: "", LastEventID: "h1"}, s.NextEvent(t),
			"the heartbeat: a ping with empty data and no id field")
	})
}

func TestRetryAndInitial(t *testing.T) {
	up := newNDJSONUpstream(t)
	startCaddy(t, tailFeed(up.URL, "retry 2500ms", "initial 2"))
	first := openStream(t, "/events")
	require.Equal(t, 2500, first.Next(t).Retry, "the first item's retry")
	up.WaitConnected(t, 1)
	sendAndExpect(t, up, []string{"i1", "i2", "i3"}, first)

	second := openStream(t, "/events")
	require.Equal(t, 2500, second.Next(t).Retry, "the first item's retry")
	second.ExpectIDs(t, "i2", "i3")
	sendAndExpect(t, up, []string{"i4"}, first, second)
}

func TestMaxSubscribersTurnsTheExtraAwayWithRetry(t *testing.T) {
	up := newNDJSONUpstream(t)
	startCaddy(t, tailFeed(up.URL, "max_subscribers 1"))
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
	for _, id := range []string{"first", id} {
		up.Send(line(id, "text of "+id))
		s.ExpectIDs(t, id)
	}
	up.Disconnect()
	up.WaitConnected(t, 1)

	reqs := up.Requests()
	require.Len(t, reqs, 2, "upstream requests")
	assert.Equal(t, "since=", reqs[0].URL.RawQuery, "first request query")
	assert.Equal(t, id, reqs[1].URL.Query().Get("since"), "reconnect since")
	assert.Equal(t, "after "+url.QueryEscape(id), reqs[1].Header.Get("X-Since"), "reconnect X-Since")
	up.Send(line("after-reconnect", "text"))
	s.ExpectIDs(t, "after-reconnect")
}

func TestSkipsInvalidAndOversizedLines(t *testing.T) {
	up := newNDJSONUpstream(t)
	startCaddy(t, tailFeed(up.URL, "max_body 64"))
	s := openStream(t, "/events")
	up.WaitConnected(t, 1)
	up.Send("{not json\n")
	sendAndExpect(t, up, []string{"v1"}, s)
	up.Send(line("long", strings.Repeat("x", 100)))
	sendAndExpect(t, up, []string{"v2"}, s)
	require.Len(t, up.Requests(), 1, "upstream requests: a bad line must not end the tail")
}

// TestLatency logs how long an event takes from the upstream writing its
// line to the client having it. It asserts no timing.
func TestLatency(t *testing.T) {
	up := newNDJSONUpstream(t)
	startCaddy(t, tailFeed(up.URL))
	s := openStream(t, "/events")
	up.WaitConnected(t, 1)
	ids := make([]string, 200)
	for i := range ids {
		ids[i] = fmt.Sprintf("l%d", i)
	}
	latencies := sendAndExpect(t, up, ids, s)
	slices.Sort(latencies)
	t.Logf("upstream line to client event over %d events: p50 %v, p99 %v, max %v",
		len(latencies), latencies[len(latencies)/2], latencies[len(latencies)*99/100], latencies[len(latencies)-1])
}
