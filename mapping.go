package ssefeed

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"unicode/utf8"

	"github.com/ssefeed/caddy-ssefeed/pointer"
)

// mapping turns upstream JSON values into events, as the items, id, type,
// event, data and order options say.
type mapping struct {
	items       pointer.Pointer // nil: the whole document is one element
	id          pointer.Pointer // nil: ids are generated
	typ         pointer.Pointer // nil: event is used
	fixedType   string          // used when typ is nil or selects nothing
	data        pointer.Pointer
	newestFirst bool
}

// errNoItems is returned when the items pointer does not select an array.
var errNoItems = errors.New("items pointer does not select an array")

// elements returns the array that the items pointer selects in doc, oldest
// element first.
func (m *mapping) elements(doc json.RawMessage) ([]json.RawMessage, error) {
	v, ok := m.items.Find(doc)
	if !ok || len(v) == 0 || v[0] != '[' {
		return nil, errNoItems
	}
	var elems []json.RawMessage
	if err := json.Unmarshal(v, &elems); err != nil {
		return nil, err
	}
	if m.newestFirst {
		slices.Reverse(elems)
	}
	return elems, nil
}

// toEvent maps one element to an event. The event's ID is the upstream id or
// empty; key recognises the element when it comes again: "id:" and the
// upstream id, or "raw:" and the id's JSON text when the id holds U+FFFD
// (different invalid UTF-8 all decodes to it, and distinct elements must
// not share a key), or, when byContent is set and there is no id, a hash of
// the element's bytes; otherwise it is empty.
func (m *mapping) toEvent(elem json.RawMessage, byContent bool) (ev Event, key string, err error) {
	if m.id != nil {
		if v, ok := m.id.Find(elem); ok {
			ev.ID, _ = scalarText(v)
			switch {
			case strings.ContainsRune(ev.ID, utf8.RuneError):
				key = "raw:" + string(v)
			case ev.ID != "":
				key = "id:" + ev.ID
			}
		}
	}
	if key == "" && byContent {
		// Hash the compact form, so that an upstream that only changes its
		// white space does not make every element new.
		var compact bytes.Buffer
		if json.Compact(&compact, elem) == nil {
			elem = compact.Bytes()
		}
		// The hash is the same in every process, so that the instances of
		// a cluster recognise each other's elements.
		sum := sha256.Sum256(elem)
		key = "sum:" + base64.RawURLEncoding.EncodeToString(sum[:16])
	}
	ev.Type = m.fixedType
	if m.typ != nil {
		if v, ok := m.typ.Find(elem); ok {
			if typ, ok := scalarText(v); ok {
				ev.Type = typ
			}
		}
	}
	data, ok := m.data.Find(elem)
	if !ok || len(data) == 0 {
		return ev, key, fmt.Errorf("data pointer %q selects nothing", m.data.String())
	}
	if data[0] == '"' {
		err = json.Unmarshal(data, &ev.Data)
	} else {
		var buf bytes.Buffer
		err = json.Compact(&buf, data)
		ev.Data = buf.String()
	}
	return ev, key, err
}

// scalarText returns the text of a JSON string, number or boolean, and
// false for null, objects and arrays.
func scalarText(v json.RawMessage) (string, bool) {
	switch {
	case len(v) == 0:
		return "", false
	case v[0] == '"':
		var s string
		return s, json.Unmarshal(v, &s) == nil
	case v[0] == '{', v[0] == '[', string(v) == "null":
		return "", false
	default:
		return string(v), true
	}
}
