package integration

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
)

var update = flag.Bool("update", false, "rewrite the golden files of the adapt tests")

// adapt adapts a Caddyfile to JSON the way `caddy adapt` does.
func adapt(t *testing.T, filename string, body []byte) ([]byte, []caddyconfig.Warning, error) {
	t.Helper()
	adapter := caddyconfig.GetAdapter("caddyfile")
	if adapter == nil {
		t.Fatal("no caddyfile adapter registered")
	}
	return adapter.Adapt(body, map[string]any{"filename": filename})
}

// TestAdaptGolden adapts every testdata/adapt/*.caddyfile and compares the
// result with the .json file next to it; -update rewrites those files.
func TestAdaptGolden(t *testing.T) {
	inputs, err := filepath.Glob("testdata/adapt/*.caddyfile")
	if err != nil || len(inputs) == 0 {
		t.Fatalf("no Caddyfiles in testdata/adapt: %v", err)
	}
	for _, input := range inputs {
		name := strings.TrimSuffix(filepath.Base(input), ".caddyfile")
		t.Run(name, func(t *testing.T) {
			body, err := os.ReadFile(input)
			if err != nil {
				t.Fatal(err)
			}
			out, warnings, err := adapt(t, input, body)
			if err != nil {
				t.Fatalf("adapt: %v", err)
			}
			for _, w := range warnings {
				t.Errorf("warning: %s", w)
			}
			var indented bytes.Buffer
			if err := json.Indent(&indented, out, "", "\t"); err != nil {
				t.Fatal(err)
			}
			indented.WriteByte('\n')
			golden := strings.TrimSuffix(input, ".caddyfile") + ".json"
			if *update {
				if err := os.WriteFile(golden, indented.Bytes(), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run with -update to create it)", err)
			}
			if !bytes.Equal(indented.Bytes(), want) {
				t.Errorf("adapted JSON differs from %s (run with -update after checking):\n%s", golden, indented.Bytes())
			}
		})
	}
}

// TestAdaptErrors checks that each bad form fails with an error naming the
// file, the line and the reason.
func TestAdaptErrors(t *testing.T) {
	for _, tc := range []struct {
		name, block, want string
	}{
		{"no source", `id /id`,
			"sse_feed needs a source: poll <url> [<interval>] or tail <url>, at Caddyfile:2"},
		{"two sources", "poll http://a/x\n\t\ttail http://a/y",
			"tail: a feed has exactly one source, poll or tail, at Caddyfile:4"},
		{"items with tail", "tail http://a/y\n\t\titems /items",
			"items applies to poll; each tailed line is already one element, at Caddyfile:2"},
		{"ftp", `poll ftp://a/x`,
			"poll: url scheme must be http or https, at Caddyfile:3"},
		{"not a url", `tail not-a-url`,
			"tail: not an absolute url: want http:// or https://, at Caddyfile:3"},
		{"request placeholder in the host", `poll http://{query.host}/x`,
			"poll: placeholder {http.request.uri.query.host} in the userinfo, host or port: only global placeholders such as {env.*} may be there, at Caddyfile:3"},
		{"bad read_timeout", "tail http://a/y\n\t\tread_timeout never",
			`read_timeout: "never" is not a positive duration such as 2s or 1m, at Caddyfile:4`},
		{"zero max_feeds", "poll http://a/{query.id}\n\t\tmax_feeds 0",
			`max_feeds: "0" is not a whole number of at least 1, at Caddyfile:4`},
		{"unknown cluster backend", "tail http://a/y\n\t\tcluster etcd",
			"module not registered: http.handlers.sse_feed.clusters.etcd, at Caddyfile:4"},
		{"poll without url", `poll`,
			"wrong argument count or unexpected line ending after 'poll', at Caddyfile:3"},
		{"poll with extra argument", `poll http://a/x 2s 3s`,
			"wrong argument count or unexpected line ending after '3s', at Caddyfile:3"},
		{"bad interval", `poll http://a/x soon`,
			`poll: "soon" is not a positive duration such as 2s or 1m, at Caddyfile:3`},
		{"zero interval", `poll http://a/x 0s`,
			`poll: "0s" is not a positive duration such as 2s or 1m, at Caddyfile:3`},
		{"bad pointer", "tail http://a/y\n\t\tid id",
			`id: json pointer "id" must be empty or start with "/", at Caddyfile:4`},
		{"bad pointer escape", "tail http://a/y\n\t\tdata /a~2b",
			`data: json pointer "/a~2b" has "~" not followed by 0 or 1, at Caddyfile:4`},
		{"bad order", "poll http://a/x\n\t\torder newest",
			`order: want oldest_first or newest_first, got "newest", at Caddyfile:4`},
		{"header without value", "tail http://a/y\n\t\theader Authorization",
			"wrong argument count or unexpected line ending after 'Authorization', at Caddyfile:4"},
		{"bad heartbeat", "tail http://a/y\n\t\theartbeat never",
			`heartbeat: "never" is not a positive duration such as 2s or 1m, at Caddyfile:4`},
		{"bad size", "tail http://a/y\n\t\tmax_body lots",
			`max_body: "lots" is not a size such as 512KiB or 8MiB, at Caddyfile:4`},
		{"zero replay", "tail http://a/y\n\t\treplay 0",
			`replay: "0" is not a whole number of at least 1, at Caddyfile:4`},
		{"bad replay age", "tail http://a/y\n\t\treplay 10 forever",
			`replay: "forever" is not a positive duration such as 2s or 1m, at Caddyfile:4`},
		{"negative initial", "tail http://a/y\n\t\tinitial -1",
			`initial: "-1" is not a whole number of at least 0, at Caddyfile:4`},
		{"bad max_subscribers", "tail http://a/y\n\t\tmax_subscribers many",
			`max_subscribers: "many" is not a whole number of at least 0, at Caddyfile:4`},
		{"event with a line break", "tail http://a/y\n\t\tevent \"a\nb\"",
			"event: must be one line of UTF-8, at Caddyfile:4"},
		{"unknown option", "tail http://a/y\n\t\tinterval 2s",
			`unknown subdirective "interval", at Caddyfile:4`},
		{"argument on the directive", "tail http://a/y\n\t}\n\tsse_feed /x extra {\n\t\ttail http://a/y",
			"wrong argument count or unexpected line ending after 'extra', at Caddyfile:5"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			body := ":8080 {\n\tsse_feed /events {\n\t\t" + tc.block + "\n\t}\n}\n"
			_, _, err := adapt(t, "Caddyfile", []byte(body))
			if err == nil {
				t.Fatalf("adapted without error:\n%s", body)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error = %q\nwant it to contain %q", err, tc.want)
			}
		})
	}
}
