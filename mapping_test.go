package ssefeed

import (
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"testing"
	"unicode/utf8"
)

// testMapping builds a mapping from options as the config does.
func testMapping(t testing.TB, h FeedConfig) mapping {
	t.Helper()
	m, err := h.mapping()
	if err != nil {
		t.Fatalf("mapping(%+v): %v", h, err)
	}
	return m
}

func TestMappingElements(t *testing.T) {
	for _, tc := range []struct {
		name  string
		h     FeedConfig
		doc   string
		want  []string
		noArr bool
	}{
		{"oldest first", FeedConfig{Items: "/items"}, `{"items": [{"n":1}, {"n":2}, 3]}`, []string{`{"n":1}`, `{"n":2}`, `3`}, false},
		{"newest first", FeedConfig{Items: "/items", Order: "newest_first"}, `{"items": [1, 2, 3]}`, []string{`3`, `2`, `1`}, false},
		{"nested", FeedConfig{Items: "/data/list"}, `{"data": {"list": ["a"]}}`, []string{`"a"`}, false},
		{"raw bytes kept", FeedConfig{Items: "/items"}, `{"items": [ {"b": 1,  "a": 2} ]}`, []string{`{"b": 1,  "a": 2}`}, false},
		{"empty array", FeedConfig{Items: "/items"}, `{"items": []}`, nil, false},
		{"missing", FeedConfig{Items: "/items"}, `{"other": []}`, nil, true},
		{"object", FeedConfig{Items: "/items"}, `{"items": {"0": 1}}`, nil, true},
		{"string", FeedConfig{Items: "/items"}, `{"items": "[1]"}`, nil, true},
		{"null", FeedConfig{Items: "/items"}, `{"items": null}`, nil, true},
		{"document is an array", FeedConfig{Items: "/items"}, `[1]`, nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := testMapping(t, tc.h)
			elems, err := m.elements(json.RawMessage(tc.doc))
			if tc.noArr {
				if !errors.Is(err, errNoItems) {
					t.Fatalf("elements = %q, %v; want errNoItems", elems, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, e := range elems {
				got = append(got, string(e))
			}
			if !slices.Equal(got, tc.want) {
				t.Fatalf("elements = %q, want %q", got, tc.want)
			}
		})
	}
}

func TestMappingToEvent(t *testing.T) {
	for _, tc := range []struct {
		name      string
		h         FeedConfig
		elem      string
		byContent bool
		want      Event
		key       string // "sum" for any content key
	}{
		{"id string", FeedConfig{ID: "/id"}, `{"id": "a1"}`, false, Event{ID: "a1", Data: `{"id":"a1"}`}, "id:a1"},
		{"id escaped string", FeedConfig{ID: "/id"}, `{"id": "\u00e9"}`, false, Event{ID: "é", Data: `{"id":"\u00e9"}`}, "id:é"},
		{"id number", FeedConfig{ID: "/id"}, `{"id": 42}`, true, Event{ID: "42", Data: `{"id":42}`}, "id:42"},
		{"id number kept as written", FeedConfig{ID: "/id"}, `{"id": 1.5e3}`, false, Event{ID: "1.5e3", Data: `{"id":1.5e3}`}, "id:1.5e3"},
		{"id object ignored", FeedConfig{ID: "/id"}, `{"id": {}}`, false, Event{Data: `{"id":{}}`}, ""},
		{"id null by content", FeedConfig{ID: "/id"}, `{"id": null}`, true, Event{Data: `{"id":null}`}, "sum"},
		{"id missing", FeedConfig{ID: "/id"}, `{}`, false, Event{Data: `{}`}, ""},
		{"id missing by content", FeedConfig{ID: "/id"}, `{}`, true, Event{Data: `{}`}, "sum"},
		{"no id by content", FeedConfig{}, `[1]`, true, Event{Data: `[1]`}, "sum"},
		{"type pointer", FeedConfig{Type: "/k"}, `{"k": "note"}`, false, Event{Type: "note", Data: `{"k":"note"}`}, ""},
		{"type pointer over event", FeedConfig{Type: "/k", Event: "fixed"}, `{"k": "note"}`, false, Event{Type: "note", Data: `{"k":"note"}`}, ""},
		{"type missing falls back to event", FeedConfig{Type: "/k", Event: "fixed"}, `{}`, false, Event{Type: "fixed", Data: `{}`}, ""},
		{"type null falls back to event", FeedConfig{Type: "/k", Event: "fixed"}, `{"k": null}`, false, Event{Type: "fixed", Data: `{"k":null}`}, ""},
		{"fixed event", FeedConfig{Event: "fixed"}, `1`, false, Event{Type: "fixed", Data: `1`}, ""},
		{"data string is text", FeedConfig{Data: "/d"}, `{"d": "a\nb\r\n\"c\""}`, false, Event{Data: "a\nb\r\n\"c\""}, ""},
		{"data object compact in order", FeedConfig{Data: "/d"}, `{"d": { "z": 1, "a" : [1, 2] }}`, false, Event{Data: `{"z":1,"a":[1,2]}`}, ""},
		{"data number", FeedConfig{Data: "/d"}, `{"d": 3}`, false, Event{Data: `3`}, ""},
		{"data null", FeedConfig{Data: "/d"}, `{"d": null}`, false, Event{Data: `null`}, ""},
		{"data html kept", FeedConfig{}, `{"h": "<a>&"}`, false, Event{Data: `{"h":"<a>&"}`}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := testMapping(t, tc.h)
			ev, key, err := m.toEvent(json.RawMessage(tc.elem), tc.byContent)
			if err != nil {
				t.Fatal(err)
			}
			if ev != tc.want {
				t.Errorf("event = %#v, want %#v", ev, tc.want)
			}
			if tc.key == "sum" && !strings.HasPrefix(key, "sum:") || tc.key != "sum" && key != tc.key {
				t.Errorf("key = %q, want %q", key, tc.key)
			}
		})
	}
}

func TestMappingMissingData(t *testing.T) {
	m := testMapping(t, FeedConfig{Data: "/payload"})
	_, _, err := m.toEvent(json.RawMessage(`{"other": 1}`), false)
	if err == nil || !strings.Contains(err.Error(), `"/payload"`) {
		t.Fatalf("toEvent with no data = %v, want an error naming the pointer", err)
	}
}

func TestMappingKeys(t *testing.T) {
	for _, tc := range []struct {
		name string
		h    FeedConfig
		a, b string
		same bool
	}{
		{"equal elements", FeedConfig{}, `{"a":1}`, `{"a":1}`, true},
		{"only white space differs", FeedConfig{}, `{"a":1}`, `{ "a" : 1 }`, true},
		{"different elements", FeedConfig{}, `{"a":1}`, `{"a":2}`, false},
		{"same id, other content", FeedConfig{ID: "/id"}, `{"id":"x","v":1}`, `{"id":"x","v":2}`, true},
		{"same id escaped otherwise", FeedConfig{ID: "/id"}, `{"id":"\u00e9"}`, `{"id":"é"}`, true},
		{"number and string id", FeedConfig{ID: "/id"}, `{"id":1}`, `{"id":"1"}`, true},
		{"different ids", FeedConfig{ID: "/id"}, `{"id":"x"}`, `{"id":"y"}`, false},
		{"different invalid utf-8 ids", FeedConfig{ID: "/id"}, "{\"id\":\"\xff\"}", "{\"id\":\"\xfe\"}", false},
		{"different lone surrogates", FeedConfig{ID: "/id"}, `{"id":"\ud800"}`, `{"id":"\udc00"}`, false},
		{"invalid utf-8 and U+FFFD", FeedConfig{ID: "/id"}, "{\"id\":\"\xff\"}", `{"id":"\ufffd"}`, false},
		{"same invalid utf-8 id", FeedConfig{ID: "/id"}, "{\"id\":\"a\xff\"}", "{\"id\":\"a\xff\"}", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := testMapping(t, tc.h)
			evA, keyA, errA := m.toEvent(json.RawMessage(tc.a), true)
			evB, keyB, errB := m.toEvent(json.RawMessage(tc.b), true)
			if err := errors.Join(errA, errB); err != nil {
				t.Fatal(err)
			}
			if keyA == "" || keyB == "" || (keyA == keyB) != tc.same {
				t.Fatalf("keys %q and %q; want them equal: %v", keyA, keyB, tc.same)
			}
			if !tc.same && evA.ID != "" && evA.ID == evB.ID && validID(evA.ID) {
				t.Errorf("distinct elements would both be sent with id %q", evA.ID)
			}
		})
	}
}

// FuzzMappingKeys checks that two elements share a key only when they have
// the same id, or the same content when they have none, and that distinct
// elements are never sent with the same id.
func FuzzMappingKeys(f *testing.F) {
	f.Add(`{"id":"x","v":1}`, `{"id":"x","v":2}`)
	f.Add("{\"id\":\"\xff\"}", "{\"id\":\"\xfe\"}")
	f.Add(`{"id":"\ud800"}`, `{"id":"\udc00"}`)
	f.Add(`{"id":"\ufffd"}`, "{\"id\":\"\xef\xbf\xbd\"}")
	f.Add(`{"id":1}`, `{"id":"1"}`)
	f.Add(`{"v":1}`, `{ "v" : 1 }`)
	m := testMapping(f, FeedConfig{ID: "/id"})
	f.Fuzz(func(t *testing.T, a, b string) {
		if !json.Valid([]byte(a)) || !json.Valid([]byte(b)) {
			t.Skip("upstream documents are valid JSON")
		}
		evA, keyA, errA := m.toEvent(json.RawMessage(a), true)
		evB, keyB, errB := m.toEvent(json.RawMessage(b), true)
		if errA != nil || errB != nil {
			return
		}
		if keyA == keyB && evA.ID != evB.ID {
			t.Fatalf("ids %q and %q share the key %q", evA.ID, evB.ID, keyA)
		}
		if keyA != keyB && evA.ID != "" && evA.ID == evB.ID && validID(evA.ID) {
			t.Fatalf("%s and %s are distinct elements that would both be sent with id %q", a, b, evA.ID)
		}
	})
}

func FuzzMapping(f *testing.F) {
	f.Add(`{"id": 1, "type": "t", "data": {"x": [1, "a\n"]}}`, "/id", "/type", "/data")
	f.Add(`{"id": "a/b", "~": null}`, "/id", "/~0", "")
	f.Add(`[{"a": [0, 1]}]`, "/0/a/1", "/0", "/0/a")
	f.Add(`"text\r\nmore"`, "", "", "")
	f.Add(`   `, "/x", "", "")
	f.Add(`{"d": "\ud800"}`, "", "", "/d")
	f.Add("\xff{", "/", "/", "/")
	f.Fuzz(func(t *testing.T, elem, id, typ, data string) {
		m, err := (&FeedConfig{Items: "/" + id, ID: id, Type: typ, Data: data}).mapping()
		if err != nil {
			return
		}
		ev, _, err := m.toEvent(json.RawMessage(elem), true)
		// encoding/json decodes strings to UTF-8, and numbers are ASCII.
		if err == nil && json.Valid([]byte(elem)) && !(utf8.ValidString(ev.ID) && utf8.ValidString(ev.Type)) {
			t.Fatalf("event %#v of valid JSON %q has an id or type that is not UTF-8", ev, elem)
		}
		_, _ = m.elements(json.RawMessage(elem))
	})
}
