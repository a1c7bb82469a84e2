package integration

import (
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ssefeed/caddy-ssefeed/internal/ssetest"
)

func TestPollDocumentFeed(t *testing.T) {
	for _, tc := range []struct {
		name string
		// validator is the header the upstream sends and the conditional
		// header the feed must send back; none for an API without them.
		validator, conditional string
		values                 [2]string
	}{
		{name: "body hash"},
		{name: "etag", validator: "ETag", conditional: "If-None-Match", values: [2]string{`"v1"`, `"v2"`}},
		{name: "last modified", validator: "Last-Modified", conditional: "If-Modified-Since",
			values: [2]string{"Mon, 02 Jan 2006 15:04:05 GMT", "Tue, 03 Jan 2006 15:04:05 GMT"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			answer := func(version int) jsonAnswer {
				a := jsonAnswer{Body: fmt.Sprintf(`{"version": %d}`, version)}
				if tc.validator != "" {
					a.Header = map[string]string{tc.validator: tc.values[version-1]}
				}
				return a
			}
			up := newJSONUpstream(t, answer(1))
			startCaddy(t, `sse_feed /events {
	poll `+up.URL+`/doc 100ms
}`)
			first := openStream(t, "/events")
			first.ExpectData(t, `{"version":1}`) // initial 1: the latest document at once

			// Unchanged: revalidated (304) or the same body (hash), never
			// published again.
			seen := len(up.WaitRequests(t, 4))
			first.ExpectQuiet(t, 300*time.Millisecond)
			requests := up.Requests()
			for _, r := range requests[1:seen] {
				wantStatus := http.StatusOK
				if tc.validator != "" {
					wantStatus = http.StatusNotModified
					if got := r.Header.Get(tc.conditional); got != tc.values[0] {
						t.Fatalf("%s = %q, want %q", tc.conditional, got, tc.values[0])
					}
				}
				if r.Status != wantStatus {
					t.Fatalf("upstream answered %d, want %d", r.Status, wantStatus)
				}
			}

			up.Set(answer(2))
			first.ExpectData(t, `{"version":2}`)
			first.ExpectQuiet(t, 300*time.Millisecond)
			if tc.validator != "" {
				last := up.Requests()
				if got := last[len(last)-1].Header.Get(tc.conditional); got != tc.values[1] {
					t.Fatalf("after the change, %s = %q, want %q", tc.conditional, got, tc.values[1])
				}
			}

			second := openStream(t, "/events")
			second.ExpectData(t, `{"version":2}`)
			second.ExpectQuiet(t, 300*time.Millisecond)
		})
	}
}

func TestPollItemFeed(t *testing.T) {
	// The first answer is slow so that the subscriber is surely waiting
	// for the baseline.
	up := newJSONUpstream(t, jsonAnswer{Body: itemsDoc(1, 2), Delay: 300 * time.Millisecond})
	feed := `poll ` + up.URL + ` 100ms
	items /items
	id /id
	data /n`
	startCaddy(t, `sse_feed /events {
	`+feed+`
}
sse_feed /latest {
	`+feed+`
	initial 2
}`)
	live := openStream(t, "/events")
	up.WaitRequests(t, 1)
	live.ExpectQuiet(t, 300*time.Millisecond) // the baseline is not news

	up.Set(jsonAnswer{Body: itemsDoc(1, 2, 3, 4)})
	live.ExpectData(t, "3", "4")
	// 1 and 2 leave the answer; then 1 comes back, with the new 5.
	polls := len(up.Requests())
	up.Set(jsonAnswer{Body: itemsDoc(3, 4)})
	up.WaitRequests(t, polls+2)
	up.Set(jsonAnswer{Body: itemsDoc(3, 1, 4, 5)})
	live.ExpectData(t, "5")
	live.ExpectQuiet(t, 300*time.Millisecond)

	// The baseline filled the replay log: for initial and resumption.
	openStream(t, "/latest").ExpectData(t, "4", "5")
	resumed := openStream(t, "/events", "Last-Event-ID", "1")
	resumed.ExpectData(t, "2", "3", "4", "5")

	up.Set(jsonAnswer{Body: itemsDoc(3, 1, 4, 5, 6, 7)})
	live.ExpectData(t, "6", "7")
	resumed.ExpectData(t, "6", "7")
	resumed.ExpectQuiet(t, 300*time.Millisecond)
}

func TestPollItemFeedWithoutIDs(t *testing.T) {
	up := newJSONUpstream(t, jsonAnswer{Body: `{"items":[{"a":1},{"a":2}]}`})
	startCaddy(t, `sse_feed /events {
	poll `+up.URL+` 100ms
	items /items
}`)
	s := openStream(t, "/events")
	up.WaitRequests(t, 2)
	up.Set(jsonAnswer{Body: `{"items":[{"a":1},{"a":2},{"a":3}]}`})
	ev := s.NextEvent(t)
	if ev.Data != `{"a":3}` || !ev.HasIDField || ev.LastEventID == "" {
		t.Fatalf("event = %+v, want {\"a\":3} with a generated id", ev)
	}
	up.Set(jsonAnswer{Body: `{"items":[{"a":2},{"a":3},{"a":4}]}`})
	s.ExpectData(t, `{"a":4}`)
	s.ExpectQuiet(t, 300*time.Millisecond)
}

func TestPollNewestFirst(t *testing.T) {
	up := newJSONUpstream(t, jsonAnswer{Body: itemsDoc(2, 1)})
	startCaddy(t, `sse_feed /events {
	poll `+up.URL+` 100ms
	items /items
	id /id
	data /n
	order newest_first
}`)
	s := openStream(t, "/events")
	up.WaitRequests(t, 2)
	up.Set(jsonAnswer{Body: itemsDoc(4, 3, 2, 1)})
	s.ExpectData(t, "3", "4")
	s.ExpectQuiet(t, 300*time.Millisecond)
}

func TestPollSinceCursor(t *testing.T) {
	// The API lists the items after ?since=<id>; ids hold a space, so the
	// cursor must arrive URL-escaped.
	var available atomic.Int64
	available.Store(2)
	up := newJSONUpstream(t, jsonAnswer{})
	up.SetFunc(func(r *http.Request) jsonAnswer {
		since, _ := strconv.Atoi(strings.TrimPrefix(r.URL.Query().Get("since"), "item "))
		var elems []string
		for i := since + 1; i <= int(available.Load()); i++ {
			elems = append(elems, fmt.Sprintf(`{"id":"item %d"}`, i))
		}
		return jsonAnswer{Body: `{"items":[` + strings.Join(elems, ",") + `]}`}
	})
	startCaddy(t, `sse_feed /events {
	poll "`+up.URL+`/items?since={sse_feed.last_id}" 100ms
	header X-Since {sse_feed.last_id}
	items /items
	id /id
	data /id
	initial 5
}`)
	s := openStream(t, "/events")
	s.ExpectData(t, "item 1", "item 2")
	for n := 3; n <= 5; n++ {
		available.Store(int64(n))
		s.ExpectData(t, "item "+strconv.Itoa(n))
	}
	up.WaitRequests(t, len(up.Requests())+2)
	s.ExpectQuiet(t, 300*time.Millisecond)

	requests := up.Requests()
	if q := requests[0].RawQuery; q != "since=" {
		t.Fatalf("first request's query = %q, want since= (no event yet)", q)
	}
	last := requests[len(requests)-1]
	want := url.QueryEscape("item 5")
	if last.RawQuery != "since="+want || last.Header.Get("X-Since") != want {
		t.Fatalf("last request: query %q, X-Since %q; want the escaped last id %q",
			last.RawQuery, last.Header.Get("X-Since"), want)
	}
}

func TestPollSharedBySubscribers(t *testing.T) {
	// The slow answer gives overlapping polls every chance to show.
	up := newJSONUpstream(t, jsonAnswer{Body: `{"v":1}`, Delay: 50 * time.Millisecond})
	startCaddy(t, `sse_feed /events {
	poll `+up.URL+` 200ms
}`)
	const subscribers = 100
	streams := make([]*ssetest.Stream, subscribers)
	for i := range streams {
		streams[i] = openStream(t, "/events")
	}
	for _, s := range streams {
		s.ExpectData(t, `{"v":1}`)
	}

	// Over 2s, with 250ms per poll (200ms apart plus a 50ms answer), about
	// 8 requests: one per interval, not one per subscriber.
	before := len(up.Requests())
	time.Sleep(2 * time.Second)
	polls := len(up.Requests()) - before
	t.Logf("%d upstream requests in 2s for %d subscribers", polls, subscribers)
	if polls < 4 || polls > 12 {
		t.Fatalf("%d upstream requests in 2s, want about 8", polls)
	}
	if n := up.MaxInFlight(); n != 1 {
		t.Fatalf("%d polls overlapped, want none", n)
	}

	up.Set(jsonAnswer{Body: `{"v":2}`})
	for _, s := range streams {
		s.ExpectData(t, `{"v":2}`)
	}
}

func TestPollStartsWithTheFirstSubscriberAndLingers(t *testing.T) {
	up := newJSONUpstream(t, jsonAnswer{Body: `{"v":1}`})
	startCaddy(t, `sse_feed /events {
	poll `+up.URL+` 100ms
	linger 300ms
}`)
	time.Sleep(300 * time.Millisecond)
	if n := len(up.Requests()); n != 0 {
		t.Fatalf("%d upstream requests before any subscriber, want none", n)
	}

	s := openStream(t, "/events")
	s.ExpectData(t, `{"v":1}`)
	up.WaitRequests(t, 3)
	s.Close()
	left := time.Now()

	// Polling goes on for the linger, then stops.
	time.Sleep(time.Second)
	requests := up.Requests()
	time.Sleep(500 * time.Millisecond)
	if n := len(up.Requests()); n != len(requests) {
		t.Fatalf("%d upstream requests after the linger, want none", n-len(requests))
	}
	lastPoll := requests[len(requests)-1].Start.Sub(left)
	t.Logf("last poll %v after the last subscriber left (linger 300ms)", lastPoll)
	if lastPoll < 100*time.Millisecond || lastPoll > 800*time.Millisecond {
		t.Fatalf("last poll %v after the last subscriber left, want within about the linger of 300ms", lastPoll)
	}

	// The next subscriber starts polling again. It gets the latest
	// document it finds, which may already be the new one.
	up.Set(jsonAnswer{Body: `{"v":2}`})
	again := openStream(t, "/events")
	ev := again.NextEvent(t)
	if ev.Data == `{"v":1}` {
		ev = again.NextEvent(t)
	}
	if ev.Data != `{"v":2}` {
		t.Fatalf("event %+v, want the new document {\"v\":2}", ev)
	}
	if n := len(up.Requests()); n <= len(requests) {
		t.Fatal("polling did not start again with a new subscriber")
	}
}

func TestPollSurvivesUpstreamFailures(t *testing.T) {
	// The failed answers list item 2, which must come only once the
	// upstream has recovered.
	for _, tc := range []struct {
		name    string
		options string
		fail    func(up *jsonUpstream)
		recover func(up *jsonUpstream, t *testing.T)
	}{
		{name: "timeout", options: "timeout 150ms", fail: func(up *jsonUpstream) {
			up.Set(jsonAnswer{Body: itemsDoc(1, 2), Delay: time.Second})
		}},
		{name: "status 500", fail: func(up *jsonUpstream) {
			up.Set(jsonAnswer{Status: http.StatusInternalServerError, Body: itemsDoc(1, 2)})
		}},
		{name: "invalid JSON", fail: func(up *jsonUpstream) {
			up.Set(jsonAnswer{Body: itemsDoc(1, 2) + "}"})
		}},
		{name: "over max_body", options: "max_body 1KiB", fail: func(up *jsonUpstream) {
			up.Set(jsonAnswer{Body: `{"pad":"` + strings.Repeat("x", 1024) + `",` + itemsDoc(1, 2)[1:]})
		}},
		{name: "connection refused", fail: (*jsonUpstream).Refuse, recover: (*jsonUpstream).Accept},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := newJSONUpstream(t, jsonAnswer{Body: itemsDoc(1)})
			startCaddy(t, `sse_feed /events {
	poll `+up.URL+` 100ms
	items /items
	id /id
	data /n
	heartbeat 100ms
	`+tc.options+`
}`)
			s := openStream(t, "/events")
			up.WaitRequests(t, 2)

			before := len(up.Requests())
			tc.fail(up)
			s.ExpectComments(t, 5) // the stream stays, and quiet
			if tc.recover == nil {
				up.WaitRequests(t, before+2) // the failure was met, twice
			}

			up.Set(jsonAnswer{Body: itemsDoc(1, 2, 3)})
			if tc.recover != nil {
				tc.recover(up, t)
			}
			s.ExpectData(t, "2", "3")
			s.ExpectQuiet(t, 500*time.Millisecond)
		})
	}
}

func TestPollHonoursRetryAfter(t *testing.T) {
	for _, status := range []int{http.StatusTooManyRequests, http.StatusServiceUnavailable} {
		t.Run(strconv.Itoa(status), func(t *testing.T) {
			up := newJSONUpstream(t, jsonAnswer{Body: `{"v":1}`})
			startCaddy(t, `sse_feed /events {
	poll `+up.URL+` 100ms
	heartbeat 200ms
}`)
			s := openStream(t, "/events")
			s.ExpectData(t, `{"v":1}`)

			up.Set(jsonAnswer{Status: status, Header: map[string]string{"Retry-After": "2"}})
			i := waitForStatus(t, up, status)
			up.Set(jsonAnswer{Body: `{"v":2}`})
			s.ExpectData(t, `{"v":2}`)
			requests := up.WaitRequests(t, i+2)
			wait := requests[i+1].Start.Sub(requests[i].End)
			t.Logf("next request %v after Retry-After: 2", wait)
			if wait < 1500*time.Millisecond {
				t.Fatalf("next request %v after Retry-After: 2, want at least about 2s", wait)
			}
		})
	}
}

// waitForStatus waits for the upstream to answer status and returns the
// index of that request.
func waitForStatus(t *testing.T, up *jsonUpstream, status int) int {
	t.Helper()
	for n := 1; ; n++ {
		requests := up.WaitRequests(t, n)
		if requests[n-1].Status == status {
			return n - 1
		}
	}
}
