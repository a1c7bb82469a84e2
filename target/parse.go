package target

import (
	"cmp"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"

	"github.com/caddyserver/caddy/v2"
)

// Parse compiles a URL and header values into a Template. The URL must be
// absolute, http or https, with a host and no fragment. Its scheme is
// literal; its userinfo, host and port may hold global placeholders such as
// {env.API_HOST}, since those come from config, but no request placeholder
// nor {sse_feed.last_id}. Request placeholders may sit in path segments, in
// query values and in header values; a path segment holding one holds no
// other placeholder, so that its value alone decides whether it is empty or
// a dot segment. A brace starts a placeholder unless a backslash escapes it,
// as in Caddy. Errors name the problem and never repeat the query.
func Parse(rawURL string, header map[string][]string) (*Template, error) {
	t, err := parseURL(rawURL)
	if err != nil {
		return nil, err
	}
	names := make([]string, 0, len(header))
	for name := range header {
		if !validName(name) {
			return nil, fmt.Errorf("header name %q is not a valid token", name)
		}
		names = append(names, name)
	}
	slices.SortFunc(names, func(a, b string) int {
		return cmp.Or(cmp.Compare(http.CanonicalHeaderKey(a), http.CanonicalHeaderKey(b)), cmp.Compare(a, b))
	})
	for _, name := range names {
		canonical := http.CanonicalHeaderKey(name)
		if n := len(t.header); n == 0 || t.header[n-1].name != canonical {
			t.header = append(t.header, field{name: canonical})
		}
		f := &t.header[len(t.header)-1]
		for _, v := range header[name] {
			parts, err := parseHeaderValue(v)
			if err != nil {
				return nil, fmt.Errorf("header %s: %w", canonical, err)
			}
			f.values = append(f.values, parts)
			t.perRequest = t.perRequest || slices.ContainsFunc(parts, isRequest)
		}
	}
	return t, nil
}

func isRequest(p part) bool { return p.kind == request }

// parseHeaderValue parses one header value.
func parseHeaderValue(v string) ([]part, error) {
	tokens, err := splitPlaceholders(v)
	if err != nil {
		return nil, err
	}
	parts := make([]part, len(tokens))
	for i, tok := range tokens {
		if !tok.placeholder {
			if dropControls(tok.text) != tok.text {
				return nil, errors.New("control character in the value")
			}
			parts[i] = part{kind: literal, place: inHeader, text: tok.text}
			continue
		}
		k, err := classify(tok.text)
		if err != nil {
			return nil, err
		}
		parts[i] = part{kind: k, place: inHeader, text: tok.text}
	}
	return parts, nil
}

// token is a piece of a template string as Caddy's replacer reads it.
type token struct {
	// text is literal text, escapes removed, or a placeholder's key.
	text        string
	placeholder bool
}

// splitPlaceholders cuts s into literal text and placeholders the way
// Caddy's replacer does: a backslash before a brace makes the brace literal,
// and a placeholder ends at its first closing brace that no backslash
// escapes. Unlike the replacer, which leaves an unclosed brace as it is, it
// refuses one, and an empty placeholder too.
func splitPlaceholders(s string) ([]token, error) {
	var tokens []token
	var text strings.Builder
	flush := func() {
		if text.Len() > 0 {
			tokens = append(tokens, token{text: text.String()})
			text.Reset()
		}
	}
	cursor := 0
	for i := 0; i < len(s); i++ {
		if i > 0 && s[i-1] == '\\' && (s[i] == '{' || s[i] == '}') {
			text.WriteString(s[cursor : i-1])
			cursor = i
			continue
		}
		if s[i] != '{' {
			continue
		}
		end := strings.IndexByte(s[i:], '}')
		if end < 0 {
			return nil, errors.New("unclosed {")
		}
		end += i
		for end < len(s)-1 && s[end-1] == '\\' {
			next := strings.IndexByte(s[end+1:], '}')
			if next < 0 {
				return nil, errors.New("unclosed {")
			}
			end += next + 1
		}
		if end == i+1 {
			return nil, errors.New("empty placeholder {}")
		}
		text.WriteString(s[cursor:i])
		flush()
		tokens = append(tokens, token{text: s[i+1 : end], placeholder: true})
		i, cursor = end, end+1
	}
	text.WriteString(s[cursor:])
	flush()
	return tokens, nil
}

// globals knows the placeholders that need no request.
var globals = caddy.NewReplacer()

// shorthands are the Caddyfile's placeholder shorthands that take a name.
// The Caddyfile adapter rewrites them only when the name is made of
// letters, digits, "_" and "-" (and "." for re): any other name reaches the
// JSON config as written, where Caddy knows no such placeholder.
var shorthands = [][2]string{
	{"query.", "http.request.uri.query."},
	{"path.", "http.request.uri.path."},
	{"header.", "http.request.header."},
	{"cookie.", "http.request.cookie."},
	{"labels.", "http.request.host.labels."},
	{"re.", "http.regexp."},
	{"vars.", "http.vars."},
}

// classify tells what kind of placeholder key is. Keys that Caddy's global
// replacer does not know are request placeholders: the request's replacer
// may know them (a map directive's destination, a plugin's value), and as
// request placeholders they are escaped and kept out of the host.
func classify(key string) (kind, error) {
	switch {
	case key == lastIDKey:
		return cursor, nil
	case strings.HasPrefix(key, "sse_feed."):
		return 0, fmt.Errorf("unknown placeholder {%s}; did you mean {%s}?", key, lastIDKey)
	case strings.HasPrefix(key, "http."):
		return request, nil
	case strings.HasPrefix(key, "file."):
		// Asking the replacer would read the file.
		return global, nil
	}
	if _, ok := globals.Get(key); ok {
		return global, nil
	}
	for _, s := range shorthands {
		if name, ok := strings.CutPrefix(key, s[0]); ok {
			return 0, fmt.Errorf("placeholder {%s} is a Caddyfile shorthand that was not expanded; write {%s%s}", key, s[1], name)
		}
	}
	return request, nil
}

// urlState is the component of a URL being read.
type urlState uint8

const (
	inScheme urlState = iota
	inAuthority
	inPathComponent
	inQueryComponent
)

// urlParser reads a URL template into parts, cutting its literal text at
// every component and path segment boundary.
type urlParser struct {
	parts []part
	state urlState
	text  strings.Builder // literal text not yet in parts
	// segment is the path segment being read: where it starts in parts,
	// whether it holds a request placeholder, and another placeholder it
	// holds, if any.
	segment         int
	segmentRequest  bool
	segmentOther    string
	requestSegments [][2]int
	// inName is true while a query parameter's name is being read.
	inName bool
}

// parseURL parses a URL template.
func parseURL(raw string) (*Template, error) {
	tokens, err := splitPlaceholders(raw)
	if err != nil {
		return nil, err
	}
	var p urlParser
	for _, tok := range tokens {
		if tok.placeholder {
			err = p.placeholder(tok.text)
		} else {
			err = p.literal(tok.text)
		}
		if err != nil {
			return nil, err
		}
	}
	switch p.state {
	case inScheme:
		return nil, errors.New("not an absolute url: want http:// or https://")
	case inPathComponent:
		if err := p.endSegment(); err != nil {
			return nil, err
		}
	}
	p.flush()
	if err := check(p.parts); err != nil {
		return nil, err
	}
	return &Template{
		url:        p.parts,
		segments:   p.requestSegments,
		perRequest: slices.ContainsFunc(p.parts, isRequest),
		redacted:   redact(p.parts),
	}, nil
}

// place returns the place of what is being read.
func (p *urlParser) place() place {
	switch p.state {
	case inPathComponent:
		return inPath
	case inQueryComponent:
		return inQuery
	}
	return inOrigin
}

// flush moves the pending literal text into parts.
func (p *urlParser) flush() {
	if p.text.Len() > 0 {
		p.parts = append(p.parts, part{kind: literal, place: p.place(), text: p.text.String()})
		p.text.Reset()
	}
}

// endSegment ends the path segment being read.
func (p *urlParser) endSegment() error {
	p.flush()
	if p.segmentRequest {
		if p.segmentOther != "" {
			return fmt.Errorf("a path segment holds a request placeholder and {%s}: give each a segment of its own", p.segmentOther)
		}
		p.requestSegments = append(p.requestSegments, [2]int{p.segment, len(p.parts)})
	}
	return nil
}

// placeholder adds a placeholder where the parser stands.
func (p *urlParser) placeholder(key string) error {
	k, err := classify(key)
	if err != nil {
		return err
	}
	switch p.state {
	case inScheme:
		return fmt.Errorf("placeholder {%s} in the scheme", key)
	case inAuthority:
		if k != global {
			return fmt.Errorf("placeholder {%s} in the userinfo, host or port: only global placeholders such as {env.*} may be there", key)
		}
	case inPathComponent:
		if k == request {
			p.segmentRequest = true
		} else {
			p.segmentOther = key
		}
	case inQueryComponent:
		if k == request && p.inName {
			return fmt.Errorf("request placeholder {%s} in a query parameter name: only values may hold one", key)
		}
	}
	p.flush()
	p.parts = append(p.parts, part{kind: k, place: p.place(), text: key})
	return nil
}

// literal adds literal text, moving through the URL's components.
func (p *urlParser) literal(s string) error {
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '#':
			return errors.New("url has a fragment")
		case p.state == inScheme && c == ':':
			if !strings.HasPrefix(s[i:], "://") {
				return errors.New("no host: want scheme://host")
			}
			p.state = inAuthority
			p.text.WriteString("://")
			i += 2
			continue
		case c == '/' && (p.state == inAuthority || p.state == inPathComponent):
			if p.state == inPathComponent {
				if err := p.endSegment(); err != nil {
					return err
				}
			}
			p.flush()
			p.state = inPathComponent
			p.text.WriteByte(c)
			p.flush()
			p.segment, p.segmentRequest, p.segmentOther = len(p.parts), false, ""
			continue
		case c == '?' && (p.state == inAuthority || p.state == inPathComponent):
			if p.state == inPathComponent {
				if err := p.endSegment(); err != nil {
					return err
				}
			}
			p.flush()
			p.state = inQueryComponent
			p.inName = true
		case p.state == inQueryComponent && c == '&':
			p.inName = true
		case p.state == inQueryComponent && c == '=':
			p.inName = false
		}
		p.text.WriteByte(c)
	}
	return nil
}

// check parses the URL with every placeholder standing in for a plain
// value, and makes sure it is an http or https URL with a host.
func check(parts []part) error {
	var sb strings.Builder
	for _, p := range parts {
		if p.kind == literal {
			sb.WriteString(p.text)
		} else {
			sb.WriteByte('0')
		}
	}
	u, err := url.Parse(sb.String())
	if err != nil {
		// A *url.Error holds the whole URL, which may carry credentials.
		if ue, ok := errors.AsType[*url.Error](err); ok {
			err = ue.Err
		}
		return fmt.Errorf("unparsable url: %v", err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return errors.New("url scheme must be http or https")
	}
	if u.Host == "" {
		return errors.New("url has no host")
	}
	return nil
}

// redact writes out the scheme, host, port and path of a URL template,
// placeholders by name.
func redact(parts []part) string {
	var origin, path strings.Builder
	for _, p := range parts {
		s := p.text
		if p.kind != literal {
			s = "{" + p.text + "}"
		}
		switch p.place {
		case inOrigin:
			origin.WriteString(s)
		case inPath:
			path.WriteString(s)
		}
	}
	scheme, authority, _ := strings.Cut(origin.String(), "://")
	if i := strings.LastIndexByte(authority, '@'); i >= 0 {
		authority = authority[i+1:]
	}
	return scheme + "://" + authority + path.String()
}

// validName reports whether name is a valid header field name, an RFC 9110
// token.
func validName(name string) bool {
	if name == "" {
		return false
	}
	for i := range len(name) {
		c := name[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0) {
			return false
		}
	}
	return true
}
