package target

import (
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
)

// FuzzSplitLikeCaddy checks that splitPlaceholders reads a string as Caddy's
// replacer does, escaped braces included, whenever it accepts the string.
func FuzzSplitLikeCaddy(f *testing.F) {
	for _, s := range []string{
		"https://api.example/{http.request.uri.query.id}?since={sse_feed.last_id}",
		`\{literal\} {a\}b} {c}\`, `{a\}`, `\\{a}`, "{a{b}}", "}{", "{", "{}", "a{b",
	} {
		f.Add(s)
	}
	repl := caddy.NewEmptyReplacer()
	repl.Map(func(key string) (any, bool) { return "<" + key + ">", true })
	f.Fuzz(func(t *testing.T, s string) {
		tokens, err := splitPlaceholders(s)
		if err != nil {
			return
		}
		var got strings.Builder
		for _, tok := range tokens {
			if tok.placeholder {
				got.WriteString("<" + tok.text + ">")
			} else {
				got.WriteString(tok.text)
			}
		}
		if want := repl.ReplaceAll(s, ""); got.String() != want {
			t.Errorf("splitPlaceholders(%q) reads as %q, Caddy as %q", s, got.String(), want)
		}
	})
}
