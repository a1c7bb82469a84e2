package target_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"net/http/httptest"
	"net/url"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/ssefeed/caddy-ssefeed/target"
)

func TestParseErrors(t *testing.T) {
	tests := []struct {
		name   string
		url    string
		header map[string][]string
		want   string
	}{
		{"empty", "", nil, "not an absolute url"},
		{"relative", "/items?token=s3cret", nil, "not an absolute url"},
		{"no scheme", "api.example/items?token=s3cret", nil, "not an absolute url"},
		{"ftp", "ftp://api.example/items?token=s3cret", nil, "scheme must be http or https"},
		{"opaque", "https:api.example?token=s3cret", nil, "no host"},
		{"no host", "https:///items?token=s3cret", nil, "no host"},
		{"bad port", "https://api.example:port/items?token=s3cret", nil, "unparsable url"},
		{"bad escape", "https://api.example/%zz?token=s3cret", nil, "unparsable url"},
		{"control character", "https://api.example/a\x00b?token=s3cret", nil, "unparsable url"},
		{"fragment", "https://api.example/items?token=s3cret#top", nil, "fragment"},
		{"empty fragment", "https://api.example/items?token=s3cret#", nil, "fragment"},
		{"placeholder in scheme", "{env.SCHEME}://api.example/?token=s3cret", nil, "placeholder {env.SCHEME} in the scheme"},
		{"request placeholder in host", "https://{http.request.host}/?token=s3cret", nil, "{http.request.host} in the userinfo, host or port"},
		{"request placeholder in host suffix", "https://{http.request.uri.query.tenant}.api.example/?token=s3cret", nil, "in the userinfo, host or port"},
		{"request placeholder in port", "https://api.example:{http.request.uri.query.port}/?token=s3cret", nil, "in the userinfo, host or port"},
		{"request placeholder in userinfo", "https://{http.request.header.User}@api.example/?token=s3cret", nil, "in the userinfo, host or port"},
		{"unknown placeholder in host", "https://{backend}/?token=s3cret", nil, "{backend} in the userinfo, host or port"},
		{"last id in host", "https://{sse_feed.last_id}.api.example/?token=s3cret", nil, "in the userinfo, host or port"},
		{"unclosed brace", "https://api.example/{http.request.uri.query.id?token=s3cret", nil, "unclosed {"},
		{"unclosed escaped brace", "https://api.example/{env.X\\}?token=s3cret", nil, "unclosed {"},
		{"empty placeholder", "https://api.example/{}?token=s3cret", nil, "empty placeholder"},
		{"request placeholder in query name", "https://api.example/?token=s3cret&{http.request.uri.query.k}=1", nil, "query parameter name"},
		{"request placeholder in a name without value", "https://api.example/?token=s3cret&{http.request.uri.query.k}", nil, "query parameter name"},
		{"request and global in one segment", "https://api.example/{env.PREFIX}{http.request.uri.query.id}?token=s3cret", nil, "{env.PREFIX}: give each a segment"},
		{"request and last id in one segment", "https://api.example/{http.request.uri.query.id}-{sse_feed.last_id}/x?token=s3cret", nil, "{sse_feed.last_id}: give each a segment"},
		{"unknown sse_feed placeholder", "https://api.example/?since={sse_feed.lastid}", nil, "unknown placeholder {sse_feed.lastid}"},
		{"shorthand left in json", "https://api.example/{query.a.b}?token=s3cret", nil, "write {http.request.uri.query.a.b}"},
		{"header shorthand left in json", "https://api.example/", map[string][]string{"X-A": {"{header.X.Y}"}}, "header X-A: placeholder {header.X.Y} is a Caddyfile shorthand"},
		{"bad header name", "https://api.example/", map[string][]string{"X A": {"1"}}, `header name "X A"`},
		{"empty header name", "https://api.example/", map[string][]string{"": {"1"}}, "header name"},
		{"header with line feed", "https://api.example/", map[string][]string{"X-A": {"a\nX-B: 1"}}, "header X-A: control character"},
		{"header unclosed brace", "https://api.example/", map[string][]string{"X-A": {"{env.X"}}, "header X-A: unclosed {"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := target.Parse(tt.url, tt.header)
			if err == nil {
				t.Fatalf("Parse(%q) succeeded, want an error with %q", tt.url, tt.want)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not say %q", err, tt.want)
			}
			if strings.Contains(err.Error(), "s3cret") {
				t.Errorf("error %q repeats the query", err)
			}
		})
	}
}

func TestParse(t *testing.T) {
	tests := []struct {
		url        string
		header     map[string][]string
		perRequest bool
		redacted   string
	}{
		{"http://127.0.0.1:9/items?since={sse_feed.last_id}&limit=10", nil, false, "http://127.0.0.1:9/items"},
		{"https://api.example", nil, false, "https://api.example"},
		{"HTTPS://api.example?x=1", nil, false, "HTTPS://api.example"},
		{"https://user:{env.PASS}@{env.API_HOST}:{env.API_PORT}/v1/{http.request.uri.query.id}?token=s3cret", nil, true,
			"https://{env.API_HOST}:{env.API_PORT}/v1/{http.request.uri.query.id}"},
		{"https://api.example/orders/{map_destination}/status", nil, true, "https://api.example/orders/{map_destination}/status"},
		{"https://api.example/u/{http.request.uri.query.a}{http.request.uri.query.b}.json", nil, true,
			"https://api.example/u/{http.request.uri.query.a}{http.request.uri.query.b}.json"},
		{"https://api.example/{env.VERSION}/{sse_feed.last_id}?q={http.request.uri.query.q}&{sse_feed.last_id}", nil, true,
			"https://api.example/{env.VERSION}/{sse_feed.last_id}"},
		{`https://api.example/\{literal\}?a={file./etc/hostname}`, nil, false, "https://api.example/{literal}"},
		{"https://api.example/", map[string][]string{"Authorization": {"Bearer {env.TOKEN}"}}, false, "https://api.example/"},
		{"https://api.example/", map[string][]string{"Authorization": {"{http.request.header.Authorization}"}}, true, "https://api.example/"},
	}
	for _, tt := range tests {
		tmpl, err := target.Parse(tt.url, tt.header)
		if err != nil {
			t.Errorf("Parse(%q): %v", tt.url, err)
			continue
		}
		if tmpl.PerRequest() != tt.perRequest {
			t.Errorf("Parse(%q).PerRequest() = %v, want %v", tt.url, tmpl.PerRequest(), tt.perRequest)
		}
		if got := tmpl.Redacted(); got != tt.redacted {
			t.Errorf("Parse(%q).Redacted() = %q, want %q", tt.url, got, tt.redacted)
		}
	}
}

// legacyRequest is how the source package built upstream requests before
// templates: every placeholder replaced in one ReplaceAll, the last id
// query-escaped everywhere.
func legacyRequest(rawURL string, header map[string][]string, lastID string) (*http.Request, error) {
	repl := caddy.NewReplacer()
	repl.Set("sse_feed.last_id", url.QueryEscape(lastID))
	req, err := http.NewRequest(http.MethodGet, repl.ReplaceAll(rawURL, ""), nil)
	if err != nil {
		return nil, err
	}
	for name, values := range header {
		for _, v := range values {
			req.Header.Add(name, repl.ReplaceAll(v, ""))
		}
	}
	return req, nil
}

// TestStaticLikeLegacy checks that a template without request placeholders
// builds the requests the source package built before, but for the last id
// in a path, which is now path-escaped.
func TestStaticLikeLegacy(t *testing.T) {
	t.Setenv("TARGET_TEST_HOST", "127.0.0.1:9")
	t.Setenv("TARGET_TEST_KEY", "k&y=1")
	t.Setenv("TARGET_TEST_TOKEN", "t0ken")
	templates := []struct {
		url    string
		header map[string][]string
	}{
		{"http://127.0.0.1:9/items?since={sse_feed.last_id}&limit=10", map[string][]string{
			"X-Since": {"{sse_feed.last_id}"}, "x-both": {"a", "b"}, "Authorization": {"Bearer {env.TARGET_TEST_TOKEN}"},
		}},
		{"http://{env.TARGET_TEST_HOST}/x?k={env.TARGET_TEST_KEY}&{sse_feed.last_id}", nil},
		{`http://127.0.0.1:9/\{x\}/{system.os}?since={sse_feed.last_id}`, map[string][]string{"X-Since": {"after {sse_feed.last_id} \\{x\\}"}}},
		{"http://127.0.0.1:9", map[string][]string{"X-Unset": {"{env.TARGET_TEST_UNSET}"}}},
		{"http://127.0.0.1:9/a%2Fb/c%20d?x=1+2", nil},
	}
	for _, tt := range templates {
		tmpl, err := target.Parse(tt.url, tt.header)
		if err != nil {
			t.Fatalf("Parse(%q): %v", tt.url, err)
		}
		if tmpl.PerRequest() {
			t.Fatalf("Parse(%q).PerRequest() = true", tt.url)
		}
		b, err := tmpl.Bind(nil)
		if err != nil {
			t.Fatal(err)
		}
		for _, lastID := range []string{"", "42", "a b&c", "x/y?z=#", "{env.HOME}", "ü"} {
			got, err := b.Request(context.Background(), lastID)
			if err != nil {
				t.Fatal(err)
			}
			want, err := legacyRequest(tt.url, tt.header, lastID)
			if err != nil {
				t.Fatal(err)
			}
			if got.URL.String() != want.URL.String() || !reflect.DeepEqual(got.Header, want.Header) || got.Method != http.MethodGet {
				t.Errorf("%q with last id %q: %s %s %v, want %s %v",
					tt.url, lastID, got.Method, got.URL, got.Header, want.URL, want.Header)
			}
		}
	}
}

func TestRequestEscapesLastID(t *testing.T) {
	tmpl, err := target.Parse("https://api.example/after/{sse_feed.last_id}/items?since={sse_feed.last_id}",
		map[string][]string{"X-Since": {"{sse_feed.last_id}"}})
	if err != nil {
		t.Fatal(err)
	}
	b, err := tmpl.Bind(nil)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct{ lastID, path, query, header string }{
		{"", "/after//items", "since=", ""},
		{"item 5", "/after/item%205/items", "since=item+5", "item+5"},
		{"a/b?c#d", "/after/a%2Fb%3Fc%23d/items", "since=a%2Fb%3Fc%23d", "a%2Fb%3Fc%23d"},
		{"%2F", "/after/%252F/items", "since=%252F", "%252F"},
		{"{env.HOME}", "/after/%7Benv.HOME%7D/items", "since=%7Benv.HOME%7D", "%7Benv.HOME%7D"},
	}
	for _, tt := range tests {
		expectRequest(t, fmt.Sprintf("last id %q", tt.lastID), b, tt.lastID, "X-Since", tt.path, tt.query, tt.header)
	}
}

func TestRequestErrorHidesQuery(t *testing.T) {
	t.Setenv("TARGET_TEST_HOST", "bad host")
	tmpl, err := target.Parse("https://{env.TARGET_TEST_HOST}/x?token=s3cret", nil)
	if err != nil {
		t.Fatal(err)
	}
	b, err := tmpl.Bind(nil)
	if err != nil {
		t.Fatal(err)
	}
	_, err = b.Request(context.Background(), "")
	if err == nil || strings.Contains(err.Error(), "s3cret") {
		t.Fatalf("Request error = %v, want one without the query", err)
	}
}

// requestReplacer returns the replacer Caddy gives a request to path with
// the given header, plus a variable, a regexp capture and a map destination
// as the vars handler, a matcher and the map handler would set them.
func requestReplacer(path string, header http.Header) *caddy.Replacer {
	req := httptest.NewRequest(http.MethodGet, path, nil)
	req.Header = header
	req = req.WithContext(context.WithValue(req.Context(), caddyhttp.VarsCtxKey, map[string]any{"user": "alice"}))
	repl := caddyhttp.NewTestReplacer(req)
	repl.Set("http.regexp.num.1", "99")
	repl.Map(func(key string) (any, bool) { return "acme", key == "tenant" })
	return repl
}

// TestCaddyfileShorthands runs a Caddyfile's tokens through the adapter's
// shorthand replacer, parses the outcome, and binds it to a real request.
func TestCaddyfileShorthands(t *testing.T) {
	tokens, err := caddyfile.Tokenize([]byte(`sse_feed /orders/* {
	poll https://api.internal/{tenant}/users/{vars.user}/orders/{path.1}/status?order={query.order}&n={re.num.1}&tld={labels.0}&ip={client_ip}
	header Authorization {header.Authorization}
	header Cookie "session={cookie.session}"
	header X-Dotted {header.X.Y}
}`), "Caddyfile")
	if err != nil {
		t.Fatal(err)
	}
	segment := caddyfile.Segment(tokens)
	httpcaddyfile.NewShorthandReplacer().ApplyToSegment(&segment)
	var rawURL string
	header := map[string][]string{}
	for i, tok := range segment {
		switch tok.Text {
		case "poll":
			rawURL = segment[i+1].Text
		case "header":
			header[segment[i+1].Text] = []string{segment[i+2].Text}
		}
	}
	if want := "{http.request.header.X.Y}"; header["X-Dotted"][0] == want {
		t.Fatalf("the adapter expanded {header.X.Y}; this test expects it left as written")
	}
	if _, err := target.Parse(rawURL, header); err == nil || !strings.Contains(err.Error(), "{http.request.header.X.Y}") {
		t.Fatalf("Parse with {header.X.Y} left as written: %v, want an error suggesting the full placeholder", err)
	}
	delete(header, "X-Dotted")
	tmpl, err := target.Parse(rawURL, header)
	if err != nil {
		t.Fatal(err)
	}
	if !tmpl.PerRequest() {
		t.Fatal("PerRequest() = false")
	}
	repl := requestReplacer("http://shop.example/orders/42?order=7%2F8", http.Header{
		"Authorization": {"Bearer abc"},
		"Cookie":        {"session=xyz; other=1"},
	})
	b, err := tmpl.Bind(repl)
	if err != nil {
		t.Fatal(err)
	}
	req, err := b.Request(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	if want := "https://api.internal/acme/users/alice/orders/42/status?order=7%2F8&n=99&tld=example&ip="; req.URL.String() != want {
		t.Errorf("URL = %s, want %s", req.URL, want)
	}
	want := http.Header{"Authorization": {"Bearer abc"}, "Cookie": {"session=xyz"}}
	if !reflect.DeepEqual(req.Header, want) {
		t.Errorf("header = %v, want %v", req.Header, want)
	}
}

func TestBindEscapes(t *testing.T) {
	tmpl, err := target.Parse("https://api.example/u/{http.request.uri.query.p}/x?q={http.request.uri.query.q}",
		map[string][]string{"X-H": {"v={http.request.header.X-In}"}})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		p, q, h           string
		path, query, head string
	}{
		{"a/b", "a&b=c", "a\r\nX-Evil: 1", "/u/a%2Fb/x", "q=a%26b%3Dc", "v=aX-Evil: 1"},
		{"%2F", "%2F", "%2F", "/u/%252F/x", "q=%252F", "v=%2F"},
		{"@evil.example", "@evil.example", "@evil.example", "/u/@evil.example/x", "q=%40evil.example", "v=@evil.example"},
		{"#x", "#x", "#x", "/u/%23x/x", "q=%23x", "v=#x"},
		{"?a=b&c=d", "?a=b&c=d", "?a=b&c=d", "/u/%3Fa=b&c=d/x", "q=%3Fa%3Db%26c%3Dd", "v=?a=b&c=d"},
		{"a b+", "a b+", "a\tb", "/u/a%20b+/x", "q=a+b%2B", "v=a\tb"},
		{"{env.HOME}", "{http.request.header.Cookie}", "{env.HOME}", "/u/%7Benv.HOME%7D/x", "q=%7Bhttp.request.header.Cookie%7D", "v={env.HOME}"},
		{"...", "", "\x00\x7f", "/u/.../x", "q=", "v="},
		{"ü", "ü", "ü\xff", "/u/%C3%BC/x", "q=%C3%BC", "v=ü\xff"},
	}
	for _, tt := range tests {
		repl := requestReplacer("/events?"+url.Values{"p": {tt.p}, "q": {tt.q}}.Encode(), http.Header{"X-In": {tt.h}})
		b, err := tmpl.Bind(repl)
		if err != nil {
			t.Errorf("Bind(%q, %q, %q): %v", tt.p, tt.q, tt.h, err)
			continue
		}
		expectRequest(t, fmt.Sprintf("p=%q q=%q h=%q", tt.p, tt.q, tt.h), b, "", "X-H", tt.path, tt.query, tt.head)
	}
}

func TestBindNeedsReplacer(t *testing.T) {
	tmpl, err := target.Parse("https://api.example/{http.request.uri.query.p}", nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tmpl.Bind(nil); err == nil || errors.Is(err, target.ErrBadValue) {
		t.Fatalf("Bind(nil) = %v, want an error other than ErrBadValue", err)
	}
}

// fuzzTemplate holds request placeholders in every place they may be: a
// path segment of their own and with literal text, query values, header
// values; and the last id in a path segment, the query and a header.
const fuzzTemplate = "https://api.example:8443/v1/{http.request.uri.query.p}/item-{http.request.uri.query.p}.json/{sse_feed.last_id}" +
	"?since={sse_feed.last_id}&q={http.request.uri.query.q}&r=x{http.request.uri.query.q}y&limit=10"

var fuzzHeader = map[string][]string{
	"Authorization": {"Bearer {http.request.header.X-H}"},
	"Cookie":        {"{http.request.header.X-H}"},
	"X-Since":       {"{sse_feed.last_id}"},
}

// withoutControls is s without ASCII control characters but tab.
func withoutControls(s string) string {
	var b strings.Builder
	for i := range len(s) {
		if s[i] >= ' ' && s[i] != 0x7f || s[i] == '\t' {
			b.WriteByte(s[i])
		}
	}
	return b.String()
}

// checkBinding binds fuzzTemplate with the values p (path), q (query) and h
// (header) and checks that the request keeps the configured scheme, host and
// port, its path segments and its query parameters, that each value arrives
// as it was, expanded nowhere, and that no header value holds a control
// character. Bind must refuse exactly the values that are too long or that
// would make a path segment empty or a dot segment.
func checkBinding(t *testing.T, tmpl *target.Template, p, q, h, lastID string) {
	t.Helper()
	repl := requestReplacer("/events?"+url.Values{"p": {p}, "q": {q}}.Encode(), http.Header{"X-H": {h}})
	b, err := tmpl.Bind(repl)
	refused := p == "" || p == "." || p == ".." || max(len(p), len(q), len(h)) > target.MaxValueBytes
	if refused {
		if !errors.Is(err, target.ErrBadValue) {
			t.Fatalf("Bind(p=%q, q=%q, h=%q) = %v, want ErrBadValue", p, q, h, err)
		}
		return
	}
	if err != nil {
		t.Fatalf("Bind(p=%q, q=%q, h=%q): %v", p, q, h, err)
	}
	req, err := b.Request(context.Background(), lastID)
	if err != nil {
		t.Fatalf("Request: %v", err)
	}
	if req.URL.Scheme != "https" || req.URL.Host != "api.example:8443" || req.URL.User != nil || req.URL.Fragment != "" {
		t.Fatalf("request goes to %s, want https://api.example:8443", req.URL.Redacted())
	}
	// What the upstream reads from the request line.
	got, err := url.ParseRequestURI(req.URL.RequestURI())
	if err != nil {
		t.Fatalf("upstream cannot read the request line: %v", err)
	}
	segments := strings.Split(got.EscapedPath(), "/")
	want := []string{"", "v1", p, "item-" + p + ".json", lastID}
	if len(segments) != len(want) {
		t.Fatalf("path %q has %d segments, want %d", got.EscapedPath(), len(segments), len(want))
	}
	for i, s := range segments {
		if v, err := url.PathUnescape(s); err != nil || v != want[i] {
			t.Errorf("path segment %d = %q (%v), want %q", i, s, err, want[i])
		}
	}
	query, err := url.ParseQuery(got.RawQuery)
	if err != nil {
		t.Fatalf("upstream cannot read the query: %v", err)
	}
	wantQuery := url.Values{"since": {lastID}, "q": {q}, "r": {"x" + q + "y"}, "limit": {"10"}}
	if !reflect.DeepEqual(query, wantQuery) {
		t.Errorf("query = %q, want %q", query, wantQuery)
	}
	if len(req.Header) != 3 {
		t.Errorf("request has headers %q, want 3", slices.Sorted(maps.Keys(req.Header)))
	}
	for name, values := range req.Header {
		for _, v := range values {
			if v != withoutControls(v) {
				t.Errorf("header %s holds a control character", name)
			}
		}
	}
	if got, want := req.Header.Values("Authorization"), []string{"Bearer " + withoutControls(h)}; !slices.Equal(got, want) {
		t.Errorf("Authorization = %q, want %q", got, want)
	}
	if got, want := req.Header.Values("Cookie"), []string{withoutControls(h)}; !slices.Equal(got, want) {
		t.Errorf("Cookie = %q, want %q", got, want)
	}
	if got, want := req.Header.Values("X-Since"), []string{url.QueryEscape(lastID)}; !slices.Equal(got, want) {
		t.Errorf("X-Since = %q, want %q", got, want)
	}
}

var hostileValues = []string{
	"..", ".", "", "%2F", "%252F", "@evil.example", "#x", "?a=b&c=d", "{env.HOME}",
	"{http.request.header.Cookie}", "a\r\nX-Evil: 1", "\r\n\r\nGET / HTTP/1.1", "\x00", "/", "../admin",
	"a/../../b", ":8080", "//evil.example", "\\evil.example", "%", "%zz", "+ &=;,",
	strings.Repeat("a", target.MaxValueBytes), strings.Repeat("a", target.MaxValueBytes+1),
	strings.Repeat("%", target.MaxValueBytes), strings.Repeat("\n", target.MaxValueBytes+1),
}

func TestHostileValues(t *testing.T) {
	tmpl, err := target.Parse(fuzzTemplate, fuzzHeader)
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range hostileValues {
		checkBinding(t, tmpl, v, "ok", "ok", "")
		checkBinding(t, tmpl, "ok", v, "ok", "")
		checkBinding(t, tmpl, "ok", "ok", v, "")
		if len(v) <= target.MaxValueBytes {
			checkBinding(t, tmpl, "ok", "ok", "ok", v)
		}
	}
}

func FuzzBind(f *testing.F) {
	for _, v := range hostileValues {
		// Long seeds slow the fuzzer down; TestHostileValues has them.
		if len(v) < 64 {
			f.Add(v, v, v, v)
		}
	}
	tmpl, err := target.Parse(fuzzTemplate, fuzzHeader)
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, p, q, h, lastID string) {
		checkBinding(t, tmpl, p, q, h, lastID)
	})
}

func TestIdentity(t *testing.T) {
	t.Setenv("TARGET_TEST_B", "bb")
	tmpl, err := target.Parse("https://api.example/u/{http.request.uri.query.a}/{http.request.uri.query.b}{http.request.uri.query.c}?d={http.request.uri.query.d}",
		map[string][]string{
			"Authorization": {"{http.request.header.Authorization}"},
			"X-Pair":        {"{http.request.header.X-A}{env.TARGET_TEST_B}{http.request.header.X-C}"},
			"x-pair":        {"{http.request.header.X-D}"},
		})
	if err != nil {
		t.Fatal(err)
	}
	type values struct{ a, b, c, d, auth, xa, xc, xd string }
	bind := func(v values) (*target.Bound, *http.Request) {
		t.Helper()
		q := url.Values{"a": {v.a}, "b": {v.b}, "c": {v.c}, "d": {v.d}}
		repl := requestReplacer("/events?"+q.Encode(), http.Header{
			"Authorization": {v.auth}, "X-A": {v.xa}, "X-C": {v.xc}, "X-D": {v.xd},
		})
		b, err := tmpl.Bind(repl)
		if err != nil {
			t.Fatal(err)
		}
		req, err := b.Request(context.Background(), "")
		if err != nil {
			t.Fatal(err)
		}
		return b, req
	}
	base := values{"a", "b", "c", "d", "Bearer 1", "xa", "xc", "xd"}
	tests := []struct {
		name  string
		other values
		equal bool
	}{
		{"same values", base, true},
		{"path value", values{"a2", "b", "c", "d", "Bearer 1", "xa", "xc", "xd"}, false},
		{"query value", values{"a", "b", "c", "d2", "Bearer 1", "xa", "xc", "xd"}, false},
		{"authorization", values{"a", "b", "c", "d", "Bearer 2", "xa", "xc", "xd"}, false},
		{"value moved between path and query", values{"a", "b", "c", "", "Bearer 1", "xa", "xc", "xd"}, false},
		{"value moved between headers", values{"a", "b", "c", "d", "Bearer 1", "xa", "xcxd", ""}, false},
		{"value moved between path segments", values{"ab", "", "c", "d", "Bearer 1", "xa", "xc", "xd"}, false},
		{"value moved within a path segment", values{"a", "bc", "", "d", "Bearer 1", "xa", "xc", "xd"}, true},
	}
	baseBound, baseReq := bind(base)
	for _, tt := range tests {
		b, req := bind(tt.other)
		if got := bytes.Equal(b.Identity(), baseBound.Identity()); got != tt.equal {
			t.Errorf("%s: identities equal = %v, want %v", tt.name, got, tt.equal)
		}
		sameRequest := req.URL.String() == baseReq.URL.String() && reflect.DeepEqual(req.Header, baseReq.Header)
		if sameRequest != tt.equal {
			t.Errorf("%s: requests equal = %v, want %v", tt.name, sameRequest, tt.equal)
		}
	}
	// A value spelling the global placeholder's key, on either side of it,
	// makes different requests, so it must make different identities too.
	left, leftReq := bind(values{"a", "b", "c", "d", "x", "env.TARGET_TEST_B", "", ""})
	right, rightReq := bind(values{"a", "b", "c", "d", "x", "", "env.TARGET_TEST_B", ""})
	if leftReq.Header.Get("X-Pair") == rightReq.Header.Get("X-Pair") {
		t.Fatal("test values make equal requests")
	}
	if bytes.Equal(left.Identity(), right.Identity()) {
		t.Error("values on either side of a global placeholder make equal identities")
	}
	again, err := target.Parse("https://api.example/u/{http.request.uri.query.a}", nil)
	if err != nil {
		t.Fatal(err)
	}
	b1, _ := again.Bind(requestReplacer("/?a=1", nil))
	b2, _ := again.Bind(requestReplacer("/?a=1", nil))
	if !bytes.Equal(b1.Identity(), b2.Identity()) {
		t.Error("equal bindings make different identities")
	}
}

// FuzzIdentity checks that identities are equal exactly when the upstream
// requests are, for a template without global placeholders.
func FuzzIdentity(f *testing.F) {
	f.Add("a", "bc", "ab", "c")
	f.Add("a", "b", "a", "b")
	f.Add("x", "", "", "x")
	tmpl, err := target.Parse("https://api.example/u/{http.request.uri.query.v}?w={http.request.uri.query.w}",
		map[string][]string{"Authorization": {"{http.request.header.X-V}"}, "X-W": {"{http.request.header.X-W}"}})
	if err != nil {
		f.Fatal(err)
	}
	bind := func(t *testing.T, v, w string) ([]byte, string) {
		repl := requestReplacer("/?"+url.Values{"v": {v}, "w": {w}}.Encode(), http.Header{"X-V": {v}, "X-W": {w}})
		b, err := tmpl.Bind(repl)
		if errors.Is(err, target.ErrBadValue) {
			return nil, ""
		}
		if err != nil {
			t.Fatal(err)
		}
		req, err := b.Request(context.Background(), "")
		if err != nil {
			t.Fatal(err)
		}
		var wire bytes.Buffer
		if err := req.Header.Write(&wire); err != nil {
			t.Fatal(err)
		}
		return b.Identity(), req.URL.String() + "\n" + wire.String()
	}
	f.Fuzz(func(t *testing.T, v1, w1, v2, w2 string) {
		id1, req1 := bind(t, v1, w1)
		id2, req2 := bind(t, v2, w2)
		if id1 == nil || id2 == nil {
			return
		}
		if bytes.Equal(id1, id2) != (req1 == req2) {
			t.Errorf("identities equal = %v, requests equal = %v", bytes.Equal(id1, id2), req1 == req2)
		}
	})
}

// BenchmarkBind measures what a subscriber's arrival costs: binding a
// template and computing the binding's identity.
func BenchmarkBind(b *testing.B) {
	tmpl, err := target.Parse(fuzzTemplate, fuzzHeader)
	if err != nil {
		b.Fatal(err)
	}
	repl := requestReplacer("/events?p=42&q=open", http.Header{"X-H": {strings.Repeat("c", 200)}})
	b.ReportAllocs()
	for b.Loop() {
		bound, err := tmpl.Bind(repl)
		if err != nil {
			b.Fatal(err)
		}
		_ = bound.Identity()
	}
}

// BenchmarkRequest measures building one upstream request.
func BenchmarkRequest(b *testing.B) {
	tmpl, err := target.Parse(fuzzTemplate, fuzzHeader)
	if err != nil {
		b.Fatal(err)
	}
	bound, err := tmpl.Bind(requestReplacer("/events?p=42&q=open", http.Header{"X-H": {strings.Repeat("c", 200)}}))
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := bound.Request(context.Background(), "item 5"); err != nil {
			b.Fatal(err)
		}
	}
}

// expectRequest builds b's request for lastID and checks its escaped path,
// raw query and the value of the named header; what names the case.
func expectRequest(t *testing.T, what string, b *target.Bound, lastID, header, path, query, value string) {
	t.Helper()
	req, err := b.Request(context.Background(), lastID)
	if err != nil {
		t.Fatal(err)
	}
	if got := req.URL.EscapedPath(); got != path {
		t.Errorf("%s: path %q, want %q", what, got, path)
	}
	if req.URL.RawQuery != query {
		t.Errorf("%s: query %q, want %q", what, req.URL.RawQuery, query)
	}
	if got := req.Header.Get(header); got != value {
		t.Errorf("%s: header %q, want %q", what, got, value)
	}
}
