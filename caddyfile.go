package ssefeed

import (
	"strconv"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/dustin/go-humanize"

	"github.com/ssefeed/caddy-ssefeed/pointer"
	"github.com/ssefeed/caddy-ssefeed/target"
)

func init() {
	httpcaddyfile.RegisterHandlerDirective("sse_feed", parseCaddyfile)
	// sse_feed answers requests itself, like respond; ordering it before
	// respond puts it after encode and the auth directives, which wrap it.
	httpcaddyfile.RegisterDirectiveOrder("sse_feed", httpcaddyfile.Before, "respond")
}

func parseCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	handler := new(Handler)
	err := handler.UnmarshalCaddyfile(h.Dispenser)
	return handler, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens:
//
//	sse_feed [<matcher>] {
//		poll <url> [<interval>]
//		tail <url>
//		items <pointer>
//		id <pointer>
//		type <pointer>
//		event <name>
//		data <pointer>
//		order oldest_first|newest_first
//		header <name> <value>
//		timeout <duration>
//		read_timeout <duration>
//		max_body <size>
//		retry <duration>
//		heartbeat <duration>|off
//		flush_interval <duration>
//		heartbeat_event <name>
//		replay <count> [<max_age>]
//		replay_bytes <size>
//		initial <count>
//		reset_event <name>
//		max_subscribers <n>
//		max_feeds <n>
//		max_concurrent_requests <n>
//		name <name>
//		linger <duration>
//		cluster <backend> {
//			...
//		}
//	}
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next()        // the directive's name
	directive := *d // errors about the whole block name its line
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		option := d.Val()
		args := d.RemainingArgs()
		if err := h.setOption(d, option, args); err != nil {
			return err
		}
	}
	switch {
	case h.Poll == "" && h.Tail == "":
		return directive.Err("sse_feed needs a source: poll <url> [<interval>] or tail <url>")
	case h.Tail != "" && h.Items != "":
		return directive.Err("items applies to poll; each tailed line is already one element")
	}
	return nil
}

// setOption sets one subdirective. Errors name the line and the reason.
func (h *Handler) setOption(d *caddyfile.Dispenser, option string, args []string) error {
	wantArgs := func(least, most int) error {
		if len(args) < least || len(args) > most {
			return d.ArgErr()
		}
		return nil
	}
	switch option {
	case "poll", "tail":
		if h.Poll != "" || h.Tail != "" {
			return d.Errf("%s: a feed has exactly one source, poll or tail", option)
		}
		if err := wantArgs(1, map[string]int{"poll": 2, "tail": 1}[option]); err != nil {
			return err
		}
		if _, err := target.Parse(args[0], nil); err != nil {
			return d.Errf("%s: %v", option, err)
		}
		if option == "tail" {
			h.Tail = args[0]
			return nil
		}
		h.Poll = args[0]
		if len(args) == 2 {
			return parseDuration(d, option, args[1], &h.Interval)
		}
	case "items", "id", "type", "data":
		if err := wantArgs(1, 1); err != nil {
			return err
		}
		if _, err := pointer.Parse(args[0]); err != nil {
			return d.Errf("%s: %v", option, err)
		}
		*map[string]*string{"items": &h.Items, "id": &h.ID, "type": &h.Type, "data": &h.Data}[option] = args[0]
	case "event", "heartbeat_event", "reset_event", "name":
		if err := wantArgs(1, 1); err != nil {
			return err
		}
		if option != "name" && !validEventType(args[0]) {
			return d.Errf("%s: must be one line of UTF-8", option)
		}
		*map[string]*string{"event": &h.Event, "heartbeat_event": &h.HeartbeatEvent, "reset_event": &h.ResetEvent, "name": &h.Name}[option] = args[0]
	case "order":
		if err := wantArgs(1, 1); err != nil {
			return err
		}
		if args[0] != "oldest_first" && args[0] != "newest_first" {
			return d.Errf("order: want oldest_first or newest_first, got %q", args[0])
		}
		h.Order = args[0]
	case "header":
		if err := wantArgs(2, 2); err != nil {
			return err
		}
		if h.Header == nil {
			h.Header = make(map[string][]string)
		}
		h.Header[args[0]] = append(h.Header[args[0]], args[1])
	case "timeout", "read_timeout", "retry", "linger", "flush_interval":
		if err := wantArgs(1, 1); err != nil {
			return err
		}
		return parseDuration(d, option, args[0], map[string]*caddy.Duration{
			"timeout": &h.Timeout, "read_timeout": &h.ReadTimeout, "retry": &h.Retry,
			"linger": &h.Linger, "flush_interval": &h.FlushInterval,
		}[option])
	case "heartbeat":
		if err := wantArgs(1, 1); err != nil {
			return err
		}
		if args[0] == "off" {
			h.Heartbeat = -1
			return nil
		}
		return parseDuration(d, option, args[0], &h.Heartbeat)
	case "max_body", "replay_bytes":
		if err := wantArgs(1, 1); err != nil {
			return err
		}
		size, err := humanize.ParseBytes(args[0])
		if err != nil || size == 0 || size > 1<<40 {
			return d.Errf("%s: %q is not a size such as 512KiB or 8MiB", option, args[0])
		}
		if option == "max_body" {
			h.MaxBody = int64(size)
		} else {
			h.ReplayBytes = int(size)
		}
	case "replay":
		if err := wantArgs(1, 2); err != nil {
			return err
		}
		if err := parseCount(d, option, args[0], 1, &h.Replay); err != nil {
			return err
		}
		if len(args) == 2 {
			return parseDuration(d, option, args[1], &h.ReplayMaxAge)
		}
	case "initial", "max_subscribers":
		if err := wantArgs(1, 1); err != nil {
			return err
		}
		var n int
		if err := parseCount(d, option, args[0], 0, &n); err != nil {
			return err
		}
		if option == "initial" {
			h.Initial = &n
		} else {
			h.MaxSubscribers = n
		}
	case "max_feeds", "max_concurrent_requests":
		if err := wantArgs(1, 1); err != nil {
			return err
		}
		return parseCount(d, option, args[0], 1, map[string]*int{"max_feeds": &h.MaxFeeds, "max_concurrent_requests": &h.MaxConcurrentRequests}[option])
	case "cluster":
		if err := wantArgs(1, 1); err != nil {
			return err
		}
		backend, err := caddyfile.UnmarshalModule(d, "http.handlers.sse_feed.clusters."+args[0])
		if err != nil {
			return err
		}
		h.ClusterRaw = caddyconfig.JSONModuleObject(backend, "backend", args[0], nil)
	default:
		return d.Errf("unknown subdirective %q", option)
	}
	return nil
}

// parseDuration parses a positive duration such as 2s or 1m30s into dst.
func parseDuration(d *caddyfile.Dispenser, option, arg string, dst *caddy.Duration) error {
	dur, err := caddy.ParseDuration(arg)
	if err != nil || dur <= 0 {
		return d.Errf("%s: %q is not a positive duration such as 2s or 1m", option, arg)
	}
	*dst = caddy.Duration(dur)
	return nil
}

// parseCount parses a whole number of at least least into dst.
func parseCount(d *caddyfile.Dispenser, option, arg string, least int, dst *int) error {
	n, err := strconv.Atoi(arg)
	if err != nil || n < least {
		return d.Errf("%s: %q is not a whole number of at least %d", option, arg, least)
	}
	*dst = n
	return nil
}
