package source

import (
	"net/url"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
)

func TestCheckURL(t *testing.T) {
	tests := []struct {
		raw string
		err string // a part of the error, or "" for none
	}{
		{"http://api.example/items", ""},
		{"https://api.example:8443/items?since={sse_feed.last_id}&key={env.KEY}", ""},
		{"HTTPS://api.example", ""},
		{"http://{env.API_HOST}/x", ""},
		{"http://{env.API_HOST}:{env.API_PORT}/x", ""},
		{"http://api-{env.REGION}.example/x", ""},
		{"https://user:{env.PASS}@api.example/", ""},
		{"http://[::1]:8080/x", ""},
		{"https://api.example/{env.ID}/{sse_feed.last_id}#{http.request.uri}", ""},
		{"https://api.example/orders/{http.request.uri.query.order}/status?u={http.auth.user.id}", ""},
		{"https://api.example/{query.x}/{path.0}?h={header.X-Id}&c={cookie.c}&r={re.m.1}", ""},

		{"not-a-url", "url must start with http:// or https://"},
		{"", "url must start with http:// or https://"},
		{"//api.example/x", "url must start with http:// or https://"},
		{"api.example/x?key=k", "url must start with http:// or https://"},
		{"http:/api.example/x", "url must start with http:// or https://"},
		{"{env.SCHEME}://api.example/x", "url must start with http:// or https://"},
		{"ftp://files.example/x", `url scheme "ftp" is not supported: use http or https`},
		{"ws://api.example/x", `url scheme "ws" is not supported`},
		{"http://", "url has no host"},
		{"http:///x?key=k", "url has no host"},
		{"https://?key=k", "url has no host"},
		{"http://api.example:port/x", "invalid url: invalid port"},
		{"http://api.example/%zz", "invalid url: invalid URL escape"},
		{"http://api.example/x\n", "invalid url:"},
		{"http://{http.request.host}/x", "placeholder {http.request.host} in the url's host or port"},
		{"http://api.example:{query.port}/x", "placeholder {query.port} in the url's host or port"},
		{"https://{header.X-Tenant}.api.example/x", "placeholder {header.X-Tenant}"},
		{"https://api.example{path.0}/x", "placeholder {path.0}"},
		{"https://{http.auth.user.id}@api.example/x", "placeholder {http.auth.user.id}"},
		{"https://{sse_feed.last_id}/x", "placeholder {sse_feed.last_id}"},
		{"https://{system.hostname}/x", "placeholder {system.hostname}"},
		{"https://{env.H}{http.vars.h}/x", "placeholder {http.vars.h}"},
		{"https://{a?b}/x", "a placeholder in the url's host or port"},
		{"https://api.example/" + strings.Repeat("{", 102), "invalid url: too many unclosed placeholders"},
	}
	for _, tt := range tests {
		err := CheckURL(tt.raw)
		switch {
		case tt.err == "" && err != nil:
			t.Errorf("CheckURL(%q) = %v, want no error", tt.raw, err)
		case tt.err != "" && (err == nil || !strings.Contains(err.Error(), tt.err)):
			t.Errorf("CheckURL(%q) = %v, want an error with %q", tt.raw, err, tt.err)
		}
	}
}

// TestCheckURLKeepsQuery checks that no error quotes the query.
func TestCheckURLKeepsQuery(t *testing.T) {
	for _, raw := range []string{"ftp", "http://", "http://h:x", "http://h/%zz", "http://{query.h}", "not-a-url"} {
		if err := CheckURL(raw + "?key=s3cr3t"); err == nil || strings.Contains(err.Error(), "s3cr3t") {
			t.Errorf("CheckURL(%q) = %v, want an error without the query", raw+"?key=s3cr3t", err)
		}
	}
}

// FuzzCheckURL checks that CheckURL never panics, never quotes the query,
// and accepts only URLs that, with their placeholders expanded as Caddy
// does, are http or https with a host that no placeholder but {env.*}
// chooses: expanded empty or to a hostile value, the others leave scheme,
// user info, host and port as they are.
func FuzzCheckURL(f *testing.F) {
	f.Add("https://api.example/items?since={sse_feed.last_id}")
	f.Add("http://{env.HOST}:{env.PORT}/x")
	f.Add("http://{query.h}/x")
	f.Add("http://h:{query.p}/x")
	f.Add("https://u:{env.P}@h/{a}")
	f.Add(`http://h\{x}/`)
	f.Add("ftp://x")
	f.Add("not-a-url")
	f.Fuzz(func(t *testing.T, raw string) {
		if err := CheckURL(raw + "?q=Zx9Secret"); err != nil && strings.Contains(err.Error(), "Zx9Secret") {
			t.Fatalf("CheckURL(%q) quotes the query: %v", raw+"?q=Zx9Secret", err)
		}
		if CheckURL(raw) != nil {
			return
		}
		expand := func(value string) *url.URL {
			expanded, err := caddy.NewEmptyReplacer().ReplaceFunc(raw, func(key string, _ any) (any, error) {
				if strings.HasPrefix(key, "env.") {
					return "0", nil
				}
				return value, nil
			})
			if err != nil {
				t.Fatalf("CheckURL accepted %q, which Caddy cannot expand: %v", raw, err)
			}
			u, err := url.Parse(expanded)
			if err != nil {
				t.Fatalf("CheckURL accepted %q, which expands to %q: %v", raw, expanded, err)
			}
			if u.Scheme != "http" && u.Scheme != "https" || u.Host == "" {
				t.Fatalf("CheckURL accepted %q, which expands to %q: scheme %q, host %q", raw, expanded, u.Scheme, u.Host)
			}
			return u
		}
		want := authority(expand(""))
		if got := authority(expand("@evil.example:1/#?")); got != want {
			t.Fatalf("CheckURL accepted %q, whose placeholders choose %q or %q", raw, want, got)
		}
	})
}
