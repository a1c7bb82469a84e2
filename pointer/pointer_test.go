package pointer

import (
	"encoding/json"
	"slices"
	"testing"
)

// rfcDoc is the example document of RFC 6901, section 5.
const rfcDoc = `{
	"foo": ["bar", "baz"],
	"": 0,
	"a/b": 1,
	"c%d": 2,
	"e^f": 3,
	"g|h": 4,
	"i\\j": 5,
	"k\"l": 6,
	" ": 7,
	"m~n": 8
}`

func TestFind(t *testing.T) {
	arrays := `{"a": [10, {"b": [true]}, "x"], "n": null, "s": "str", "o": {"1": "one"}}`
	for _, tc := range []struct {
		doc, pointer string
		want         string // "" with found false: absent
		found        bool
	}{
		// RFC 6901, section 5.
		{rfcDoc, "/foo", `["bar", "baz"]`, true},
		{rfcDoc, "/foo/0", `"bar"`, true},
		{rfcDoc, "/", `0`, true},
		{rfcDoc, "/a~1b", `1`, true},
		{rfcDoc, "/c%d", `2`, true},
		{rfcDoc, "/e^f", `3`, true},
		{rfcDoc, "/g|h", `4`, true},
		{rfcDoc, "/i\\j", `5`, true},
		{rfcDoc, "/k\"l", `6`, true},
		{rfcDoc, "/ ", `7`, true},
		{rfcDoc, "/m~0n", `8`, true},

		{arrays, "/a/1/b/0", `true`, true},
		{arrays, "/a/2", `"x"`, true},
		{arrays, "/a/3", "", false},
		{arrays, "/a/-", "", false},
		{arrays, "/a/01", "", false},
		{arrays, "/a/+1", "", false},
		{arrays, "/a/-0", "", false},
		{arrays, "/a/-1", "", false},
		{arrays, "/a/99999999999999999999", "", false},
		{arrays, "/a/ 1", "", false},
		{arrays, "/o/1", `"one"`, true},
		{arrays, "/n", `null`, true},
		{arrays, "/n/x", "", false},
		{arrays, "/s/0", "", false},
		{arrays, "/missing", "", false},
		{arrays, "/A", "", false},
		{` [1] `, "/0", `1`, true},
		{` "x" `, "", `"x"`, true},
	} {
		p, err := Parse(tc.pointer)
		if err != nil {
			t.Fatalf("Parse(%q): %v", tc.pointer, err)
		}
		got, found := p.Find(json.RawMessage(tc.doc))
		if found != tc.found || string(got) != tc.want {
			t.Errorf("Find(%q) = %q, %v; want %q, %v", tc.pointer, got, found, tc.want, tc.found)
		}
	}
}

func TestFindWholeDocument(t *testing.T) {
	p, err := Parse("")
	if err != nil {
		t.Fatal(err)
	}
	got, found := p.Find(json.RawMessage(rfcDoc))
	if !found || string(got) != rfcDoc {
		t.Fatalf(`Find("") = %q, %v; want the whole document`, got, found)
	}
}

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Pointer // nil: an error
	}{
		{"", Pointer{}},
		{"/", Pointer{""}},
		{"//", Pointer{"", ""}},
		{"/a~1b", Pointer{"a/b"}},
		{"/m~0n", Pointer{"m~n"}},
		{"/~01", Pointer{"~1"}},
		{"/~10", Pointer{"/0"}},
		{"/a/0/-", Pointer{"a", "0", "-"}},
		{"a", nil},
		{"#/a", nil},
		{" /a", nil},
		{"/~", nil},
		{"/~2", nil},
		{"/a~", nil},
		{"/~a", nil},
	} {
		got, err := Parse(tc.in)
		if tc.want == nil {
			if err == nil {
				t.Errorf("Parse(%q) = %q, want an error", tc.in, got)
			}
			continue
		}
		if err != nil || !slices.Equal(got, tc.want) {
			t.Errorf("Parse(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
		if s := got.String(); s != tc.in {
			t.Errorf("Parse(%q).String() = %q", tc.in, s)
		}
	}
}

func TestString(t *testing.T) {
	for _, tc := range []struct {
		p    Pointer
		want string
	}{
		{Pointer{}, ""},
		{nil, ""},
		{Pointer{""}, "/"},
		{Pointer{"a/b", "m~n"}, "/a~1b/m~0n"},
		{Pointer{"~1"}, "/~01"},
	} {
		if got := tc.p.String(); got != tc.want {
			t.Errorf("%q.String() = %q, want %q", tc.p, got, tc.want)
		}
	}
}

func FuzzPointer(f *testing.F) {
	f.Add("/foo/0", rfcDoc)
	f.Add("/a~1b", rfcDoc)
	f.Add("/ ", rfcDoc)
	f.Add("", `[1, 2]`)
	f.Add("/0/x", `[{"x": {"y": 1}}]`)
	f.Add("/~0~1/-", `{"~/": []}`)
	f.Add("/a", `{"a": `)
	f.Add("/a/1", "\xff[")
	f.Fuzz(func(t *testing.T, s, doc string) {
		p, err := Parse(s)
		if err != nil {
			return
		}
		if again, err := Parse(p.String()); err != nil || !slices.Equal(again, p) {
			t.Fatalf("Parse(%q).String() = %q, which parses to %q, %v", s, p.String(), again, err)
		}
		v, found := p.Find(json.RawMessage(doc))
		if found && json.Valid([]byte(doc)) && !json.Valid(v) {
			t.Fatalf("Find(%q) in valid %q = %q, not valid JSON", s, doc, v)
		}
	})
}
