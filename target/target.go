// Package target builds a feed's upstream requests from a template: a URL and
// header values that may hold placeholders.
//
// Placeholders come in three kinds:
//
//   - Request placeholders are filled in once per subscriber by Bind, from
//     the subscriber's request: every key that starts with "http." (what the
//     Caddyfile shorthands {query.*}, {path.*}, {header.*}, {cookie.*},
//     {re.*} and {vars.*} become when the Caddyfile is adapted), and every
//     other key that Caddy's global replacer does not know, such as a map
//     directive's destination.
//   - Global placeholders, the keys caddy.NewReplacer knows ({env.*},
//     {system.*}, {time.*}, {file.*}), are filled in by Request for every
//     upstream request and inserted as they are, since they come from
//     config.
//   - {sse_feed.last_id} is filled in by Request with the id of the feed's
//     last event, escaped for its place: path-escaped in the path,
//     query-escaped in the query and in header values.
//
// A request value can never change where the request goes or its shape.
// Request placeholders may sit in the URL's path, in query values and in
// header values, never in the scheme, userinfo, host or port, nor in a
// query parameter's name. Each value is escaped for its place, so that a
// "/" stays inside its path segment and a "&" inside its query value; a
// path segment that a value makes empty, "." or ".." is refused; header
// values lose their control characters. A value is inserted once and never
// read for placeholders again.
package target

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"

	"github.com/caddyserver/caddy/v2"
)

// MaxValueBytes bounds one request value, before escaping. Bind refuses a
// longer value with ErrBadValue.
const MaxValueBytes = 8 << 10

// ErrBadValue is returned by Bind when a request value cannot be used: it
// would make a path segment empty, "." or "..", or it is longer than
// MaxValueBytes. The subscriber should get 400 Bad Request.
var ErrBadValue = errors.New("bad request value")

// lastIDKey is the placeholder replaced by the id of the feed's last event.
const lastIDKey = "sse_feed.last_id"

// kind says what a part of a template is.
type kind uint8

const (
	literal kind = iota
	global       // a placeholder that Request fills in as it is
	cursor       // {sse_feed.last_id}, the id of the feed's last event
	request      // a placeholder that Bind fills in from the request
)

// place says where a part sits, which decides how a value is escaped there.
type place uint8

const (
	inOrigin place = iota // scheme, userinfo, host or port
	inPath
	inQuery
	inHeader
)

// part is a piece of literal text or a placeholder.
type part struct {
	kind  kind
	place place
	// text is the literal text, or the placeholder's key.
	text string
}

// field is one request header: its canonical name and its values.
type field struct {
	name   string
	values [][]part
}

// Template is a parsed upstream URL and header values.
type Template struct {
	url []part
	// segments are the path segments that hold a request placeholder, as
	// ranges of url.
	segments   [][2]int
	header     []field
	perRequest bool
	redacted   string
}

// PerRequest reports whether the template holds a request placeholder, so
// that each distinct binding is a feed of its own.
func (t *Template) PerRequest() bool { return t.perRequest }

// Redacted returns the URL for logs: scheme, host, port and path of the
// template, with placeholders shown by name, and neither the userinfo nor
// the query.
func (t *Template) Redacted() string { return t.redacted }

// Bind fills in the template's request placeholders with values from repl,
// the request's replacer, each escaped for its place. A template without
// request placeholders needs no replacer (repl may be nil). Bind returns an
// error wrapping ErrBadValue when a value cannot be used; the error says
// why without repeating the value.
func (t *Template) Bind(repl *caddy.Replacer) (*Bound, error) {
	if t.perRequest && repl == nil {
		return nil, errors.New("binding request placeholders needs the request's replacer")
	}
	u, err := bind(t.url, t.segments, repl)
	if err != nil {
		return nil, err
	}
	b := &Bound{url: u, header: make([]field, len(t.header)), redacted: t.redacted}
	for i, f := range t.header {
		b.header[i] = field{name: f.name, values: make([][]part, len(f.values))}
		for j, v := range f.values {
			if b.header[i].values[j], err = bind(v, nil, repl); err != nil {
				return nil, fmt.Errorf("header %s: %w", f.name, err)
			}
		}
	}
	return b, nil
}

// bind replaces the request placeholders among parts with their escaped
// values, checks the given path segments, and merges adjacent literal text.
func bind(parts []part, segments [][2]int, repl *caddy.Replacer) ([]part, error) {
	bound := make([]part, len(parts))
	for i, p := range parts {
		if p.kind == request {
			v, _ := repl.GetString(p.text)
			if len(v) > MaxValueBytes {
				return nil, fmt.Errorf("%w: {%s} is longer than %d bytes", ErrBadValue, p.text, MaxValueBytes)
			}
			p = part{kind: literal, place: p.place, text: escape(p.place, v)}
		}
		bound[i] = p
	}
	for _, s := range segments {
		var segment strings.Builder
		for _, p := range bound[s[0]:s[1]] {
			segment.WriteString(p.text)
		}
		if seg := segment.String(); seg == "" || seg == "." || seg == ".." {
			return nil, fmt.Errorf("%w: a request placeholder makes the path segment %q", ErrBadValue, seg)
		}
	}
	return mergeLiterals(bound), nil
}

// escape makes a request value safe for its place: a path segment, a query
// value, or a header value, which loses its control characters.
func escape(p place, v string) string {
	switch p {
	case inPath:
		return url.PathEscape(v)
	case inQuery:
		return url.QueryEscape(v)
	}
	return dropControls(v)
}

// dropControls removes the ASCII control characters but tab from v, such as
// CR, LF and NUL, so that a header value can neither split the header nor
// be refused by the HTTP client. Other bytes are kept as they are.
func dropControls(v string) string {
	var kept []byte
	for i := range len(v) {
		if c := v[i]; c < ' ' && c != '\t' || c == 0x7f {
			if kept == nil {
				kept = append(make([]byte, 0, len(v)), v[:i]...)
			}
		} else if kept != nil {
			kept = append(kept, c)
		}
	}
	if kept == nil {
		return v
	}
	return string(kept)
}

// mergeLiterals joins adjacent literal parts and drops empty ones, so that
// equal expansions have equal parts.
func mergeLiterals(parts []part) []part {
	var merged []part
	for _, p := range parts {
		if p.kind == literal {
			if p.text == "" {
				continue
			}
			if n := len(merged); n > 0 && merged[n-1].kind == literal {
				merged[n-1].text += p.text
				continue
			}
		}
		merged = append(merged, p)
	}
	return merged
}

// Bound is a template whose request placeholders are filled in: the upstream
// of one feed.
type Bound struct {
	url      []part
	header   []field
	redacted string
}

// Redacted returns its template's URL for logs, as Template.Redacted does.
func (b *Bound) Redacted() string { return b.redacted }

// Identity returns bytes that tell feeds apart: the expanded URL and header
// values with global placeholders and {sse_feed.last_id} still unfilled,
// encoded without ambiguity (every string is length-prefixed, placeholders
// are told from literal text). Two Bounds have equal identities exactly
// when their expansions are equal, byte for byte, so a value that changes
// the upstream request changes the identity. The identity holds request
// values, credentials among them: hash it with a key before it leaves the
// process.
func (b *Bound) Identity() []byte {
	id := appendParts(nil, b.url)
	id = binary.AppendUvarint(id, uint64(len(b.header)))
	for _, f := range b.header {
		id = appendString(id, f.name)
		id = binary.AppendUvarint(id, uint64(len(f.values)))
		for _, v := range f.values {
			id = appendParts(id, v)
		}
	}
	return id
}

// appendParts appends the encoding of parts to b.
func appendParts(b []byte, parts []part) []byte {
	b = binary.AppendUvarint(b, uint64(len(parts)))
	for _, p := range parts {
		b = append(b, byte(p.kind))
		b = appendString(b, p.text)
	}
	return b
}

// appendString appends s to b, length first.
func appendString(b []byte, s string) []byte {
	return append(binary.AppendUvarint(b, uint64(len(s))), s...)
}

// Request builds the upstream GET for one poll or tail connection. Global
// placeholders are filled in now, as they are; {sse_feed.last_id} becomes
// lastID, path-escaped in the path and query-escaped elsewhere. An error
// never holds the URL's query.
func (b *Bound) Request(ctx context.Context, lastID string) (*http.Request, error) {
	repl := caddy.NewReplacer()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, expand(b.url, repl, lastID), nil)
	if err != nil {
		// A *url.Error holds the whole URL, which may carry credentials.
		if ue, ok := errors.AsType[*url.Error](err); ok {
			err = ue.Err
		}
		return nil, fmt.Errorf("upstream url: %v", err)
	}
	for _, f := range b.header {
		for _, v := range f.values {
			req.Header.Add(f.name, expand(v, repl, lastID))
		}
	}
	return req, nil
}

// expand writes out bound parts, filling in global placeholders from repl
// and {sse_feed.last_id} with lastID.
func expand(parts []part, repl *caddy.Replacer, lastID string) string {
	var sb strings.Builder
	for _, p := range parts {
		switch p.kind {
		case literal:
			sb.WriteString(p.text)
		case global:
			v, _ := repl.GetString(p.text)
			sb.WriteString(v)
		case cursor:
			if p.place == inPath {
				sb.WriteString(url.PathEscape(lastID))
			} else {
				sb.WriteString(url.QueryEscape(lastID))
			}
		}
	}
	return sb.String()
}
