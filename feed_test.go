package ssefeed

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/zap"

	"github.com/ssefeed/caddy-ssefeed/internal/ssetest"
	"github.com/ssefeed/caddy-ssefeed/replay"
	"github.com/ssefeed/caddy-ssefeed/source"
)

// stubReader is a source that reads nothing: it records when Run starts and
// returns when its context ends.
type stubReader struct {
	mu      sync.Mutex
	running int
	starts  int
	ends    int
	overlap bool // two runs at once were seen
}

func (r *stubReader) Run(ctx context.Context, _ source.Sink) {
	r.mu.Lock()
	r.starts++
	r.running++
	r.overlap = r.overlap || r.running > 1
	r.mu.Unlock()
	<-ctx.Done()
	r.mu.Lock()
	r.running--
	r.ends++
	r.mu.Unlock()
}

// counts returns how many runs started and ended, and whether two ever ran
// at once.
func (r *stubReader) counts() (starts, ends int, overlap bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.starts, r.ends, r.overlap
}

// newTestFeed returns a feed of the given kind, mapped as c says, with a
// stub reader and a tiny linger; it is destructed when the test ends.
func newTestFeed(t *testing.T, kind feedKind, c FeedConfig, limits replay.Limits) *feed {
	t.Helper()
	m, err := c.mapping()
	if err != nil {
		t.Fatal(err)
	}
	return buildTestFeed(t, feedParts{
		kind: kind, source: &stubReader{}, mapping: m, log: replay.New(limits),
		linger: time.Millisecond, logger: zap.NewNop(),
	})
}

// buildTestFeed builds a feed of parts, with metrics named after the test;
// it is destructed when the test ends.
func buildTestFeed(t *testing.T, parts feedParts) *feed {
	t.Helper()
	metrics, err := newFeedMetrics(t.Name())
	if err != nil {
		t.Fatal(err)
	}
	parts.metrics = metrics
	f := newFeed(parts)
	t.Cleanup(func() { _ = f.Destruct() })
	return f
}

// publish hands the feed values that arrived together.
func publish(f *feed, values ...string) {
	raw := make([]json.RawMessage, len(values))
	for i, v := range values {
		raw[i] = json.RawMessage(v)
	}
	f.Publish(raw)
}

// answer hands the feed a poll's answer, as a source would: the document
// if it changed (doc is not empty), then the status.
func answer(f *feed, doc string) {
	if doc != "" {
		publish(f, doc)
	}
	f.Answered(http.StatusOK)
}

// eventsFrom returns the events in the feed's log from cursor on, parsed as
// a browser would, and the cursor after them.
func eventsFrom(t *testing.T, f *feed, cursor uint64) ([]ssetest.Event, uint64) {
	t.Helper()
	frames, cursor, _, _, err := f.log.Read(cursor, nil, 1<<20, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	r := ssetest.NewReader(bytes.NewReader(bytes.Join(frames, nil)))
	var events []ssetest.Event
	for {
		ev, err := r.NextEvent()
		if errors.Is(err, io.EOF) {
			return events, cursor
		}
		if err != nil {
			t.Fatal(err)
		}
		events = append(events, ev)
	}
}

// dataOf returns the data of each event.
func dataOf(events []ssetest.Event) []string {
	data := make([]string, len(events))
	for i, ev := range events {
		data[i] = ev.Data
	}
	return data
}

// published reads what the feed published since cursor, moving the cursor.
func published(t *testing.T, f *feed, cursor *uint64) []string {
	t.Helper()
	events, next := eventsFrom(t, f, *cursor)
	*cursor = next
	return dataOf(events)
}

// expectPublished fails the test unless the feed published exactly want
// since cursor, and moves the cursor.
func expectPublished(t *testing.T, f *feed, cursor *uint64, want ...string) {
	t.Helper()
	if got := published(t, f, cursor); !slices.Equal(got, want) {
		t.Fatalf("published %q, want %q", got, want)
	}
}

func TestItemFeedDedupes(t *testing.T) {
	f := newTestFeed(t, itemFeed, FeedConfig{Items: "/items", ID: "/id", Data: "/v"}, replay.Limits{Count: 2})
	var cursor uint64
	publish(f, `{"items":[{"id":1,"v":"a"},{"id":2,"v":"b"}]}`)
	expectPublished(t, f, &cursor, "a", "b")

	// Seen in the last poll and in the log: not re-sent.
	publish(f, `{"items":[{"id":1,"v":"a"},{"id":2,"v":"b"},{"id":3,"v":"c"}]}`)
	expectPublished(t, f, &cursor, "c")

	// 1 has left the log (Count 2) but is in the last poll: not re-sent.
	publish(f, `{"items":[{"id":1,"v":"a"},{"id":3,"v":"c"},{"id":4,"v":"d"}]}`)
	expectPublished(t, f, &cursor, "d")

	// 3 is not in the last poll but still in the log: not re-sent.
	publish(f, `{"items":[{"id":4,"v":"d"}]}`)
	publish(f, `{"items":[{"id":3,"v":"c"},{"id":4,"v":"d"},{"id":5,"v":"e"}]}`)
	expectPublished(t, f, &cursor, "e")
}

func TestItemFeedRecognisesElementsByContent(t *testing.T) {
	f := newTestFeed(t, itemFeed, FeedConfig{Items: "/items"}, replay.Limits{})
	var cursor uint64
	publish(f, `{"items":["a",{"b":1}]}`)
	expectPublished(t, f, &cursor, "a", `{"b":1}`)
	publish(f, `{"items":["a",{"b":1},{"b":2}]}`)
	expectPublished(t, f, &cursor, `{"b":2}`)
	// White space is not content.
	publish(f, `{"items":[ "a" , { "b" : 1 }, {"b":2}, {"b":3} ]}`)
	expectPublished(t, f, &cursor, `{"b":3}`)
	// Without ids, two equal elements are one element.
	publish(f, `{"items":["c","c"]}`)
	expectPublished(t, f, &cursor, "c")
}

func TestItemFeedNewestFirst(t *testing.T) {
	f := newTestFeed(t, itemFeed, FeedConfig{Items: "/items", ID: "/id", Data: "/id", Order: "newest_first"}, replay.Limits{})
	var cursor uint64
	publish(f, `{"items":[{"id":2},{"id":1}]}`)
	expectPublished(t, f, &cursor, "1", "2")
	publish(f, `{"items":[{"id":5},{"id":4},{"id":3},{"id":2}]}`)
	expectPublished(t, f, &cursor, "3", "4", "5")
}

func TestItemFeedSkipsBadDocuments(t *testing.T) {
	f := newTestFeed(t, itemFeed, FeedConfig{Items: "/items", ID: "/id", Data: "/v"}, replay.Limits{})
	var cursor uint64
	publish(f, `{"items":{"not":"an array"}}`)
	publish(f, `{"items":[{"id":1},{"id":2,"v":"b"}]}`) // 1 has no data
	expectPublished(t, f, &cursor, "b")
}

func TestDocumentFeedPublishesEveryDocument(t *testing.T) {
	f := newTestFeed(t, documentFeed, FeedConfig{ID: "/id"}, replay.Limits{})
	var cursor uint64
	publish(f, `{"id":1,"v":"a"}`)
	publish(f, `{"id":1,"v":"b"}`)
	publish(f, `{"id":1,"v":"a"}`)
	expectPublished(t, f, &cursor, `{"id":1,"v":"a"}`, `{"id":1,"v":"b"}`, `{"id":1,"v":"a"}`)
}

func TestTailFeedDedupesByID(t *testing.T) {
	f := newTestFeed(t, tailFeed, FeedConfig{ID: "/id", Data: "/v"}, replay.Limits{})
	var cursor uint64
	publish(f, `{"id":"x","v":"1"}`, `{"id":"x","v":"2"}`, `{"v":"3"}`, `{"v":"3"}`)
	expectPublished(t, f, &cursor, "1", "3", "3")
	publish(f, `{"id":"x","v":"4"}`, `{"id":"y","v":"5"}`)
	expectPublished(t, f, &cursor, "5")
}

func TestTailFeedWithoutIDsKeepsRepeats(t *testing.T) {
	f := newTestFeed(t, tailFeed, FeedConfig{}, replay.Limits{})
	var cursor uint64
	publish(f, `"a"`, `"a"`)
	publish(f, `"a"`)
	expectPublished(t, f, &cursor, "a", "a", "a")
}

func TestFeedReplacesInvalidIDs(t *testing.T) {
	f := newTestFeed(t, tailFeed, FeedConfig{ID: "/id"}, replay.Limits{})
	long := strings.Repeat("x", maxIDLength+1)
	publish(f, `{"id":"ok"}`, `{"id":"a\nb"}`, `{"id":"`+long+`"}`, `{"id":"nul\u0000"}`, `{"id":"cr\r"}`, `{"id":null}`, `{}`)
	events, _ := eventsFrom(t, f, 0)
	if len(events) != 7 {
		t.Fatalf("published %d events, want 7", len(events))
	}
	if events[0].LastEventID != "ok" {
		t.Errorf("valid id became %q", events[0].LastEventID)
	}
	seen := map[string]bool{"ok": true}
	for _, ev := range events[1:] {
		id := ev.LastEventID
		if !ev.HasIDField || !strings.HasPrefix(id, f.idPrefix) || seen[id] {
			t.Errorf("event %q has id %q, want a fresh generated id", ev.Data, id)
		}
		seen[id] = true
	}
}

func TestGeneratedIDsUniqueAcrossFeeds(t *testing.T) {
	first := newTestFeed(t, tailFeed, FeedConfig{}, replay.Limits{})
	time.Sleep(time.Millisecond)
	second := newTestFeed(t, tailFeed, FeedConfig{}, replay.Limits{})
	publish(first, `1`, `2`)
	publish(second, `1`, `2`)
	for _, id := range []string{first.LastID(), "nope"} {
		if _, ok := second.log.After(id); ok {
			t.Errorf("id %q of another feed is known to the second", id)
		}
	}
	if first.idPrefix == second.idPrefix {
		t.Errorf("two feeds share the id prefix %q", first.idPrefix)
	}
}

func TestLastID(t *testing.T) {
	f := newTestFeed(t, itemFeed, FeedConfig{Items: "/items", ID: "/id"}, replay.Limits{})
	if id := f.LastID(); id != "" {
		t.Fatalf("LastID before any event = %q", id)
	}
	publish(f, `{"items":[{"id":"a"},{"id":"b"}]}`)
	if id := f.LastID(); id != "b" {
		t.Fatalf("LastID = %q, want b", id)
	}
	publish(f, `{"items":[{"id":"a"},{"id":"b"}]}`) // nothing new
	if id := f.LastID(); id != "b" {
		t.Fatalf("LastID after a poll with nothing new = %q, want b", id)
	}
	publish(f, `{"items":[{"id":"b"},{}]}`) // a generated id
	if id := f.LastID(); !strings.HasPrefix(id, f.idPrefix) {
		t.Fatalf("LastID = %q, want the generated id", id)
	}
}

func isDone(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

func TestReady(t *testing.T) {
	if tail := newTestFeed(t, tailFeed, FeedConfig{}, replay.Limits{}); !isDone(tail.ready) {
		t.Error("a tail feed is not ready at once")
	}
	for _, kind := range []feedKind{documentFeed, itemFeed} {
		f := newTestFeed(t, kind, FeedConfig{Items: "/items"}, replay.Limits{})
		if isDone(f.ready) {
			t.Fatalf("kind %d: ready before the first poll", kind)
		}
		answer(f, `{"items":[]}`) // a baseline with nothing in it
		if !isDone(f.ready) {
			t.Fatalf("kind %d: not ready after the first poll", kind)
		}
		answer(f, `{"items":[]}`) // closing twice must not panic
	}
}

func TestReadyEndIsTheBaselineEnd(t *testing.T) {
	f := newTestFeed(t, itemFeed, FeedConfig{Items: "/items", ID: "/id"}, replay.Limits{})
	a, _ := f.subscribe(0)
	defer f.unsubscribe()
	if _, wait := f.join(a, "", 0); wait == nil {
		t.Fatal("positioned before the first poll")
	}
	answer(f, `{"items":[{"id":"a"},{"id":"b"}]}`)
	<-a.ready
	answer(f, `{"items":[{"id":"a"},{"id":"b"},{"id":"c"}]}`)
	// A subscriber that waited and wakes only now still starts after the
	// baseline, so c is news to it.
	if end := f.readyEnd(); end != 2 {
		t.Fatalf("readyEnd = %d, want 2, the end of the baseline", end)
	}
}

func TestItemFeedRestartTakesANewBaseline(t *testing.T) {
	f := newTestFeed(t, itemFeed, FeedConfig{Items: "/items", ID: "/id"}, replay.Limits{})
	r := f.source.(*stubReader)
	a, _ := f.subscribe(0)
	ready := a.ready
	answer(f, `{"items":[{"id":"a"}]}`)
	if !isDone(ready) {
		t.Fatal("not ready after the first poll")
	}
	f.unsubscribe()
	waitUntil(t, "the reader stopped after the linger", func() bool { _, e, _ := r.counts(); return e == 1 })

	a, _ = f.subscribe(0)
	ready = a.ready
	defer f.unsubscribe()
	if ready == nil || isDone(ready) {
		t.Fatal("a restarted item feed is ready before its new first poll")
	}
	answer(f, "") // the upstream answered with an unchanged document
	if !isDone(ready) {
		t.Fatal("an unchanged first poll did not make the feed ready")
	}
}

// waitUntil waits up to 5s for cond.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("not within 5s: %s", what)
		}
	}
}

func TestSubscribeStartsAndLingerStops(t *testing.T) {
	f := newTestFeed(t, tailFeed, FeedConfig{}, replay.Limits{})
	r := f.source.(*stubReader)
	runs := func(starts, ends int) func() bool {
		return func() bool { s, e, _ := r.counts(); return s == starts && e == ends }
	}

	for range 3 {
		if _, ok := f.subscribe(0); !ok {
			t.Fatal("subscribe refused")
		}
	}
	waitUntil(t, "one reader started", runs(1, 0))
	f.unsubscribe()
	f.unsubscribe()
	f.subscribe(0) // back to two before the linger ends
	f.unsubscribe()
	time.Sleep(20 * time.Millisecond)
	if s, e, _ := r.counts(); s != 1 || e != 0 {
		t.Fatalf("with a subscriber left: %d starts, %d ends; want 1, 0", s, e)
	}
	f.unsubscribe()
	waitUntil(t, "the reader stopped after the linger", runs(1, 1))

	// A new subscriber starts it again; so does a quick leave and return.
	f.subscribe(0)
	f.unsubscribe()
	f.subscribe(0)
	waitUntil(t, "the reader started again", func() bool { s, _, _ := r.counts(); return s >= 2 })
	f.unsubscribe()
	waitUntil(t, "every reader stopped", func() bool { s, e, _ := r.counts(); return s == e })
	if _, _, overlap := r.counts(); overlap {
		t.Error("two runs of the source overlapped")
	}
}

func TestMaxSubscribers(t *testing.T) {
	f := newTestFeed(t, tailFeed, FeedConfig{}, replay.Limits{})
	for i := range 2 {
		if _, ok := f.subscribe(2); !ok {
			t.Fatalf("subscriber %d refused under the limit", i+1)
		}
	}
	if _, ok := f.subscribe(2); ok {
		t.Fatal("a third subscriber accepted with a limit of 2")
	}
	f.unsubscribe()
	if _, ok := f.subscribe(2); !ok {
		t.Fatal("a subscriber refused after one left")
	}
	if _, ok := f.subscribe(0); !ok {
		t.Fatal("a limit of 0 refused a subscriber")
	}
	f.unsubscribe()
	f.unsubscribe()
	f.unsubscribe()
}

func TestDestruct(t *testing.T) {
	f := newTestFeed(t, tailFeed, FeedConfig{}, replay.Limits{})
	r := f.source.(*stubReader)
	f.subscribe(0)
	waitUntil(t, "the reader started", func() bool { s, _, _ := r.counts(); return s == 1 })
	_, _, _, wake, err := f.log.Read(f.log.Next(), nil, 1, 1)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Destruct(); err != nil {
		t.Fatal(err)
	}
	if !isDone(wake) {
		t.Fatal("Destruct did not wake the log's readers")
	}
	if _, _, _, _, err := f.log.Read(0, nil, 1, 1); !errors.Is(err, replay.ErrClosed) {
		t.Errorf("Read after Destruct: %v, want ErrClosed", err)
	}
	waitUntil(t, "the reader stopped", func() bool { _, e, _ := r.counts(); return e == 1 })
	if _, ok := f.subscribe(0); ok {
		t.Error("a destructed feed accepted a subscriber")
	}
	f.unsubscribe() // the subscriber still streaming leaves
	if err := f.Destruct(); err != nil {
		t.Errorf("second Destruct: %v", err)
	}
}

// restartedFeed returns a poll feed of kind that has published doc, run its
// reader, stopped it after the linger, and started it again for a new
// subscriber, whose admission it returns.
func restartedFeed(t *testing.T, kind feedKind, readyWait time.Duration, doc string) (*feed, admission) {
	t.Helper()
	c := FeedConfig{ID: "/id"}
	if kind == itemFeed {
		c.Items = "/items"
	}
	m, err := c.mapping()
	require.NoError(t, err)
	f := buildTestFeed(t, feedParts{
		kind: kind, source: &stubReader{}, mapping: m, log: replay.New(replay.Limits{}),
		linger: time.Millisecond, readyWait: readyWait, logger: zap.NewNop(),
	})
	r := f.source.(*stubReader)
	f.subscribe(0)
	answer(f, doc)
	f.unsubscribe()
	waitUntil(t, "the reader stopped after the linger", func() bool { _, e, _ := r.counts(); return e == 1 })
	a, _ := f.subscribe(0)
	t.Cleanup(f.unsubscribe)
	return f, a
}

func TestRestartedDocumentFeedWaitsForAFreshDocument(t *testing.T) {
	f, a := restartedFeed(t, documentFeed, time.Hour, `{"v":"old"}`)
	_, wait := f.join(a, "", 1)
	require.NotNil(t, wait, "a restarted document feed hands out its old document at once")
	answer(f, `{"v":"new"}`)
	pos, wait := f.join(a, "", 1)
	require.Nil(t, wait)
	events, _ := eventsFrom(t, f, pos.cursor)
	require.Equal(t, []string{`{"v":"new"}`}, dataOf(events))
}

func TestRestartedDocumentFeedFallsBackToTheRetainedDocument(t *testing.T) {
	f, a := restartedFeed(t, documentFeed, 10*time.Millisecond, `{"v":"old"}`)
	_, wait := f.join(a, "", 1)
	require.NotNil(t, wait)
	<-wait // the upstream did not answer within readyWait
	pos, wait := f.join(a, "", 1)
	require.Nil(t, wait)
	events, _ := eventsFrom(t, f, pos.cursor)
	require.Equal(t, []string{`{"v":"old"}`}, dataOf(events))
}

func TestResumingWithARetainedIDDoesNotWaitForTheUpstream(t *testing.T) {
	f, a := restartedFeed(t, itemFeed, 0, `{"items":[{"id":"a"},{"id":"b"},{"id":"c"}]}`)
	_, wait := f.join(a, "", 0)
	require.NotNil(t, wait, "news waits for the restart's baseline")
	pos, wait := f.join(a, "a", 0)
	require.Nil(t, wait, "a retained id waits for the upstream")
	require.False(t, pos.reset)
	events, _ := eventsFrom(t, f, pos.cursor)
	require.Equal(t, []string{`{"id":"b"}`, `{"id":"c"}`}, dataOf(events))
	// An unknown id owes a reset and gets every retained event, at once too.
	pos, wait = f.join(a, "gone", 0)
	require.Nil(t, wait)
	require.True(t, pos.reset)
	events, _ = eventsFrom(t, f, pos.cursor)
	require.Len(t, events, 3)
}

func TestJoinAfterABurstEvictedTheSubscribersPlaceIsEvicted(t *testing.T) {
	f := newTestFeed(t, tailFeed, FeedConfig{}, replay.Limits{Count: 3})
	a, ok := f.subscribe(0)
	require.True(t, ok)
	t.Cleanup(f.unsubscribe)
	// Published after the subscriber arrived, before it took its place:
	// the first seven are lost to it, and its first read must say so.
	publish(f, `"1"`, `"2"`, `"3"`, `"4"`, `"5"`, `"6"`, `"7"`, `"8"`, `"9"`, `"10"`)
	pos, wait := f.join(a, "", 0)
	require.Nil(t, wait)
	_, _, _, _, err := f.read(pos.cursor, nil)
	require.ErrorIs(t, err, replay.ErrEvicted)
}
