package ssefeed_test

import (
	"testing"
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
