package ssefeed

import (
	"bufio"
	"bytes"
	"cmp"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"golang.org/x/net/http/httpguts"

	"github.com/ssefeed/caddy-ssefeed/internal/ssetest"
)

func TestAppendEvent(t *testing.T) {
	for _, tc := range []struct {
		name string
		ev   Event
		want string
	}{
		{"compact json", Event{Data: `{"a":[1,2]}`}, "data: {\"a\":[1,2]}\n\n"},
		{"text lf", Event{Data: "a\nb"}, "data: a\ndata: b\n\n"},
		{"text cr", Event{Data: "a\rb"}, "data: a\ndata: b\n\n"},
		{"text crlf", Event{Data: "a\r\nb"}, "data: a\ndata: b\n\n"},
		{"lf cr is two breaks", Event{Data: "a\n\rb"}, "data: a\ndata: \ndata: b\n\n"},
		{"trailing newline kept", Event{Data: "a\n"}, "data: a\ndata: \n\n"},
		{"trailing cr kept", Event{Data: "a\r"}, "data: a\ndata: \n\n"},
		{"empty data kept", Event{}, "data: \n\n"},
		{"leading space kept", Event{Data: " a"}, "data:  a\n\n"},
		{"invalid utf-8", Event{Data: "a\xffb\xe2\x82"}, "data: a\uFFFDb\uFFFD\uFFFD\n\n"},
		{"valid multibyte", Event{Data: "é€😀"}, "data: é€😀\n\n"},
		{"bom in data is not at stream start", Event{Data: "\uFEFFx"}, "data: \uFEFFx\n\n"},
		{"event and id", Event{ID: "42", Type: "note", Data: "x"}, "event: note\nid: 42\ndata: x\n\n"},
		{"id only", Event{ID: "a b", Data: "x"}, "id: a b\ndata: x\n\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := string(appendEvent([]byte("prefix"), tc.ev))
			if got != "prefix"+tc.want {
				t.Errorf("appendEvent(%#v) = %q, want %q", tc.ev, got, "prefix"+tc.want)
			}
			if id := string(frameID([]byte(tc.want))); id != tc.ev.ID {
				t.Errorf("frameID(%q) = %q, want %q", tc.want, id, tc.ev.ID)
			}
		})
	}
}

func TestAppendData(t *testing.T) {
	for _, tc := range []struct{ data, want string }{
		{"", "data: \n"},
		{"\n", "data: \ndata: \n"},
		{"\r\n\r\n", "data: \ndata: \ndata: \n"},
		{"x\x00y", "data: x\x00y\n"},
	} {
		if got := string(appendData(nil, tc.data)); got != tc.want {
			t.Errorf("appendData(%q) = %q, want %q", tc.data, got, tc.want)
		}
	}
}

func TestAppendCommentAndRetry(t *testing.T) {
	if got := string(appendComment(nil, "heartbeat")); got != ": heartbeat\n" {
		t.Errorf("appendComment = %q", got)
	}
	for _, tc := range []struct {
		d    time.Duration
		want string
	}{
		{3 * time.Second, "retry: 3000\n"},
		{1500 * time.Microsecond, "retry: 1\n"},
		{0, "retry: 0\n"},
	} {
		if got := string(appendRetry(nil, tc.d)); got != tc.want {
			t.Errorf("appendRetry(%v) = %q, want %q", tc.d, got, tc.want)
		}
	}
}

func TestValidID(t *testing.T) {
	for _, tc := range []struct {
		id   string
		want bool
	}{
		{"", false},
		{"1", true},
		{"a b:c", true},
		{"é", true},
		{strings.Repeat("x", 128), true},
		{strings.Repeat("x", 129), false},
		{strings.Repeat("é", 64), true},
		{strings.Repeat("é", 64) + "x", false},
		{"a\rb", false},
		{"a\nb", false},
		{"a\x00b", false},
		{"a\xffb", false},
		{"a\x01b", false},
		{"a\x1bb", false},
		{"a\x1fb", false},
		{"a\x7fb", false},
		{"a\tb", false},
		{"a\u0080b", true}, // C1 controls pass net/http and browsers
		{" a", false},
		{"a ", false},
		{"\ta", false},
		{"a\t", false},
		{" ", false},
		{"   ", false},
		{"\u00a0", false},
		{"\u3000a", false},
		{"a\u00a0", false},
		{"a\u00a0b", true},
		{"a\ufffdb", false}, // what invalid UTF-8 from upstream decodes to
		{"\ufeffa", true},
	} {
		if got := validID(tc.id); got != tc.want {
			t.Errorf("validID(%q) = %v, want %v", tc.id, got, tc.want)
		}
	}
}

func TestValidEventType(t *testing.T) {
	for _, tc := range []struct {
		name string
		want bool
	}{
		{"", true},
		{"update", true},
		{strings.Repeat("x", 1000), true},
		{"a\x00b", true},
		{"a\rb", false},
		{"a\nb", false},
		{"a\xffb", false},
	} {
		if got := validEventType(tc.name); got != tc.want {
			t.Errorf("validEventType(%q) = %v, want %v", tc.name, got, tc.want)
		}
	}
}

// normalisedData is what a client receives for data: line breaks become LF
// and each invalid UTF-8 byte becomes U+FFFD.
func normalisedData(data string) string {
	data = strings.ReplaceAll(data, "\r\n", "\n")
	data = strings.ReplaceAll(data, "\r", "\n")
	return string([]rune(data))
}

func FuzzEncoder(f *testing.F) {
	f.Add("1", "", "")
	f.Add("", "note", "a\nb\rc\r\nd")
	f.Add("x y", " spaced", " leading space\n")
	f.Add("é", "\uFEFF", "\uFEFFdata: x\n\nid: 2\n\n")
	f.Add(strings.Repeat("9", 128), "message", "\xff\xe2\x82\x00")
	f.Add("a", "data", "\r\r\n\n\r")
	f.Fuzz(func(t *testing.T, id, typ, data string) {
		if id != "" && !validID(id) || !validEventType(typ) {
			t.Skip("production code never writes this id or type")
		}
		out := appendEvent(nil, Event{ID: id, Type: typ, Data: data})
		out = appendEvent(out, Event{Data: "end"})
		if !utf8.Valid(out) {
			t.Fatalf("output is not UTF-8: %q", out)
		}
		if bytes.HasPrefix(out, []byte("\uFEFF")) {
			t.Fatalf("output starts with a BOM: %q", out)
		}

		r := ssetest.NewReader(bytes.NewReader(out))
		got, err := r.NextEvent()
		if err != nil {
			t.Fatalf("parsing %q: %v", out, err)
		}
		want := ssetest.Event{Type: typ, Data: normalisedData(data), LastEventID: id, HasIDField: id != ""}
		if want.Type == "" {
			want.Type = "message"
		}
		if got != want {
			t.Fatalf("encoded %q\nparsed %#v\nwant   %#v", out, got, want)
		}
		if got := string(frameID(out)); got != id {
			t.Fatalf("frameID(%q) = %q, want %q", out, got, id)
		}
		end, err := r.NextEvent()
		if err != nil || end.Data != "end" || end.Type != "message" {
			t.Fatalf("second event = %#v, %v; the first leaked into it: %q", end, err, out)
		}
		if _, err := r.Next(); !errors.Is(err, io.EOF) {
			t.Fatalf("after the second event: %v, want EOF", err)
		}
	})
}

// FuzzValidID checks that every id validID accepts comes back unchanged
// from a client: net/http accepts it as a header value, and a request
// carrying it in Last-Event-ID, written and read as HTTP/1.1 (which trims
// header values), yields the same id.
func FuzzValidID(f *testing.F) {
	for _, id := range []string{"1", "a b", " a", "a ", "\t", "a\x01", "a\x7f", "\u00a0", "a\ufffd", "é€😀"} {
		f.Add(id)
	}
	f.Fuzz(func(t *testing.T, id string) {
		if !validID(id) {
			t.Skip("validID refuses this id")
		}
		if !httpguts.ValidHeaderFieldValue(id) {
			t.Fatalf("validID(%q) but net/http refuses it as a header value", id)
		}
		req := httptest.NewRequest(http.MethodGet, "/events", nil)
		req.Header.Set("Last-Event-ID", id)
		var wire bytes.Buffer
		if err := req.Write(&wire); err != nil {
			t.Fatal(err)
		}
		back, err := http.ReadRequest(bufio.NewReader(&wire))
		if err != nil {
			t.Fatalf("reading back a request with Last-Event-ID %q: %v", id, err)
		}
		if got := lastEventID(back); got != id {
			t.Fatalf("validID(%q) but the server reads back %q", id, got)
		}
	})
}

func TestAppendReset(t *testing.T) {
	long := strings.Repeat("x", maxIDLength)
	for _, tc := range []struct {
		name, id, want string
	}{
		{"plain", "42", `{"last_event_id":"42"}`},
		{"html kept", "<a href='x'>&", `{"last_event_id":"<a href='x'>&"}`},
		{"quote and backslash", `a"b\c`, `{"last_event_id":"a\"b\\c"}`},
		{"control characters", "a\x01\r\n", `{"last_event_id":"a\u0001\r\n"}`},
		{"invalid utf-8", "a\xffb", `{"last_event_id":"a\ufffdb"}`},
		{"longest issued id", long, `{"last_event_id":"` + long + `"}`},
		{"longer id cut", long + "yz", `{"last_event_id":"` + long + `"}`},
		{"cut before a split rune", "x" + strings.Repeat("é", maxIDLength), `{"last_event_id":"x` + strings.Repeat("é", maxIDLength/2-1) + `"}`},
		{"cut after a whole rune", strings.Repeat("é", maxIDLength), `{"last_event_id":"` + strings.Repeat("é", maxIDLength/2) + `"}`},
		{"many angle brackets", strings.Repeat("<", 15000), `{"last_event_id":"` + strings.Repeat("<", maxIDLength) + `"}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := string(appendReset([]byte("prefix"), "reset", tc.id))
			want := "prefixevent: reset\ndata: " + tc.want + "\n\n"
			if got != want {
				t.Errorf("appendReset(%q) =\n%q, want\n%q", tc.id, got, want)
			}
		})
	}
}

// FuzzAppendReset checks that the reset event is one event of the given
// type whose data is a small JSON object echoing a prefix of the id.
func FuzzAppendReset(f *testing.F) {
	f.Add("reset", "42")
	f.Add("reset", strings.Repeat("<", 200))
	f.Add("gone", strings.Repeat("é", 100)+"\xff")
	f.Add("", "a\x00\u2028\r\n")
	f.Fuzz(func(t *testing.T, name, id string) {
		if !validEventType(name) {
			t.Skip("the config refuses this event name")
		}
		out := appendReset(nil, name, id)
		r := ssetest.NewReader(bytes.NewReader(out))
		ev, err := r.NextEvent()
		if err != nil {
			t.Fatalf("parsing %q: %v", out, err)
		}
		if _, err := r.Next(); !errors.Is(err, io.EOF) {
			t.Fatalf("more than one event in %q", out)
		}
		if want := cmp.Or(name, "message"); ev.Type != want || ev.HasIDField {
			t.Fatalf("event %#v, want type %q and no id", ev, want)
		}
		if len(ev.Data) > len(`{"last_event_id":""}`)+6*maxIDLength {
			t.Fatalf("data of %d bytes for an id of %d", len(ev.Data), len(id))
		}
		var data map[string]string
		if err := json.Unmarshal([]byte(ev.Data), &data); err != nil || len(data) != 1 {
			t.Fatalf("data %q is not a JSON object with one string: %v", ev.Data, err)
		}
		echoed, ok := data["last_event_id"]
		if !ok {
			t.Fatalf("data %q has no last_event_id", ev.Data)
		}
		// Invalid UTF-8 arrives as one U+FFFD per byte, as string([]rune(s)) gives.
		if len(id) <= maxIDLength {
			if want := string([]rune(id)); echoed != want {
				t.Fatalf("echoed %q, want %q", echoed, want)
			}
			return
		}
		for cut := maxIDLength; cut > maxIDLength-utf8.UTFMax; cut-- {
			if echoed == string([]rune(id[:cut])) {
				return
			}
		}
		t.Fatalf("echoed %q is not the first %d bytes of the id", echoed, maxIDLength)
	})
}
