package ssetest

import (
	"errors"
	"fmt"
	"io"
	"reflect"
	"strings"
	"testing"
	"time"
)

// readAll returns every item of stream and fails unless it ends in io.EOF.
func readAll(t *testing.T, stream string) []Item {
	t.Helper()
	r := NewReader(strings.NewReader(stream))
	var items []Item
	for {
		item, err := r.Next()
		if errors.Is(err, io.EOF) {
			return items
		}
		if err != nil {
			t.Fatalf("Next: %v", err)
		}
		items = append(items, item)
	}
}

func event(typ, data, lastID string, hasID bool) Item {
	return Item{Retry: -1, Event: &Event{Type: typ, Data: data, LastEventID: lastID, HasIDField: hasID}}
}

func message(data string) Item { return event("message", data, "", false) }

func comment(text string) Item { return Item{Comment: text, IsComment: true, Retry: -1} }

func TestReader(t *testing.T) {
	for _, tc := range []struct {
		name   string
		stream string
		want   []Item
	}{
		// The examples of the WHATWG HTML standard, section 9.2.
		{"stock ticker", "data: YHOO\ndata: +2\ndata: 10\n\n", []Item{message("YHOO\n+2\n10")}},
		{
			"comment and ids", ": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n\n",
			[]Item{comment("test stream"), event("message", "first event", "1", true), event("message", "second event", "", true), message(" third event")},
		},
		{"data without colon", "data\n\ndata\ndata\n\ndata:", []Item{message(""), message("\n")}},
		{"one space stripped", "data:test\n\ndata: test\n\n", []Item{message("test"), message("test")}},

		{"only one leading space stripped", "data:  two\n\n", []Item{message(" two")}},
		{"field without colon resets type", "event: x\nevent\ndata: a\n\n", []Item{message("a")}},
		{"event type", "event: add\ndata: 1\n\n", []Item{event("add", "1", "", false)}},
		{"unknown field ignored", "foo: bar\ndata: a\n\n", []Item{message("a")}},
		{"colon in value", "data: a: b\n\n", []Item{message("a: b")}},
		{"empty comment", ":\n", []Item{comment("")}},
		{"id with nul ignored", "id: 1\ndata: a\n\nid: x\x00y\ndata: b\n\n", []Item{event("message", "a", "1", true), event("message", "b", "1", false)}},
		{"id kept across events", "id: 7\ndata: a\n\ndata: b\n\n", []Item{event("message", "a", "7", true), event("message", "b", "7", false)}},
		{"id without data sets last id", "id: 5\n\ndata: z\n\n", []Item{event("message", "z", "5", false)}},
		{"retry digits", "retry: 1500\n", []Item{{Retry: 1500}}},
		{"retry zero", "retry:0\n", []Item{{Retry: 0}}},
		{"retry not digits", "retry: 1.5\nretry: -1\nretry: 10a\nretry:  10\nretry: \n", nil},
		{"bom at start", "\uFEFFdata: a\n\n", []Item{message("a")}},
		{"only one bom stripped", "\uFEFF\uFEFFdata: a\n\n", nil},
		{"bom later is data", "data: a\n\n\uFEFFdata: b\n\ndata: \uFEFFc\n\n", []Item{message("a"), message("\uFEFFc")}},
		{"cr line ends", "data: a\rdata: b\r\r", []Item{message("a\nb")}},
		{"crlf line ends", "data: a\r\ndata: b\r\n\r\n", []Item{message("a\nb")}},
		{"mixed line ends", "data: a\rdata: b\r\n\ndata: c\n\r", []Item{message("a\nb"), message("c")}},
		{"lf cr is two line ends", "data: a\n\rdata: b\n\n", []Item{message("a"), message("b")}},
		{"unterminated last event discarded", "data: a\n\ndata: b\n", []Item{message("a")}},
		{"unterminated last line discarded", "data: a\n\ndata: b", []Item{message("a")}},
		{"empty data buffer not dispatched", "event: x\n\n\n\ndata: y\n\n", []Item{message("y")}},
		{"empty data dispatched", "data:\n\n", []Item{message("")}},
		{"invalid utf-8 replaced", "data: a\xffb\n\n", []Item{message("a\uFFFDb")}},
		// The UTF-8 decode of the Encoding standard: one U+FFFD per
		// maximal subpart of an invalid sequence.
		{"each invalid byte replaced", "data: \xff\xfe\x80\n\n", []Item{message("\uFFFD\uFFFD\uFFFD")}},
		{"truncated sequence is one subpart", "data: \xe2\x82A\xf0\x9f\x98\n\n", []Item{message("\uFFFDA\uFFFD")}},
		{"surrogate and overlong bytes each replaced", "data: \xed\xa0\x80\xc0\xaf\n\n", []Item{message("\uFFFD\uFFFD\uFFFD\uFFFD\uFFFD")}},
		{"nul in data kept", "data: a\x00b\n\n", []Item{message("a\x00b")}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := readAll(t, tc.stream); !reflect.DeepEqual(got, tc.want) {
				t.Errorf("items of %q:\n got  %s\n want %s", tc.stream, describe(got), describe(tc.want))
			}
		})
	}
}

func TestNextEventSkipsCommentsAndRetry(t *testing.T) {
	r := NewReader(strings.NewReader(": hi\nretry: 10\n\nevent: e\ndata: x\n\n"))
	ev, err := r.NextEvent()
	if err != nil || ev != (Event{Type: "e", Data: "x"}) {
		t.Fatalf("NextEvent = %+v, %v", ev, err)
	}
	if _, err := r.NextEvent(); !errors.Is(err, io.EOF) {
		t.Fatalf("NextEvent at the end = %v, want EOF", err)
	}
}

// describe prints items with their events, which %v shows as pointers.
func describe(items []Item) string {
	var b strings.Builder
	for _, item := range items {
		if item.Event != nil {
			fmt.Fprintf(&b, "%#v ", *item.Event)
		} else {
			fmt.Fprintf(&b, "%#v ", item)
		}
	}
	return b.String()
}

func TestReaderDispatchesOnCRWithoutWaiting(t *testing.T) {
	pr, pw := io.Pipe()
	defer pw.Close()
	events := make(chan Event)
	go func() {
		r := NewReader(pr)
		for {
			ev, err := r.NextEvent()
			if err != nil {
				close(events)
				return
			}
			events <- ev
		}
	}()
	for _, step := range []struct{ write, want string }{
		// The event ends with the second CR; the LF that may follow it
		// belongs to that CR and must not end the next event early.
		{"data: a\r\r", "a"},
		{"\ndata: b\r", ""},
		{"\ndata: c\r\n\r", "b\nc"},
	} {
		if _, err := io.WriteString(pw, step.write); err != nil {
			t.Fatal(err)
		}
		if step.want == "" {
			continue
		}
		select {
		case ev := <-events:
			if ev.Data != step.want {
				t.Fatalf("after %q: data %q, want %q", step.write, ev.Data, step.want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("after %q: no event within 5s; the reader waits for the byte after a CR", step.write)
		}
	}
}
