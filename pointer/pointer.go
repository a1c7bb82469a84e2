// Package pointer evaluates RFC 6901 JSON Pointers on raw JSON, returning the
// selected value's original bytes.
package pointer

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
)

// Pointer is a parsed JSON Pointer: the reference tokens, unescaped.
type Pointer []string

// Parse parses s as a JSON Pointer. The empty string selects the whole
// document; any other pointer starts with "/", and "~" is only allowed in
// the escapes "~0" and "~1".
func Parse(s string) (Pointer, error) {
	if s == "" {
		return Pointer{}, nil
	}
	if s[0] != '/' {
		return nil, fmt.Errorf("json pointer %q must be empty or start with \"/\"", s)
	}
	tokens := strings.Split(s[1:], "/")
	for i, tok := range tokens {
		for j := 0; j < len(tok); j++ {
			if tok[j] == '~' && (j+1 == len(tok) || tok[j+1] != '0' && tok[j+1] != '1') {
				return nil, fmt.Errorf("json pointer %q has \"~\" not followed by 0 or 1", s)
			}
		}
		tokens[i] = strings.ReplaceAll(strings.ReplaceAll(tok, "~1", "/"), "~0", "~")
	}
	return tokens, nil
}

// Find returns the value that p selects in doc, which must be valid JSON.
// It reports false when the value is absent.
func (p Pointer) Find(doc json.RawMessage) (json.RawMessage, bool) {
	for _, tok := range p {
		doc = bytes.TrimSpace(doc)
		if len(doc) == 0 {
			return nil, false
		}
		switch doc[0] {
		case '{':
			var obj map[string]json.RawMessage
			if json.Unmarshal(doc, &obj) != nil {
				return nil, false
			}
			v, ok := obj[tok]
			if !ok {
				return nil, false
			}
			doc = v
		case '[':
			i, err := strconv.Atoi(tok)
			if err != nil || i < 0 || tok != strconv.Itoa(i) {
				return nil, false
			}
			var arr []json.RawMessage
			if json.Unmarshal(doc, &arr) != nil || i >= len(arr) {
				return nil, false
			}
			doc = arr[i]
		default:
			return nil, false
		}
	}
	return bytes.TrimSpace(doc), true
}

// String returns p in its escaped form.
func (p Pointer) String() string {
	var b strings.Builder
	for _, tok := range p {
		b.WriteByte('/')
		b.WriteString(strings.ReplaceAll(strings.ReplaceAll(tok, "~", "~0"), "/", "~1"))
	}
	return b.String()
}
