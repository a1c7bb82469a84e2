package ssefeed

import (
	"encoding/json"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

func TestUnmarshalCaddyfile(t *testing.T) {
	two := 2
	zero := 0
	for _, tc := range []struct {
		name  string
		input string
		want  Handler
	}{
		{"tail only", `sse_feed {
			tail http://127.0.0.1:9/stream
		}`, Handler{FeedConfig: FeedConfig{Tail: "http://127.0.0.1:9/stream"}}},
		{"poll with interval", `sse_feed {
			poll http://127.0.0.1:9/doc 500ms
		}`, Handler{FeedConfig: FeedConfig{Poll: "http://127.0.0.1:9/doc", Interval: caddy.Duration(500 * time.Millisecond)}}},
		{"every option", `sse_feed {
			poll "http://127.0.0.1:9/items?since={sse_feed.last_id}"
			items /data/items
			id /id
			type /kind
			event update
			data /body
			order newest_first
			header Authorization "Bearer {env.TOKEN}"
			header X-Multi a
			header X-Multi b
			timeout 3s
			read_timeout 5m
			max_body 512KiB
			retry 2s
			heartbeat 30s
			flush_interval 100ms
			heartbeat_event ping
			replay 50 10m
			replay_bytes 1MiB
			initial 2
			reset_event gone
			max_subscribers 100
			name orders
			linger 1m
		}`, Handler{
			FeedConfig: FeedConfig{
				Poll: "http://127.0.0.1:9/items?since={sse_feed.last_id}", Items: "/data/items",
				ID: "/id", Type: "/kind", Event: "update", Data: "/body", Order: "newest_first",
				Header:  map[string][]string{"Authorization": {"Bearer {env.TOKEN}"}, "X-Multi": {"a", "b"}},
				Timeout: caddy.Duration(3 * time.Second), ReadTimeout: caddy.Duration(5 * time.Minute), MaxBody: 512 << 10,
				Replay: 50, ReplayMaxAge: caddy.Duration(10 * time.Minute), ReplayBytes: 1 << 20,
				Name: "orders", Linger: caddy.Duration(time.Minute),
			},
			Retry: caddy.Duration(2 * time.Second), Heartbeat: caddy.Duration(30 * time.Second), HeartbeatEvent: "ping",
			FlushInterval: caddy.Duration(100 * time.Millisecond),
			Initial:       &two, ResetEvent: "gone", MaxSubscribers: 100,
		}},
		{"heartbeat off", `sse_feed {
			tail http://127.0.0.1:9/s
			heartbeat off
		}`, Handler{FeedConfig: FeedConfig{Tail: "http://127.0.0.1:9/s"}, Heartbeat: -1}},
		{"oldest first and initial zero", `sse_feed {
			poll http://127.0.0.1:9/d
			items ""
			order oldest_first
			initial 0
			replay 1
		}`, Handler{FeedConfig: FeedConfig{Poll: "http://127.0.0.1:9/d", Order: "oldest_first", Replay: 1}, Initial: &zero}},
		{"cluster", `sse_feed {
			poll http://127.0.0.1:9/d
			cluster redis {
				address unix:///run/redis.sock
				lease 5s
			}
			initial 0
		}`, Handler{
			FeedConfig: FeedConfig{
				Poll:       "http://127.0.0.1:9/d",
				ClusterRaw: json.RawMessage(`{"address":"unix:///run/redis.sock","backend":"redis","lease":5000000000}`),
			},
			Initial: &zero,
		}},
		{"pointer escapes", `sse_feed {
			tail http://127.0.0.1:9/s
			id /a~1b/m~0n
			data /
		}`, Handler{FeedConfig: FeedConfig{Tail: "http://127.0.0.1:9/s", ID: "/a~1b/m~0n", Data: "/"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var h Handler
			if err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input)); err != nil {
				t.Fatalf("UnmarshalCaddyfile: %v", err)
			}
			if !reflect.DeepEqual(h, tc.want) {
				t.Fatalf("got  %+v\nwant %+v", h, tc.want)
			}
			if err := h.Validate(); err != nil {
				t.Fatalf("Validate: %v", err)
			}
		})
	}
}

func TestUnmarshalCaddyfileErrors(t *testing.T) {
	for _, tc := range []struct {
		name   string
		input  string
		line   int
		reason string
	}{
		{"unknown subdirective", "sse_feed {\n\ttail http://h/s\n\tbogus 1\n}", 3, `unknown subdirective "bogus"`},
		{"no source", "sse_feed {\n\tid /id\n}", 1, "needs a source"},
		{"ftp", "sse_feed {\n\tpoll ftp://h/d\n}", 2, "poll: url scheme must be http or https"},
		{"not a url", "sse_feed {\n\ttail not-a-url\n}", 2, "tail: not an absolute url: want http:// or https://"},
		{"empty block", "sse_feed", 1, "needs a source"},
		{"two sources", "sse_feed {\n\ttail http://h/s\n\tpoll http://h/d\n}", 3, "exactly one source"},
		{"two tails", "sse_feed {\n\ttail http://h/s\n\ttail http://h/t\n}", 3, "exactly one source"},
		{"bad pointer", "sse_feed {\n\ttail http://h/s\n\tid id\n}", 3, `id: json pointer "id" must be empty or start with "/"`},
		{"bad pointer escape", "sse_feed {\n\tpoll http://h/d\n\titems /a~2\n}", 3, `items: json pointer "/a~2" has "~" not followed by 0 or 1`},
		{"bad interval", "sse_feed {\n\tpoll http://h/d often\n}", 2, `poll: "often" is not a positive duration`},
		{"bad duration", "sse_feed {\n\ttail http://h/s\n\ttimeout soon\n}", 3, `timeout: "soon" is not a positive duration`},
		{"zero duration", "sse_feed {\n\ttail http://h/s\n\tretry 0s\n}", 3, `retry: "0s" is not a positive duration`},
		{"negative heartbeat", "sse_feed {\n\ttail http://h/s\n\theartbeat -1s\n}", 3, `heartbeat: "-1s" is not a positive duration`},
		{"bad max age", "sse_feed {\n\ttail http://h/s\n\treplay 10 forever\n}", 3, `replay: "forever" is not a positive duration`},
		{"bad size", "sse_feed {\n\ttail http://h/s\n\tmax_body lots\n}", 3, `max_body: "lots" is not a size`},
		{"zero size", "sse_feed {\n\ttail http://h/s\n\treplay_bytes 0\n}", 3, `replay_bytes: "0" is not a size`},
		{"bad count", "sse_feed {\n\ttail http://h/s\n\treplay 0\n}", 3, `replay: "0" is not a whole number of at least 1`},
		{"negative initial", "sse_feed {\n\ttail http://h/s\n\tinitial -1\n}", 3, `initial: "-1" is not a whole number of at least 0`},
		{"bad max subscribers", "sse_feed {\n\ttail http://h/s\n\tmax_subscribers many\n}", 3, `max_subscribers: "many" is not a whole number`},
		{"missing argument", "sse_feed {\n\ttail\n}", 2, "wrong argument count"},
		{"missing header value", "sse_feed {\n\ttail http://h/s\n\theader X-A\n}", 3, "wrong argument count"},
		{"extra argument", "sse_feed {\n\ttail http://h/s\n\tid /a /b\n}", 3, "wrong argument count"},
		{"extra poll argument", "sse_feed {\n\tpoll http://h/d 1s 2s\n}", 2, "wrong argument count"},
		{"argument after directive", "sse_feed extra {\n\ttail http://h/s\n}", 1, "wrong argument count"},
		{"unknown cluster backend", "sse_feed {\n\ttail http://h/s\n\tcluster etcd\n}", 3, "etcd"},
		{"bad cluster option", "sse_feed {\n\ttail http://h/s\n\tcluster redis {\n\t\tlease soon\n\t}\n}", 4, "lease"},
		{"order value", "sse_feed {\n\tpoll http://h/d\n\titems /i\n\torder random\n}", 4, `order: want oldest_first or newest_first, got "random"`},
		{"items with tail", "sse_feed {\n\ttail http://h/s\n\titems /i\n}", 1, "items applies to poll"},
		{"bad read timeout", "sse_feed {\n\ttail http://h/s\n\tread_timeout never\n}", 3, `read_timeout: "never" is not a positive duration`},
		{"event with a line break", "sse_feed {\n\ttail http://h/s\n\tevent \"a\nb\"\n}", 3, "event: must be one line"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var h Handler
			err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input))
			if err == nil {
				t.Fatalf("no error for %q", tc.input)
			}
			msg := err.Error()
			if !strings.Contains(msg, tc.reason) || !strings.HasSuffix(msg, "Testfile:"+strconv.Itoa(tc.line)) {
				t.Fatalf("error %q, want %q at Testfile:%d", msg, tc.reason, tc.line)
			}
		})
	}
}

func FuzzCaddyfile(f *testing.F) {
	f.Add("tail http://127.0.0.1:9/s\nid /id\nheartbeat off")
	f.Add("poll http://h/d 1s\nitems /a~1b\norder newest_first\nreplay 5 1m\nreplay_bytes 1KiB")
	f.Add("header A b\nheader A c\ninitial 3\nmax_subscribers 0")
	f.Add("max_body 1EiB\nevent \"x\ny\"\n{\n}")
	f.Add("tail\npoll\nbogus {\n nested\n}")
	f.Fuzz(func(t *testing.T, body string) {
		tokens, err := caddyfile.Tokenize([]byte("sse_feed {\n"+body+"\n}"), "Testfile")
		if err != nil {
			return
		}
		var h Handler
		if err := h.UnmarshalCaddyfile(caddyfile.NewDispenser(tokens)); err != nil {
			if !strings.Contains(err.Error(), "Testfile:") {
				t.Fatalf("error %q does not name the line", err)
			}
			return
		}
		if err := h.Validate(); err != nil {
			t.Fatalf("accepted %q, which Validate rejects: %v", body, err)
		}
	})
}
